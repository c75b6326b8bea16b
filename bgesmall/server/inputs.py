"""Turn a request's `input` into validated token-id sequences, the one form the batcher runs.

Text is tokenized here (without [CLS]/[SEP]); token-id input is range-checked. Every sequence is then
truncated to `model.max_tokens - 2` (or refused when the request sent `truncate: false`), so that
`model.embed_token_ids(ids)` (which adds [CLS]/[SEP]) gives what `model.embed(texts)` would. All checks
happen before a request joins a batch, so a bad request never reaches the forward pass others share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import OpenAIError
from .schemas import MAX_INPUTS


@dataclass(frozen=True)
class PreparedInput:
    ids: list[list[int]]  # one token-id sequence per input, without [CLS]/[SEP], within the model's limit
    prompt_tokens: int  # tokens the forward pass sees, [CLS]/[SEP] included (= model.count_tokens)


def _bad(message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param="input", code=code)


def prepare_input(model: Any, input: Any, *, query: bool, truncate: bool,
                  max_inputs: int = MAX_INPUTS) -> PreparedInput:
    """input: what EmbeddingRequest accepted (str | list[str] | list[int] | list[list[int]])."""
    if isinstance(input, str):
        if not input:
            raise _bad("'input' is an empty string; it must be non-empty.", code="empty_input")
        input = [input]
    elif not input:
        raise _bad("'input' must not be an empty array.")
    elif isinstance(input[0], int):
        input = [input]  # one token array is one input
    if len(input) > max_inputs:
        raise _bad(f"'input' has {len(input)} items; at most {max_inputs} inputs are allowed per request.",
                   code="too_many_inputs")

    if isinstance(input[0], str):
        ids = _tokenize_texts(model, input, query=query)
    else:
        ids = _check_token_ids(model, input, query=query)

    limit = model.max_tokens - 2  # room for [CLS] and [SEP]
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            if not truncate:
                raise _bad(f"input[{i}] has {len(seq) + 2} tokens ([CLS]/[SEP] included), over this model's "
                           f"limit of {model.max_tokens}: shorten it or leave out 'truncate: false' to have "
                           "it truncated.", code="context_length_exceeded")
            ids[i] = seq[:limit]
    return PreparedInput(ids=ids, prompt_tokens=sum(len(seq) + 2 for seq in ids))


def _tokenize_texts(model: Any, texts: list[str], *, query: bool) -> list[list[int]]:
    for i, text in enumerate(texts):
        if text == "":
            raise _bad(f"input[{i}] is an empty string; every input must be non-empty.", code="empty_input")
    if query:
        from bgesmall import QUERY_INSTRUCTION

        texts = [QUERY_INSTRUCTION + t for t in texts]
    return [list(seq) for seq in model.tokenize(texts, add_special_tokens=False, truncate=False)]


def _check_token_ids(model: Any, arrays: list[list[int]], *, query: bool) -> list[list[int]]:
    vocab_size = model.config.vocab_size
    for i, seq in enumerate(arrays):
        if not seq:
            raise _bad(f"input[{i}] is an empty token array; every input must be non-empty.", code="empty_input")
        bad = next((t for t in seq if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _bad(f"input[{i}] holds token id {bad}, outside this model's vocabulary [0, {vocab_size}).",
                       code="invalid_token_id")
    if query:
        from bgesmall import QUERY_INSTRUCTION

        prefix = list(model.tokenize([QUERY_INSTRUCTION], add_special_tokens=False, truncate=False)[0])
        return [prefix + list(seq) for seq in arrays]
    return [list(seq) for seq in arrays]
