"""Fuzz the text path: arbitrary bytes, decoded every way a caller might, into Model.embed, embed_queries,
count_tokens and embed_token_ids (arbitrary integer lists). The input's first byte chooses which one it goes to.

Documented errors: embed_token_ids raises ValueError for an id outside the vocabulary or an empty sequence
without special tokens; nothing else may raise, and every answer has the right shape, finite unit rows.
"""

from __future__ import annotations

import sys

import numpy as np
from common import fuzz_main, small_model

DECODINGS = [  # how callers turn bytes into str: each reaches the tokenizer differently
    lambda b: b.decode("utf-8", "replace"),
    lambda b: b.decode("utf-8", "surrogateescape"),  # lone surrogates U+DC80..U+DCFF
    lambda b: b.decode("utf-16-le", "surrogatepass"),  # any surrogate, paired or not
    lambda b: b.decode("latin-1"),
    lambda b: b.decode("utf-32-le", "replace"),
    lambda b: b.decode("utf-8", "ignore"),
]


# The entry point an input exercises: bits 4-5 of its first byte (bits 0-1 and 7 already choose the decoding,
# how ids are split and whether special tokens are added). One call (or, for counts, the two that must agree)
# per input rather than all of them: every entry point is still reached, at a fraction of the cost.
OPS = ["embed", "embed_queries", "count_tokens", "embed_token_ids"]


def op_of(mode: int) -> str:
    return OPS[(mode >> 4) & 3]


def one_input(data: bytes) -> None:
    model = small_model()
    if not data:
        return
    mode, payload = data[0], data[1:]
    op = op_of(mode)
    if op == "embed_token_ids":
        _check_token_ids(model, mode, payload)
        return
    text = DECODINGS[mode % len(DECODINGS)](payload[: len(payload) // 4 * 4] if mode % len(DECODINGS) in (2, 4)
                                            else payload)
    texts = text.split("\x00")[:8]
    if op == "embed":
        _check_rows(model.embed(texts), len(texts), model.dim)
    elif op == "embed_queries":
        _check_rows(model.embed_queries(texts), len(texts), model.dim)
    else:
        counts = model.count_tokens(texts)
        assert all(2 <= c <= model.max_tokens for c in counts), counts
        assert counts == [len(ids) for ids in model.tokenize(texts)]


def _check_token_ids(model, mode: int, payload: bytes) -> None:
    raw = np.frombuffer(payload[: len(payload) // 4 * 4], dtype="<i4")
    seqs = [s.tolist() for s in np.array_split(raw, 1 + mode % 4)] if raw.size else [[]]
    special = bool(mode & 0x80)
    try:
        vectors = model.embed_token_ids(seqs, add_special_tokens=special)
    except ValueError as e:  # documented: an id outside [0, vocab), or an empty sequence without [CLS]/[SEP]
        assert "vocabulary" in str(e) or "empty" in str(e), e
        return
    _check_rows(vectors, len(seqs), model.dim)


def _check_rows(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32, vectors.shape
    assert np.isfinite(vectors).all()
    if n:
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


if __name__ == "__main__":
    fuzz_main(one_input)
    sys.exit(0)
