"""Self-attention over packed sequences: scores, softmax and the weighted sum of values, fused.

Sequences are packed back to back without padding, so there is nothing to mask: sequence s owns token rows
offsets[s]:offsets[s + 1], and attention never reads outside them. Each (sequence, head) pair is independent. Mirrors transformers' `BertSelfAttention` (eager path):
softmax(q k^T / sqrt(d) + mask) v, with the query/key/value biases added here rather than in a separate pass.
"""

import numpy as np

from .activations import exp_nonpositive
from .jit import kernel


@kernel("void(f4[:, ::1], f4[::1], i8[::1], i8, f4[:, ::1])")
def attention(qkv, qkv_b, offsets, num_heads, out):
    # qkv [tokens, 3 * hidden] (query | key | value, bias not yet added), qkv_b [3 * hidden],
    # offsets [sequences + 1], out [tokens, hidden] <- per head h: softmax(q_h k_h^T / sqrt(d)) v_h
    hidden = out.shape[1]
    d = hidden // num_heads
    scale = np.float32(1.0 / np.sqrt(d))
    n_seq = offsets.shape[0] - 1
    longest = 0
    for s in range(n_seq):
        longest = max(longest, offsets[s + 1] - offsets[s])
    # Scratch, reused by every (sequence, head): keys transposed to [d, length] so the score loop runs along
    # contiguous keys; values [length, d]; one row of scores.
    k_t_buf = np.empty(d * longest, dtype=np.float32)
    v_buf = np.empty(longest * d, dtype=np.float32)
    q = np.empty(d, dtype=np.float32)
    p_buf = np.empty(longest, dtype=np.float32)
    bits_buf = np.empty(longest, dtype=np.int32)
    acc = np.empty(d, dtype=np.float32)
    for task in range(n_seq * num_heads):
        s, h = task // num_heads, task % num_heads
        start, length = offsets[s], offsets[s + 1] - offsets[s]
        qo, ko, vo = h * d, hidden + h * d, 2 * hidden + h * d
        k_t = k_t_buf[: d * length].reshape((d, length))
        v = v_buf[: length * d].reshape((length, d))
        p = p_buf[:length]
        bits = bits_buf[:length]
        for j in range(length):
            row = qkv[start + j]
            for c in range(d):
                k_t[c, j] = row[ko + c] + qkv_b[ko + c]
                v[j, c] = row[vo + c] + qkv_b[vo + c]
        for i in range(length):
            row = qkv[start + i]
            for c in range(d):
                q[c] = (row[qo + c] + qkv_b[qo + c]) * scale
            p[:] = 0.0
            for c in range(d):  # p = q k^T: [d] x [d, length] -> [length]
                qc = q[c]
                kc = k_t[c]
                for j in range(length):
                    p[j] += qc * kc[j]
            m = p[0]
            for j in range(1, length):
                m = max(m, p[j])
            for j in range(length):
                p[j] -= m
            inv = np.float32(1.0) / exp_nonpositive(p, bits)
            acc[:] = 0.0
            for j in range(length):  # acc = p v: [length] x [length, d] -> [d]
                pj = p[j]
                vj = v[j]
                for c in range(d):
                    acc[c] += pj * vj[c]
            o = out[start + i]
            for c in range(d):
                o[qo + c] = acc[c] * inv
