"""Each kernel against a plain numpy (float64) version of itself, on seeded input and on edge cases."""

import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from bgesmall.config import BertConfig
from conftest import minilm_path
from bgesmall.encoder import LONG_SEQUENCE, Sequences, self_attention
from bgesmall.kernels import (
    attention,
    bias_gelu,
    embed_layernorm,
    erf,
    exp_nonpositive,
    gelu,
    linear,
    linear_split,
    pack_columns,
    residual_layernorm,
    softmax_rows,
    unpack_columns,
    unpack_rows,
)
from bgesmall.kernels import matmul
from bgesmall.kernels.matmul import HAS_BF16, PANEL, bf16_to_f32, pack_pairs, round_bf16, unpack_pairs

rng = np.random.default_rng(1234)


def ref_gelu(x):  # exact erf GELU in float64
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_layernorm(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def ref_attention(qkv, bias, offsets, heads):
    qkv = qkv.astype(np.float64) + bias
    hidden = qkv.shape[1] // 3
    d = hidden // heads
    out = np.zeros((qkv.shape[0], hidden))
    for s in range(len(offsets) - 1):
        rows = qkv[offsets[s] : offsets[s + 1]]
        for h in range(heads):
            q = rows[:, h * d : (h + 1) * d]
            k = rows[:, hidden + h * d : hidden + (h + 1) * d]
            v = rows[:, 2 * hidden + h * d : 2 * hidden + (h + 1) * d]
            scores = q @ k.T / math.sqrt(d)
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[offsets[s] : offsets[s + 1], h * d : (h + 1) * d] = (p / p.sum(axis=1, keepdims=True)) @ v
    return out


def test_erf_matches_libm():
    xs = np.linspace(-8, 8, 40001, dtype=np.float32)
    err = max(abs(erf(x) - math.erf(float(x))) for x in xs)
    assert err < 5e-7
    assert erf(np.float32(np.inf)) == 1.0 and erf(np.float32(-np.inf)) == -1.0


def test_gelu_scalar_is_exact_erf_gelu_not_tanh():
    xs = np.linspace(-10, 10, 2001, dtype=np.float32)
    ours = np.array([gelu(x) for x in xs])
    assert np.abs(ours - ref_gelu(xs)).max() < 1e-6
    tanh = 0.5 * xs * (1 + np.tanh(math.sqrt(2 / math.pi) * (xs + 0.044715 * xs**3)))
    assert np.abs(tanh - ref_gelu(xs)).max() > 1e-4  # the approximation is distinguishable at this tolerance


@pytest.mark.parametrize("tokens", [1, 7, 512])
def test_bias_gelu(tokens):
    x = (rng.standard_normal((tokens, 1536)) * 3).astype(np.float32)
    b = rng.standard_normal(1536).astype(np.float32)
    want = ref_gelu(x.astype(np.float64) + b)
    bias_gelu(x, b)
    np.testing.assert_allclose(x, want, atol=2e-6, rtol=1e-6)


def test_exp_nonpositive():
    x = -np.abs(rng.standard_normal(1000) * 30).astype(np.float32)
    x[:3] = [0.0, -1e-8, -100.0]
    want = np.exp(x.astype(np.float64))
    bits = np.empty(1000, dtype=np.int32)
    exp_nonpositive(x, bits)
    big = want > 1e-30
    assert np.max(np.abs(x[big] - want[big]) / want[big]) < 3e-7
    assert np.all(np.abs(x[~big]) < 1e-30)
    assert abs(x.astype(np.float64).sum() - want.sum()) / want.sum() < 1e-6


@pytest.mark.parametrize("tokens", [1, 5, 512])
def test_residual_layernorm(tokens):
    x = rng.standard_normal((tokens, 384)).astype(np.float32)
    bias, res = rng.standard_normal(384).astype(np.float32), rng.standard_normal((tokens, 384)).astype(np.float32)
    gamma, beta = (1 + 0.1 * rng.standard_normal(384)).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    want = ref_layernorm(x.astype(np.float64) + bias + res, gamma, beta, 1e-12)
    out = np.empty_like(x)
    residual_layernorm(x, bias, res, gamma, beta, 1e-12, out)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    residual_layernorm(x, bias, res, gamma, beta, 1e-12, res)  # in place over the residual, as the encoder does
    np.testing.assert_array_equal(res, out)


def test_layernorm_of_a_constant_row_is_beta():
    x = np.zeros((2, 384), dtype=np.float32)
    beta = rng.standard_normal(384).astype(np.float32)
    out = np.empty_like(x)
    residual_layernorm(x, np.zeros(384, np.float32), x.copy(), np.ones(384, np.float32), beta, 1e-12, out)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np.broadcast_to(beta, out.shape), atol=1e-6)


