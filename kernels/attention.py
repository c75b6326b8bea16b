"""Self-attention over packed sequences: scores, softmax and the weighted sum of values, fused.

Sequences are packed back to back without padding, so there is nothing to mask: sequence s owns token rows
starts[s]:starts[s] + lengths[s], and attention never reads outside them. Each (sequence, head) pair is
independent. `attention` is the fused kernel, best for short sequences; for long ones the encoder runs the two
products as BLAS GEMMs around `softmax_rows` (see bgesmall/encoder.py, `self_attention`).
Mirrors transformers' `BertSelfAttention` (eager path): softmax(q k^T / sqrt(d) + mask) v, with the query,
key and value biases added here rather than in a separate pass.

Layout, chosen so that every inner loop runs over contiguous memory and vectorizes: keys and values are
copied per head into [d, length] scratch (transposed), zero-padded to a multiple of 16 columns so no loop
ends in a scalar remainder. Scores for one query row accumulate along the keys (an axpy per head dimension);
the weighted sum is one dot product per head dimension. (Slicing or calling a function inside these loops
costs numba a reference-count update each time: the loops index 2-D scratch directly.) Padded columns carry probability 0.
"""

import numpy as np

from .activations import exp_nonpositive
from .jit import kernel

LANES = 16  # float32 lanes of an AVX-512 register


# reassoc + contract only (no nnan/ninf): sums may be reordered so they vectorize; inf and NaN keep their meaning.
@kernel("void(f4[:, ::1], f4[::1], i8[::1], i8[::1], i8, f4[:, ::1])", fastmath={"contract", "reassoc"})
def attention(qkv, qkv_b, starts, lengths, num_heads, out):
    # qkv [tokens, 3 * hidden] (query | key | value, bias not yet added), qkv_b [3 * hidden],
    # starts, lengths [sequences], out [tokens, hidden] <- per sequence and head h: softmax(q_h k_h^T / sqrt(d)) v_h
    # (rows of out outside the given sequences are left as they are)
    hidden = out.shape[1]
    d = hidden // num_heads
    scale = np.float32(1.0 / np.sqrt(d))
    n_seq = starts.shape[0]
    longest = 0
    for s in range(n_seq):
        longest = max(longest, lengths[s])
    width = (longest + LANES - 1) // LANES * LANES
    k_t = np.zeros((d, width), dtype=np.float32)  # keys of one head, [d, padded length]
    v_t = np.zeros((d, width), dtype=np.float32)  # values of one head, [d, padded length]
    p_buf = np.zeros(width, dtype=np.float32)  # scores, then probabilities, of one query row
    bits = np.empty(width, dtype=np.int32)  # scratch for exp
    q = np.empty(d, dtype=np.float32)
    for s in range(n_seq):
        start = starts[s]
        n = lengths[s]
        padded = (n + LANES - 1) // LANES * LANES
        p = p_buf[:padded]
        p_real = p_buf[:n]
        for h in range(num_heads):
            qo, ko, vo = h * d, hidden + h * d, 2 * hidden + h * d
            for j in range(n):
                for c in range(d):
                    k_t[c, j] = qkv[start + j, ko + c] + qkv_b[ko + c]
                    v_t[c, j] = qkv[start + j, vo + c]  # its bias is added after the sum (the weights sum to 1)
            for c in range(d):
                for j in range(n, padded):
                    k_t[c, j] = 0.0
                    v_t[c, j] = 0.0
            for i in range(n):
                for c in range(d):
                    q[c] = (qkv[start + i, qo + c] + qkv_b[qo + c]) * scale
                for j in range(padded):
                    p[j] = 0.0
                for c in range(d):  # scores: [d] x [d, padded] -> [padded]
                    qc = q[c]
                    for j in range(padded):
                        p[j] += qc * k_t[c, j]
                m = p[0]
                for j in range(1, n):
                    m = max(m, p[j])
                for j in range(n):
                    p[j] -= m
                exp_nonpositive(p_real, bits)
                total = np.float32(0.0)
                for j in range(n):
                    total += p[j]
                inv = np.float32(1.0) / total
                for j in range(n, padded):
                    p[j] = 0.0
                for c in range(d):  # weighted sum: [padded] . [padded] per head dimension
                    acc = np.float32(0.0)
                    for j in range(padded):
                        acc += p[j] * v_t[c, j]
                    out[start + i, qo + c] = acc * inv + qkv_b[vo + c]


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
