"""Self-attention over packed sequences: scores, softmax and the weighted sum of values, fused.

Sequences are packed back to back without padding, so there is nothing to mask: sequence s owns token rows
starts[s]:starts[s] + lengths[s], and attention never reads outside them. Each (sequence, head) pair is
independent. `attention` is the fused kernel, best for short sequences; for long ones the encoder runs the two
products as BLAS GEMMs around `softmax_rows` (see bgesmall/encoder.py, `self_attention`).
Mirrors transformers' `BertSelfAttention` (eager path): softmax(q k^T / sqrt(d) + mask) v, with the query,
key and value biases added here rather than in a separate pass.

The fused kernel keeps each sequence's keys (bias added) in a row-major scratch and computes every score as a
dot product along the head dimension, so nothing is transposed or padded: about 4x faster than a transposed,
padded layout for the short sequences it serves. (Slicing or calling a function inside these loops costs numba a
reference-count update each time: the loops index 2-D arrays directly.)
"""

import numpy as np

from .activations import exp_nonpositive
from .jit import kernel


# reassoc + contract only (no nnan/ninf): sums may be reordered so they vectorize; inf and NaN keep their meaning.
@kernel("void(f4[:, ::1], f4[::1], i8[::1], i8[::1], i8, b1, f4[:, ::1])", fastmath={"contract", "reassoc"})
def attention(qkv, qkv_b, starts, lengths, num_heads, first_only, out):
    # qkv [tokens, 3 * hidden] (query | key | value, bias not yet added), qkv_b [3 * hidden],
    # starts, lengths [sequences], out [tokens, hidden] <- per sequence and head h: softmax(q_h k_h^T / sqrt(d)) v_h
    # (rows of out outside the given sequences are left as they are). first_only: only each sequence's first
    # query row (its [CLS] token) is computed and written, over all of its keys and values.
    hidden = out.shape[1]
    d = hidden // num_heads
    scale = np.float32(1.0 / np.sqrt(d))
    longest = 0
    for s in range(starts.shape[0]):
        longest = max(longest, lengths[s])
    k = np.empty((longest, hidden), dtype=np.float32)  # keys of one sequence, every head, bias added
    q = np.empty(hidden, dtype=np.float32)  # one query row, every head, bias added and scaled
    p_buf = np.empty(longest, dtype=np.float32)  # scores, then probabilities, of one (query row, head)
    bits = np.empty(longest, dtype=np.int32)  # scratch for exp
    acc = np.empty(d, dtype=np.float32)
    for s in range(starts.shape[0]):
        start, n = starts[s], lengths[s]
        p = p_buf[:n]
        for j in range(n):
            for c in range(hidden):
                k[j, c] = qkv[start + j, hidden + c] + qkv_b[hidden + c]
        for i in range(1 if first_only else n):
            for c in range(hidden):
                q[c] = (qkv[start + i, c] + qkv_b[c]) * scale
            for h in range(num_heads):
                o, vo = h * d, 2 * hidden + h * d
                for j in range(n):  # scores: one dot product of length d per key
                    t = np.float32(0.0)
                    for c in range(d):
                        t += q[o + c] * k[j, o + c]
                    p[j] = t
                m = p[0]
                for j in range(1, n):
                    m = max(m, p[j])
                for j in range(n):
                    p[j] -= m
                exp_nonpositive(p, bits[:n])
                total = np.float32(0.0)
                for j in range(n):
                    total += p[j]
                inv = np.float32(1.0) / total
                for c in range(d):
                    acc[c] = 0.0
                for j in range(n):  # weighted sum of the values: [n] x [n, d] -> [d]
                    pj = p[j]
                    for c in range(d):
                        acc[c] += pj * qkv[start + j, vo + c]
                for c in range(d):  # the values' bias, added once: the weights sum to 1
                    out[start + i, o + c] = acc[c] * inv + qkv_b[vo + c]


@kernel("void(f4[:, :, ::1], f4)", fastmath={"contract", "reassoc"})
def softmax_rows(x, scale):  # [heads, n, n] raw scores -> softmax(x * scale) along the last axis, in place
    n = x.shape[2]
    bits = np.empty(n, dtype=np.int32)
    for h in range(x.shape[0]):
        for i in range(x.shape[1]):
            row = x[h, i]
            m = row[0]
            for j in range(n):
                m = max(m, row[j])
            for j in range(n):
                row[j] = (row[j] - m) * scale
            exp_nonpositive(row, bits)
            total = np.float32(0.0)
            for j in range(n):
                total += row[j]
            inv = np.float32(1.0) / total
            for j in range(n):
                row[j] *= inv
