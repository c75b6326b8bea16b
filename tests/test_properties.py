"""Property tests (issue 14, part 3): hypothesis draws the shapes, lengths and batches; each kernel is held to
a float64 numpy reference (test_kernels.py's), and the model to batch invariance, input order, embed_iter ==
embed and token counts == the tokenizer's.

The arrays come from a numpy generator seeded by hypothesis, so a failure shrinks to a small shape and a
seed that reproduces it. Example counts are fixed and small (the whole file runs in well under a minute).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels import ref_attention, ref_gelu, ref_layernorm
from tokenizers import Tokenizer

from bgesmall.kernels import (
    attention,
    bias_gelu,
    embed_layernorm,
    linear,
    pack_columns,
    residual_layernorm,
    softmax_rows,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(0, 2**32 - 1)
lengths = st.integers(1, 512)
scales = st.sampled_from([1e-3, 0.1, 1.0, 10.0, 100.0])


def arrays(seed: int):
    rng = np.random.default_rng(seed)
    return lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)


# -- kernels against float64 ---------------------------------------------------------------------------------


@FAST
@given(m=st.integers(0, 520), k=st.integers(1, 1536), n=st.integers(1, 1200), seed=seeds, scale=scales)
def test_linear_over_packed_weights(m, k, n, seed, scale):
    a = arrays(seed)
    x, w = a(m, k, scale=scale), a(k, n)
    out = np.full((m, n), np.nan, dtype=np.float32)
    linear(x, pack_columns(w), out)
    want = x.astype(np.float64) @ w
    bound = 4 * np.finfo(np.float32).eps * math.sqrt(k) * (np.abs(x).astype(np.float64) @ np.abs(w))
    assert np.all(np.abs(out - want) <= bound + 1e-30)


@FAST
@given(seq_lengths=st.lists(lengths, min_size=1, max_size=5).filter(lambda xs: sum(xs) <= 1200),
       heads=st.sampled_from([1, 2, 4, 12]), head_dim=st.sampled_from([8, 16, 32]), first_only=st.booleans(),
       seed=seeds)
def test_attention_over_packed_sequences(seq_lengths, heads, head_dim, first_only, seed):
    a = arrays(seed)
    hidden = heads * head_dim
    offsets = np.concatenate([[0], np.cumsum(seq_lengths)]).astype(np.int64)
    qkv, bias = a(offsets[-1], 3 * hidden, scale=2.0), a(3 * hidden)
    out = np.full((offsets[-1], hidden), np.nan, dtype=np.float32)
    attention(qkv, bias, offsets[:-1].copy(), np.diff(offsets), heads, first_only, out)
    rows = offsets[:-1] if first_only else np.arange(offsets[-1])
    np.testing.assert_allclose(out[rows], ref_attention(qkv, bias, offsets, heads)[rows], atol=2e-5, rtol=1e-5)


@FAST
@given(heads=st.integers(1, 4), n=lengths, scale=st.floats(0.01, 4.0), spread=scales, seed=seeds)
def test_softmax_rows(heads, n, scale, spread, seed):
    x = arrays(seed)(heads, n, n, scale=spread)
    want = x.astype(np.float64) * np.float32(scale)
    want = np.exp(want - want.max(axis=2, keepdims=True))
    want /= want.sum(axis=2, keepdims=True)
    softmax_rows(x, np.float32(scale))
    np.testing.assert_allclose(x, want, atol=1e-7, rtol=2e-6)


@FAST
@given(tokens=lengths, hidden=st.sampled_from([1, 2, 31, 32, 384, 1000]), eps=st.sampled_from([1e-12, 1e-6, 1e-5]),
       scale=scales, seed=seeds)
def test_residual_layernorm(tokens, hidden, eps, scale, seed):
    a = arrays(seed)
    x, bias, res = a(tokens, hidden, scale=scale), a(hidden), a(tokens, hidden, scale=scale)
    gamma, beta = 1 + 0.1 * a(hidden), a(hidden)
    total = x.astype(np.float64) + bias + res
    want = ref_layernorm(total, gamma, beta, eps)
    out = np.empty_like(x)
    residual_layernorm(x, bias, res, gamma, beta, eps, out)
    # float32 rounding of the sum before normalizing: relative to the row's spread, plus the output's own
    spread = np.sqrt(total.var(axis=1, keepdims=True) + eps)
    bound = 1e-5 + 2e-6 * np.abs(want) + 4 * np.finfo(np.float32).eps * np.abs(total).max(axis=1, keepdims=True) \
        / spread * np.abs(gamma)
    assert np.all(np.abs(out - want) <= bound)


@FAST
@given(tokens=lengths, ffn=st.integers(1, 1600), scale=scales, seed=seeds)
def test_bias_gelu(tokens, ffn, scale, seed):
    a = arrays(seed)
    x, b = a(tokens, ffn, scale=scale), a(ffn)
    want = ref_gelu(x.astype(np.float64) + b)
    bias_gelu(x, b)
    np.testing.assert_allclose(x, want, atol=2e-6, rtol=1e-6)


@FAST
@given(seq_lengths=st.lists(lengths, min_size=1, max_size=4), vocab=st.integers(1, 3000),
       hidden=st.sampled_from([8, 32, 384]), seed=seeds)
def test_embed_layernorm(seq_lengths, vocab, hidden, seed):
    a = arrays(seed)
    rng = np.random.default_rng(seed + 1)
    word, pos, typ = a(vocab, hidden), a(512, hidden), a(hidden)
    gamma, beta = 1 + 0.1 * a(hidden), a(hidden)
    ids = rng.integers(0, vocab, sum(seq_lengths)).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in seq_lengths]).astype(np.int32)
    out = np.empty((ids.size, hidden), dtype=np.float32)
    embed_layernorm(ids, positions, word, pos, typ, gamma, beta, 1e-12, out)
    want = ref_layernorm(word[ids].astype(np.float64) + pos[positions] + typ, gamma, beta, 1e-12)
    np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-5)


# -- the model ---------------------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "a", "mat", "embedding", "vectors", "Zürich", "naïve", "東京", "🙂", "don't",
         "3.14", "x" * 40, "co-operate", "", "\t", "end."]
texts = st.lists(st.sampled_from(WORDS), min_size=0, max_size=700).map(" ".join)  # up to ~700 words: past 512
short_texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map(" ".join)
MODEL = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@MODEL
@given(batch=st.lists(st.one_of(short_texts, texts), min_size=1, max_size=12), pick=st.integers(0, 11))
def test_batch_invariance(minilm, batch, pick):
    text = batch[pick % len(batch)]
    alone = minilm.embed([text])
    in_batch = minilm.embed(batch)[pick % len(batch)]
    assert np.max(np.abs(alone[0] - in_batch)) <= 1e-6


@MODEL
@given(batch=st.lists(short_texts, min_size=2, max_size=16), order=st.randoms(use_true_random=False))
def test_input_order(minilm, batch, order):
    perm = list(range(len(batch)))
    order.shuffle(perm)
    vectors = minilm.embed(batch)
    shuffled = minilm.embed([batch[i] for i in perm])
    assert np.max(np.abs(shuffled - vectors[perm])) <= 1e-6


@MODEL
@given(batch=st.lists(short_texts, min_size=0, max_size=20), chunk_size=st.integers(1, 25), query=st.booleans())
def test_embed_iter_equals_embed(minilm, batch, chunk_size, query):
    blocks = list(minilm.embed_iter(iter(batch), chunk_size=chunk_size, query=query))
    assert [len(b) for b in blocks] == [min(chunk_size, len(batch) - i) for i in range(0, len(batch), chunk_size)]
    if batch:
        want = minilm.embed_queries(batch) if query else minilm.embed(batch)
        assert np.max(np.abs(np.concatenate(blocks) - want)) <= 1e-6


@pytest.fixture(scope="module")
def reference_tokenizer(minilm_dir) -> Tokenizer:
    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.one_of(st.text(max_size=300), texts), min_size=1, max_size=8))
def test_count_tokens_equals_the_tokenizers(minilm, reference_tokenizer, batch):
    full = [len(e.ids) for e in reference_tokenizer.encode_batch(batch, add_special_tokens=True)]
    assert minilm.count_tokens(batch, truncate=False) == full
    assert minilm.count_tokens(batch) == [min(n, minilm.max_tokens) for n in full]
    assert [len(ids) for ids in minilm.tokenize(batch)] == minilm.count_tokens(batch)
