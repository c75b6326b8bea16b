"""The BERT encoder, layer by layer, over packed token rows.

A batch of sequences is packed back to back into one [tokens, hidden] matrix, with `offsets` marking where
each sequence starts (offsets[s]:offsets[s + 1]). No padding exists, so none can leak into a result, and each
linear layer is one large matrix product over every token of the batch. Mirrors transformers'
`modeling_bert.py` (BertEmbeddings, BertSelfAttention, BertSelfOutput, BertIntermediate, BertOutput):

    x = LayerNorm(word[ids] + position[pos] + token_type[0])
    per layer:  x = LayerNorm(x + attention(x) W_o + b_o)
                x = LayerNorm(x + gelu(x W_i + b_i) W_f + b_f)

Shortcuts, stated openly: single-segment input only (token type 0, as embedding models use); no head mask,
no cross-attention, no KV cache. Attention takes one of two paths by sequence length (`self_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BertConfig
from .kernels import attention, bias_gelu, embed_layernorm, residual_layernorm, softmax_rows
from .weights import BertWeights, LayerWeights


@dataclass
class Workspace:
    """Preallocated activation buffers for up to `capacity` tokens (llama2.c's RunState); grown on demand."""

    capacity: int
    x: np.ndarray  # [capacity, hidden]        the residual stream
    qkv: np.ndarray  # [capacity, 3 * hidden]  fused query | key | value projections
    ctx: np.ndarray  # [capacity, hidden]      attention output, heads side by side
    proj: np.ndarray  # [capacity, hidden]     output of a projection back to hidden width
    ffn: np.ndarray  # [capacity, ffn]         FFN inner activations

    @classmethod
    def allocate(cls, cfg: BertConfig, capacity: int) -> "Workspace":
        h, f = cfg.hidden_size, cfg.intermediate_size

        def buf(width):
            return np.empty((capacity, width), dtype=np.float32)

        return cls(capacity, buf(h), buf(3 * h), buf(h), buf(h), buf(f))

    def views(self, tokens: int) -> "Workspace":
        """The first `tokens` rows of every buffer (C-contiguous views, no copy)."""
        return Workspace(tokens, self.x[:tokens], self.qkv[:tokens], self.ctx[:tokens], self.proj[:tokens], self.ffn[:tokens])


def embeddings(cfg: BertConfig, w: BertWeights, ids: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
    # ids [tokens] int32, positions [tokens] int32 -> out [tokens, hidden]
    e = w.embeddings
    embed_layernorm(ids, positions, e.word, e.position, e.token_type[0], e.ln_gamma, e.ln_beta, cfg.layer_norm_eps, out)


# From this length on, a sequence's attention runs as two BLAS GEMMs per head around the numba softmax; shorter
# ones (queries, short sentences) take the fused numba kernel. Measured on one thread (benchmarks/opprofile.py):
# the GEMM path is about 2x the fused kernel's rate at 64-512 tokens and still ahead at 16, while for a
# 9-token query the fused kernel wins (8.8 vs 9.5 ms), numpy's per-call overhead dominating there.
LONG_SEQUENCE = 16


@dataclass(frozen=True)
class Sequences:
    """Where each packed sequence lives, split by the attention path it takes."""

    offsets: np.ndarray  # [sequences + 1] int64
    short_starts: np.ndarray  # [short sequences] int64
    short_lengths: np.ndarray  # [short sequences] int64
    long_spans: tuple[tuple[int, int], ...]  # (start, end) of each sequence of LONG_SEQUENCE tokens or more

    @classmethod
    def from_offsets(cls, offsets: np.ndarray) -> "Sequences":
        starts, lengths = offsets[:-1], np.diff(offsets)
        short = lengths < LONG_SEQUENCE
        spans = tuple((int(s), int(s + n)) for s, n in zip(starts[~short], lengths[~short]))
        return cls(offsets, np.ascontiguousarray(starts[short]), np.ascontiguousarray(lengths[short]), spans)


def self_attention(cfg: BertConfig, qkv: np.ndarray, qkv_b: np.ndarray, seqs: Sequences, out: np.ndarray) -> None:
    # qkv [tokens, 3 hidden] (bias not yet added), qkv_b [3 hidden] -> out [tokens, hidden]
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    d = hidden // heads
    attention(qkv, qkv_b, seqs.short_starts, seqs.short_lengths, heads, out)
    for start, end in seqs.long_spans:
        n = end - start
        rows = qkv[start:end] + qkv_b  # [n, 3 hidden]
        q = rows[:, :hidden].reshape(n, heads, d).transpose(1, 0, 2)  # [heads, n, d]
        k_t = rows[:, hidden : 2 * hidden].reshape(n, heads, d).transpose(1, 2, 0)  # [heads, d, n]
        v = rows[:, 2 * hidden :].reshape(n, heads, d).transpose(1, 0, 2)  # [heads, n, d]
        scores = np.matmul(q, k_t)  # [heads, n, n]
        softmax_rows(scores, np.float32(1.0 / np.sqrt(d)))
        out[start:end].reshape(n, heads, d).transpose(1, 0, 2)[...] = np.matmul(scores, v)  # [heads, n, d]


def encoder_layer(cfg: BertConfig, lw: LayerWeights, seqs: Sequences, ws: Workspace) -> None:
    # ws.x [tokens, hidden] -> ws.x [tokens, hidden], in place
    eps = cfg.layer_norm_eps
    np.matmul(ws.x, lw.qkv_w, out=ws.qkv)  # [tokens, hidden] @ [hidden, 3 hidden] -> [tokens, 3 hidden]
    self_attention(cfg, ws.qkv, lw.qkv_b, seqs, ws.ctx)  # -> [tokens, hidden]
    np.matmul(ws.ctx, lw.attn_out_w, out=ws.proj)  # [tokens, hidden] @ [hidden, hidden]
    residual_layernorm(ws.proj, lw.attn_out_b, ws.x, lw.attn_ln_gamma, lw.attn_ln_beta, eps, ws.x)
    np.matmul(ws.x, lw.ffn_in_w, out=ws.ffn)  # [tokens, hidden] @ [hidden, ffn] -> [tokens, ffn]
    bias_gelu(ws.ffn, lw.ffn_in_b)  # [tokens, ffn], in place
    np.matmul(ws.ffn, lw.ffn_out_w, out=ws.proj)  # [tokens, ffn] @ [ffn, hidden] -> [tokens, hidden]
    residual_layernorm(ws.proj, lw.ffn_out_b, ws.x, lw.ffn_ln_gamma, lw.ffn_ln_beta, eps, ws.x)


def encode(cfg: BertConfig, w: BertWeights, ids: np.ndarray, offsets: np.ndarray, ws: Workspace) -> np.ndarray:
    # ids [tokens] int32 (sequences packed back to back), offsets [sequences + 1] int64
    # -> final hidden states [tokens, hidden] (a view of ws.x: copy what you keep before the next call)
    tokens = ids.shape[0]
    ws = ws.views(tokens)
    positions = (np.arange(tokens, dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets))).astype(np.int32)
    embeddings(cfg, w, ids, positions, ws.x)
    seqs = Sequences.from_offsets(offsets)
    for lw in w.layers:
        encoder_layer(cfg, lw, seqs, ws)
    return ws.x


def pool(hidden: np.ndarray, offsets: np.ndarray, mode: str) -> np.ndarray:
    # hidden [tokens, hidden], offsets [sequences + 1] -> [sequences, hidden]
    if mode == "cls":
        return hidden[offsets[:-1]].copy()
    sums = np.add.reduceat(hidden, offsets[:-1], axis=0, dtype=np.float64)
    return (sums / np.diff(offsets)[:, None]).astype(np.float32)


def l2_normalize(v: np.ndarray) -> np.ndarray:
    # [n, dim] -> [n, dim], unit rows (a zero row stays zero)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))
    return (v / np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