def test_embed_layernorm():
    word = rng.standard_normal((100, 384)).astype(np.float32)
    pos = rng.standard_normal((512, 384)).astype(np.float32)
    typ = rng.standard_normal(384).astype(np.float32)
    gamma, beta = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    ids = rng.integers(0, 100, 600).astype(np.int32)
    positions = np.concatenate([np.arange(88), np.arange(512)]).astype(np.int32)
    out = np.empty((600, 384), dtype=np.float32)
    embed_layernorm(ids, positions, word, pos, typ, gamma, beta, 1e-12, out)
    want = ref_layernorm(word[ids].astype(np.float64) + pos[positions] + typ, gamma, beta, 1e-12)
    np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[1], [2], [512], [1, 512, 7, 1, 33], [11, 12, 13], [15, 16, 17, 8, 31, 32, 33, 100]])
def test_attention_packed_sequences(lengths):
    heads, hidden = 12, 384
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    qkv = (rng.standard_normal((offsets[-1], 3 * hidden)) * 2).astype(np.float32)
    bias = rng.standard_normal(3 * hidden).astype(np.float32)
    out = np.empty((offsets[-1], hidden), dtype=np.float32)
    attention(qkv, bias, offsets[:-1].copy(), np.diff(offsets), heads, False, out)
    np.testing.assert_allclose(out, ref_attention(qkv, bias, offsets, heads), atol=2e-5, rtol=1e-5)


def test_attention_never_reads_across_sequences():
    heads, hidden = 12, 384
    qkv = rng.standard_normal((10, 3 * hidden)).astype(np.float32)
    bias = np.zeros(3 * hidden, np.float32)
    offsets = np.array([0, 4, 10], dtype=np.int64)
    out = np.empty((10, hidden), np.float32)
    attention(qkv, bias, offsets[:-1].copy(), np.diff(offsets), heads, False, out)
    qkv2 = qkv.copy()
    qkv2[4:] = 1e3  # change the second sequence only
    out2 = np.empty_like(out)
    attention(qkv2, bias, offsets[:-1].copy(), np.diff(offsets), heads, False, out2)
    np.testing.assert_array_equal(out[:4], out2[:4])


def test_vector_attention_never_reads_across_sequences_nor_depends_on_the_padding():
    # sequences of VECTOR_FROM tokens or more take the eight-row blocks (keys padded to 16, queries to 8): two of
    # them of different widths, then a short one (a row at a time)
    from bgesmall.kernels.attention import VECTOR_FROM

    heads, hidden = 12, 384
    offsets = np.array([0, VECTOR_FROM + 1, 2 * VECTOR_FROM + 21, 2 * VECTOR_FROM + 24], dtype=np.int64)
    qkv = rng.standard_normal((offsets[-1], 3 * hidden)).astype(np.float32)
    bias = rng.standard_normal(3 * hidden).astype(np.float32)
    out = np.full((offsets[-1], hidden), np.nan, np.float32)
    attention(qkv, bias, offsets[:-1].copy(), np.diff(offsets), heads, False, out)
    qkv2 = qkv.copy()
    qkv2[offsets[1]:] = 1e3  # the later sequences change
    out2 = np.empty_like(out)
    attention(qkv2, bias, offsets[:-1].copy(), np.diff(offsets), heads, False, out2)
    np.testing.assert_array_equal(out[: offsets[1]], out2[: offsets[1]])
    alone = np.empty((offsets[2] - offsets[1], hidden), np.float32)  # the second sequence alone
    attention(np.ascontiguousarray(qkv[offsets[1]:offsets[2]]), bias, np.zeros(1, np.int64),
              np.array([offsets[2] - offsets[1]]), heads, False, alone)
    np.testing.assert_array_equal(out[offsets[1]:offsets[2]], alone)
    first = np.empty_like(out)  # the [CLS] rows alone (a row at a time) agree with the blocks'/rows' ones
    attention(qkv, bias, offsets[:-1].copy(), np.diff(offsets), heads, True, first)
    np.testing.assert_allclose(first[offsets[:-1]], out[offsets[:-1]], atol=2e-6, rtol=1e-5)


