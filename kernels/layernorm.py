"""LayerNorm fused with what comes before it: the residual add, or the embedding lookup.

Mean and variance are accumulated in float64 over the row (384 values), then applied in float32, as
torch.nn.LayerNorm does: y = (x - mean) / sqrt(var + eps) * gamma + beta, biased variance.
"""

import numpy as np

from .jit import kernel


@kernel("void(f4[:, ::1], f4[::1], f4[:, ::1], f4[::1], f4[::1], f8, f4[:, ::1])")
def residual_layernorm(x, bias, residual, gamma, beta, eps, out):
    # x [tokens, hidden] (a linear layer's output, bias not yet added), bias [hidden],
    # residual [tokens, hidden], gamma [hidden], beta [hidden] -> out = LayerNorm(x + bias + residual)
    # (out may be residual itself: each row is read fully before it is written)
    n = x.shape[1]
    y = np.empty(n, dtype=np.float32)
    for t in range(x.shape[0]):
        xr, rr, orow = x[t], residual[t], out[t]
        total = 0.0
        for j in range(n):
            y[j] = xr[j] + bias[j] + rr[j]
            total += y[j]
        mean = total / n
        var = 0.0
        for j in range(n):
            dv = y[j] - mean
            var += dv * dv
        rstd = np.float32(1.0 / np.sqrt(var / n + eps))
        mean32 = np.float32(mean)
        for j in range(n):
            orow[j] = (y[j] - mean32) * rstd * gamma[j] + beta[j]


@kernel("void(i4[::1], i4[::1], f4[:, ::1], f4[:, ::1], f4[::1], f4[::1], f4[::1], f8, f4[:, ::1])")
def embed_layernorm(ids, positions, word, position, token_type, gamma, beta, eps, out):
    # ids [tokens], positions [tokens], word [vocab, hidden], position [max_pos, hidden], token_type [hidden]
    # (segment 0's row), gamma, beta [hidden] -> out [tokens, hidden] = LayerNorm(word[id] + position[pos] + type)
    n = out.shape[1]
    for t in range(ids.shape[0]):
        wr, pr, orow = word[ids[t]], position[positions[t]], out[t]
        total = 0.0
        for j in range(n):
            orow[j] = wr[j] + pr[j] + token_type[j]
            total += orow[j]
        mean = total / n
        var = 0.0
        for j in range(n):
            dv = orow[j] - mean
            var += dv * dv
        rstd = np.float32(1.0 / np.sqrt(var / n + eps))
        mean32 = np.float32(mean)
        for j in range(n):
            orow[j] = (orow[j] - mean32) * rstd * gamma[j] + beta[j]
