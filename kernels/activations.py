"""Elementwise math: erf, exact GELU fused with its bias, and exp for softmax, all vectorizable.

libm's `erf` and `exp` are scalar calls that LLVM cannot vectorize without SVML; the versions here are pure
float32 arithmetic, so a row loop compiles to AVX-512 code. Accuracy is checked against `math.erf` and
`math.exp` in tests/test_kernels.py.
"""

import numpy as np

from .jit import inner, kernel, leaf

# erf(x) = x * P(x^2) / Q(x^2) on [-4, 4] (clamped beyond: |erf(4)| = 1 - 1.5e-8): the rational
# approximation of Eigen's `generic_fast_erf_float` / XLA, a few float32 ulp from exact.
_A13, _A11, _A9, _A7 = -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05
_A5, _A3, _A1 = -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02
_B8, _B6, _B4, _B2, _B0 = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)
_INV_SQRT2 = 0.7071067811865476


@leaf()
def erf(x):  # f4 -> f4
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(_A13)
    p = p * x2 + np.float32(_A11)
    p = p * x2 + np.float32(_A9)
    p = p * x2 + np.float32(_A7)
    p = p * x2 + np.float32(_A5)
    p = p * x2 + np.float32(_A3)
    p = p * x2 + np.float32(_A1)
    q = np.float32(_B8)
    q = q * x2 + np.float32(_B6)
    q = q * x2 + np.float32(_B4)
    q = q * x2 + np.float32(_B2)
    q = q * x2 + np.float32(_B0)
    return x * p / q


@leaf()
def gelu(x):  # f4 -> f4; exact GELU x * Phi(x), as BERT's "gelu" (not the tanh "gelu_new")
    return np.float32(0.5) * x * (np.float32(1.0) + erf(x * np.float32(_INV_SQRT2)))


@kernel("void(f4[:, ::1], f4[::1])", fastmath={"contract"})
def bias_gelu(x, b):  # [tokens, ffn], [ffn] -> x = gelu(x + b), in place
    for t in range(x.shape[0]):
        row = x[t]
        for j in range(row.shape[0]):
            row[j] = gelu(row[j] + b[j])


# exp(x) for x <= 0 (softmax after subtracting the row max): Cephes' expf. x = n ln2 + r, |r| <= ln2 / 2,
# exp(r) by a degree-6 polynomial, 2^n built from its exponent bits in an int32 scratch row (numba has no
# scalar bitcast, an array view does the same and keeps both loops vectorizable).
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_P5, _P4, _P3, _P2, _P1, _P0 = 1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1


@inner(fastmath={"contract"})
def exp_nonpositive(x, bits):  # f4 [n] (all <= 0), i4 [n] scratch -> x = exp(x) in place
    n = x.shape[0]
    scale = bits[:n].view(np.float32)
    for j in range(n):
        v = max(x[j], np.float32(-87.0))
        k = np.floor(v * np.float32(_LOG2E) + np.float32(0.5))
        r = v - k * np.float32(_LN2_HI) - k * np.float32(_LN2_LO)
        p = np.float32(_P5)
        p = p * r + np.float32(_P4)
        p = p * r + np.float32(_P3)
        p = p * r + np.float32(_P2)
        p = p * r + np.float32(_P1)
        p = p * r + np.float32(_P0)
        x[j] = p * r * r + r + np.float32(1.0)
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    for j in range(n):
        x[j] *= scale[j]