def test_attention_a_row_at_a_time_and_eight_rows_at_a_time_agree_at_every_length():
    # blocks_from, measured per machine (bgesmall/tune.py), sends a sequence to either kernel: both must give the
    # same attention to within summation order, at any length, and each sequence's rows whatever is beside it
    heads, hidden = 12, 384
    lengths = np.array([1, 2, 7, 8, 9, 15, 16, 17, 31, 40, 64, 100], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    qkv = rng.standard_normal((offsets[-1], 3 * hidden)).astype(np.float32)
    bias = rng.standard_normal(3 * hidden).astype(np.float32)
    want = ref_attention(qkv, bias, offsets, heads)
    for blocks_from in (1, 16, 513):
        out = np.full((offsets[-1], hidden), np.nan, np.float32)
        attention(qkv, bias, offsets[:-1].copy(), lengths, heads, False, out, blocks_from)
        np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
        for s in (0, 5, 11):  # alone, bit for bit
            n, start = int(lengths[s]), int(offsets[s])
            alone = np.empty((n, hidden), np.float32)
            attention(np.ascontiguousarray(qkv[start:start + n]), bias, np.zeros(1, np.int64), lengths[s:s + 1],
                      heads, False, alone, blocks_from)
            np.testing.assert_array_equal(alone, out[start:start + n])


def test_kernels_reject_float64_instead_of_recompiling():
    x = np.zeros((2, 8), dtype=np.float64)
    with pytest.raises(TypeError):
        bias_gelu(x, np.zeros(8))


def test_softmax_rows():
    x = (rng.standard_normal((3, 70, 70)) * 5).astype(np.float32)
    want = x.astype(np.float64) * 0.25
    want = np.exp(want - want.max(axis=2, keepdims=True))
    want /= want.sum(axis=2, keepdims=True)
    softmax_rows(x, np.float32(0.25))
    np.testing.assert_allclose(x, want, atol=1e-7, rtol=2e-6)


@pytest.mark.parametrize("first_only", [False, True])
@pytest.mark.parametrize("lengths", [[LONG_SEQUENCE - 1, LONG_SEQUENCE, 3, 512, 1], [LONG_SEQUENCE], [1], [2]])
def test_self_attention_both_paths(lengths, first_only):
    # short sequences take the fused kernel, long ones the BLAS path: both must match the reference.
    # first_only (CLS pooling's last layer): each sequence's first row over all its keys, other rows untouched.
    cfg = BertConfig()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    qkv = (rng.standard_normal((offsets[-1], 3 * cfg.hidden_size)) * 2).astype(np.float32)
    bias = rng.standard_normal(3 * cfg.hidden_size).astype(np.float32)
    out = np.full((offsets[-1], cfg.hidden_size), np.nan, dtype=np.float32)
    self_attention(cfg, qkv, bias, Sequences.from_offsets(offsets), out, first_only=first_only)
    rows = offsets[:-1] if first_only else np.arange(offsets[-1])
    want = ref_attention(qkv, bias, offsets, cfg.num_attention_heads)
    np.testing.assert_allclose(out[rows], want[rows], atol=2e-5, rtol=1e-5)
    assert np.isnan(np.delete(out, rows, axis=0)).all()


# -- the packed matmul ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(384, 1152), (1536, 384), (7, 40), (33, 65), (1, 1), (384, 8), (5, 200)])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 15, 17, 64])
def test_linear_matches_float64(m, k, n):
    # every row-tile path (AVX-512: 8, clamped 8, 4, 1 rows; AVX2: 6, clamped 6, and 1-3 rows across up to four
    # panels, whole groups or not) and a partial last panel (n not a multiple of PANEL)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = pack_columns(w)
    assert packed.shape == (-(-n // PANEL), k, PANEL) and np.array_equal(unpack_columns(packed, n), w)
    assert np.array_equal(unpack_rows(packed, n), w.T) and unpack_rows(packed, n).flags.c_contiguous
    out = np.full((m, n), np.nan, dtype=np.float32)
    linear(x, packed, out)
    want = x.astype(np.float64) @ w
    # float32 summation of k products: error grows like sqrt(k) rounding steps of the sum of their magnitudes
    bound = 4 * np.finfo(np.float32).eps * math.sqrt(k) * (np.abs(x).astype(np.float64) @ np.abs(w))
    assert np.all(np.abs(out - want) <= bound + 1e-30)


def test_linear_rows_do_not_depend_on_their_neighbours():
    # a row's result is bit-identical whichever tile (8, 4 or 1 rows) computes it: batch invariance rests on it
    x = rng.standard_normal((17, 384)).astype(np.float32)
    w = pack_columns(rng.standard_normal((384, 96)).astype(np.float32))
    full = np.empty((17, 96), dtype=np.float32)
    linear(x, w, full)
    for rows in ([16], [5, 6], [0, 3, 9, 12], list(range(9))):
        part = np.empty((len(rows), 96), dtype=np.float32)
        linear(np.ascontiguousarray(x[rows]), w, part)
        np.testing.assert_array_equal(part, full[rows])


@pytest.mark.parametrize("parts", [1, 2, 3, 50])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8])
def test_linear_split_equals_linear(parts, m):
    # each thread's run of panels may start or end inside a group of panels (AVX2): the same numbers all the same
    x = rng.standard_normal((m, 384)).astype(np.float32)
    w = pack_columns(rng.standard_normal((384, 1152)).astype(np.float32))
    want = np.empty((m, 1152), dtype=np.float32)
    linear(x, w, want)
    got = np.full_like(want, np.nan)
    linear_split(x, w, got, parts)
    np.testing.assert_array_equal(got, want)


HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sse,+sse2,"
                    "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512bw,-avx512dq,-avx512vl,-avx512cd")


