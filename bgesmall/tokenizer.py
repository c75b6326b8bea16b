"""WordPiece tokenization with `tokenizers`, from the checkpoint's tokenizer.json.

Padding and truncation baked into a tokenizer file are switched off: the engine packs sequences without
padding, and truncation is done here so that an over-long text can be reported with its full length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer

from .config import ModelLoadError


def check_texts(texts) -> list[str]:
    """The public API's input check: a list of str, else TypeError naming the first bad index."""
    if isinstance(texts, str):
        raise TypeError("expected a list of strings, got a single str: wrap it as [text]")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"expected a list of strings, got {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"input {i} is {type(t).__name__}, not str")
    return items


def _clean(text: str) -> str:
    """Surrogates, which no UTF-8 encoder accepts: a split pair is joined into its character, and a lone one
    becomes one U+FFFD, as a browser would show it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


MAX_TOKENIZER_BYTES = 64 << 20  # bge-small's tokenizer.json is 0.7 MB, the largest multilingual ones ~20 MB


class Tokenizer:
    def __init__(self, path: Path, max_tokens: int, vocab_size: int | None = None):
        """vocab_size: the embedding table's rows (config.json); a tokenizer whose ids reach past it is refused."""
        try:
            size = Path(path).stat().st_size
            if size > MAX_TOKENIZER_BYTES:
                raise ModelLoadError(f"{path}: {size} bytes, more than any tokenizer.json (at most "
                                     f"{MAX_TOKENIZER_BYTES}); the file is damaged or not a tokenizer")
            self._tok = HFTokenizer.from_file(str(path))
        except ModelLoadError:
            raise
        except Exception as e:  # tokenizers raises a plain Exception for a missing or malformed file
            raise ModelLoadError(
                f"cannot read tokenizer {path} ({e}): the model folder needs the checkpoint's tokenizer.json"
            ) from e
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_tokens = max_tokens
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ModelLoadError(f"{path}: the tokenizer's vocabulary (model.vocab) is empty")
        top = max(vocab.values())
        if vocab_size is not None and top >= vocab_size:
            raise ModelLoadError(
                f"{path}: the tokenizer has token id {top} ({max(vocab, key=vocab.get)!r}), but config.json's "
                f"vocab_size is {vocab_size}: this tokenizer.json belongs to another model"
            )
        self.cls_id = self._special("[CLS]", path)
        self.sep_id = self._special("[SEP]", path)

    def _special(self, token: str, path: Path) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ModelLoadError(f"{path}: tokenizer has no {token} token; is this a BERT tokenizer?")
        return i

    def content_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids of each text, without [CLS]/[SEP] and without truncation."""
        cleaned = [_clean(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(cleaned, add_special_tokens=False)]

    def wrap(self, ids: Sequence[Sequence[int]], *, truncate: bool) -> list[list[int]]:
        """[CLS] ids [SEP], cut to max_tokens (keeping [SEP]) or, with truncate=False, ValueError."""
        room = self.max_tokens - 2
        out = []
        for i, seq in enumerate(ids):
            if len(seq) > room:
                if not truncate:
                    raise ValueError(
                        f"input {i} has {len(seq) + 2} tokens, over this model's limit of {self.max_tokens}; "
                        "shorten it or pass truncate=True"
                    )
                seq = seq[:room]
            out.append([self.cls_id, *seq, self.sep_id])
        return out