def test_linear_on_a_cpu_without_avx512(tmp_path):
    """The AVX2 tile (kernels/matmul.py, WIDE_REGISTERS False), compiled as numba would for a Haswell CPU: the same
    linear and attention tests, run in a subprocess (the choice is frozen at import)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"forces an x86 target (Haswell's features): cannot run on {platform.machine()}")
    if os.environ.get("NUMBA_CPU_FEATURES"):
        pytest.skip("this run already targets a chosen CPU")
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES,
               NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    # ... and on such a CPU nothing of the bf16 tier is compiled, even when it is asked for
    check = ("import warnings; warnings.simplefilter('ignore'); import bgesmall.kernels.matmul as m; "
             "from bgesmall.kernels.simd import has_avx512; assert not has_avx512() and not m.HAS_BF16; "
             f"import bgesmall; assert bgesmall.load({str(minilm_path())!r}, precision='bf16').precision == 'fp32'; "
             "assert m.linear_bf16_panels._disp is None and m.linear_bf16_split._disp is None")
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "linear or attention"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


def test_linear_kernels_refuse_mismatched_shapes():
    w = pack_columns(rng.standard_normal((8, 40)).astype(np.float32))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    for bad_x, bad_out in [(x, np.empty((3, 80), np.float32)), (x[:, :4].copy(), np.empty((3, 40), np.float32)),
                           (x, np.empty((2, 40), np.float32))]:
        with pytest.raises(ValueError, match="shapes do not match"):
            linear(bad_x, w, bad_out)
        with pytest.raises(ValueError, match="shapes do not match"):
            linear_split(bad_x, w, bad_out, 2)


# -- the bf16 tier's matmul: pairs of bfloat16 through vdpbf16ps --------------------------------------------------

needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512_BF16: the bf16 kernels are compiled "
                                "only where it exists (on this CPU a bf16 model runs the exact tier: test_bf16.py)")


def test_round_bf16_to_nearest_ties_to_even():
    one, ulp = 1.0, 2.0 ** -7  # bf16 keeps 7 bits of mantissa
    x = np.array([one, one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0 ** -20, -2.5, 0.0, -0.0, np.inf, -np.inf,
                  3.4e38, 1e-40], dtype=np.float32)
    got = bf16_to_f32(round_bf16(x))
    want = np.array([one, one, one + 2 * ulp, one + ulp, -2.5, 0.0, -0.0, np.inf, -np.inf, np.inf, 1e-40],
                    dtype=np.float32)
    np.testing.assert_array_equal(got[:-1], want[:-1])  # halfway: to the even neighbour; past it: up; overflow: inf
    assert 0 < abs(got[-1] - 1e-40) <= 2.0 ** -134 and np.signbit(got[6])  # subnormals to half a step (2^-133), -0 stays -0
    assert np.isnan(bf16_to_f32(round_bf16(np.array([np.nan, -np.nan], np.float32)))).all()


def test_to_pairs_rounds_as_numpy_does():
    # the kernels' own rounding of x (integer code: compiles on every CPU) against round_bf16, odd k included
    for m, k in [(3, 8), (2, 7), (1, 1), (4, 384)]:
        x = (rng.standard_normal((m, k)) * 10.0 ** rng.integers(-8, 8, (m, k))).astype(np.float32)
        x[0, 0] = np.nan
        pairs = matmul._to_pairs(x)
        bits = np.zeros((m, 2 * pairs.shape[1]), np.uint16)
        bits[:, :k] = round_bf16(x)
        np.testing.assert_array_equal(pairs, bits.view(np.uint32))


@pytest.mark.parametrize("k, n", [(384, 1152), (1536, 384), (7, 40), (1, 1), (33, 65)])
def test_pack_pairs_keeps_the_bf16_values(k, n):
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = pack_pairs(w)
    assert packed.dtype == np.uint32 and packed.shape == (-(-n // PANEL), -(-k // 2), PANEL)
    assert packed.nbytes <= pack_columns(w).nbytes // 2 + PANEL * 4 * -(-n // PANEL)  # half, but for an odd k's pad
    np.testing.assert_array_equal(unpack_pairs(packed, k, n), bf16_to_f32(round_bf16(w)))


def _bf16_reference(x, w):
    # the float64 product of the bf16 values: what vdpbf16ps computes, but for its float32 sums
    return bf16_to_f32(round_bf16(x)).astype(np.float64) @ bf16_to_f32(round_bf16(w)).astype(np.float64)


@needs_bf16
@pytest.mark.parametrize("k, n", [(384, 1152), (1536, 384), (7, 40), (33, 65), (1, 1), (384, 8)])
@pytest.mark.parametrize("m", [0, 1, 2, 4, 5, 8, 9, 13, 64])
def test_bf16_linear_matches_the_bf16_values_in_float64(m, k, n):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    out = np.full((m, n), np.nan, dtype=np.float32)
    matmul.linear_bf16(x, pack_pairs(w), out)
    xb, wb = bf16_to_f32(round_bf16(x)).astype(np.float64), bf16_to_f32(round_bf16(w)).astype(np.float64)
    bound = 4 * np.finfo(np.float32).eps * math.sqrt(k) * (np.abs(xb) @ np.abs(wb))  # float32 sums only
    assert np.all(np.abs(out - _bf16_reference(x, w)) <= bound + 1e-30)


@needs_bf16
def test_bf16_linear_rows_do_not_depend_on_their_neighbours():
    x = rng.standard_normal((17, 384)).astype(np.float32)
    w = pack_pairs(rng.standard_normal((384, 96)).astype(np.float32))
    full = np.empty((17, 96), dtype=np.float32)
    matmul.linear_bf16(x, w, full)
    for rows in ([16], [5, 6], [0, 3, 9, 12], list(range(9))):
        part = np.empty((len(rows), 96), dtype=np.float32)
        matmul.linear_bf16(np.ascontiguousarray(x[rows]), w, part)
        np.testing.assert_array_equal(part, full[rows])
    blocked = np.empty_like(full)
    matmul.linear_bf16(x, w, blocked, 4)
    np.testing.assert_array_equal(blocked, full)


@needs_bf16
@pytest.mark.parametrize("parts", [1, 2, 3, 50])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bf16_linear_split_equals_linear(parts, m):
    x = rng.standard_normal((m, 384)).astype(np.float32)
    w = pack_pairs(rng.standard_normal((384, 1152)).astype(np.float32))
    want = np.empty((m, 1152), dtype=np.float32)
    matmul.linear_bf16(x, w, want)
    got = np.full_like(want, np.nan)
    matmul.linear_bf16_split(x, w, got, parts)
    np.testing.assert_array_equal(got, want)


@needs_bf16
def test_bf16_linear_refuses_mismatched_shapes():
    w = pack_pairs(rng.standard_normal((8, 40)).astype(np.float32))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    for bad_x, bad_out in [(x, np.empty((3, 80), np.float32)), (x[:, :5].copy(), np.empty((3, 40), np.float32)),
                           (x, np.empty((2, 40), np.float32))]:
        with pytest.raises(ValueError, match="shapes do not match"):
            matmul.linear_bf16(bad_x, w, bad_out)
        with pytest.raises(ValueError, match="shapes do not match"):
            matmul.linear_bf16_split(bad_x, w, bad_out, 2)
