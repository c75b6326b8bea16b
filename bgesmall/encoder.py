"""The BERT encoder, layer by layer, over packed token rows.

A batch of sequences is packed back to back into one [tokens, hidden] matrix, with `offsets` marking where
each sequence starts (offsets[s]:offsets[s + 1]). No padding exists, so none can leak into a result, and each
linear layer is one large matrix product over every token of the batch. Mirrors transformers'
`modeling_bert.py` (BertEmbeddings, BertSelfAttention, BertSelfOutput, BertIntermediate, BertOutput):

    x = LayerNorm(word[ids] + position[pos] + token_type[0])
    per layer:  x = LayerNorm(x + attention(x) W_o + b_o)
                x = LayerNorm(x + gelu(x W_i + b_i) W_f + b_f)

Shortcuts, stated openly: single-segment input only (token type 0, as embedding models use); no head mask,
no cross-attention, no KV cache. Attention takes one of three paths by sequence length (`self_attention`): for
heads of 32 the fused kernel a query row at a time, or eight rows at a time (from the plan's blocks_from), and
from the plan's long_sequence two BLAS products per head around the numba softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BertConfig
from .kernels import attention, bias_gelu, embed_layernorm, residual_layernorm, softmax_rows
from .kernels.attention import VECTOR_FROM
from .weights import BertWeights, LayerWeights


# The FFN runs over at most this many rows at a time (its inner activations are the widest buffer: at 2048 tokens
# 12.6 MB per worker, 3 MB in chunks of 512). Every step of it works row by row, and the linear kernels give a row
# the same bits whatever rows surround it, so chunking changes no result; 512 rows keep each product large.
FFN_ROWS = 512


@dataclass
class Workspace:
    """Preallocated activation buffers for up to `capacity` tokens (llama2.c's RunState); grown on demand."""

    capacity: int
    x: np.ndarray  # [capacity, hidden]        the residual stream
    qkv: np.ndarray  # [capacity, 3 * hidden]  fused query | key | value projections
    ctx: np.ndarray  # [capacity, hidden]      attention output, heads side by side
    proj: np.ndarray  # [capacity, hidden]     output of a projection back to hidden width
    ffn: np.ndarray  # [min(capacity, FFN_ROWS), ffn]  FFN inner activations of one chunk of rows

    @classmethod
    def allocate(cls, cfg: BertConfig, capacity: int) -> "Workspace":
        h, f = cfg.hidden_size, cfg.intermediate_size

        def buf(rows, width):
            return np.empty((rows, width), dtype=np.float32)

        return cls(capacity, buf(capacity, h), buf(capacity, 3 * h), buf(capacity, h), buf(capacity, h),
                   buf(min(capacity, FFN_ROWS), f))

    def views(self, tokens: int) -> "Workspace":
        """The first `tokens` rows of every buffer (C-contiguous views, no copy)."""
        return Workspace(tokens, self.x[:tokens], self.qkv[:tokens], self.ctx[:tokens], self.proj[:tokens],
                         self.ffn[:tokens])


def embeddings(cfg: BertConfig, w: BertWeights, ids: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
    # ids [tokens] int32, positions [tokens] int32 -> out [tokens, hidden]
    e = w.embeddings
    embed_layernorm(ids, positions, e.word, e.position, e.token_type[0], e.ln_gamma, e.ln_beta, cfg.layer_norm_eps, out)


# From this length on (the plan's `long_sequence`, measured per machine: bgesmall/tune.py), a sequence's attention
# runs as two BLAS GEMMs per head around the numba softmax; shorter ones (queries, short sentences) take the fused
# numba kernel. On AMD Zen 4, one thread: the GEMM path is about 2x the fused kernel's rate at 64-512 tokens and
# still ahead at 16, while for a 9-token query the fused kernel wins, numpy's per-call overhead dominating there.
LONG_SEQUENCE = 16


@dataclass(frozen=True)
class Sequences:
    """Where each packed sequence lives, split by the attention path it takes."""

    offsets: np.ndarray  # [sequences + 1] int64
    short_starts: np.ndarray  # [short sequences] int64
    short_lengths: np.ndarray  # [short sequences] int64
    long_spans: tuple[tuple[int, int], ...]  # (start, end) of each sequence of `long_sequence` tokens or more
    blocks_from: int = VECTOR_FROM  # the fused kernel: a query row at a time below this length, 8 rows from it

    @classmethod
    def from_offsets(cls, offsets: np.ndarray, long_sequence: int = LONG_SEQUENCE,
                     blocks_from: int = VECTOR_FROM) -> "Sequences":
        starts, lengths = offsets[:-1], np.diff(offsets)
        short = lengths < long_sequence
        spans = tuple((int(s), int(s + n)) for s, n in zip(starts[~short], lengths[~short]))
        return cls(offsets, np.ascontiguousarray(starts[short]), np.ascontiguousarray(lengths[short]), spans,
                   int(blocks_from))


def self_attention(
    cfg: BertConfig, qkv: np.ndarray, qkv_b: np.ndarray, seqs: Sequences, out: np.ndarray, *, first_only: bool = False
) -> None:
    # qkv [tokens, 3 hidden] (bias not yet added), qkv_b [3 hidden] -> out [tokens, hidden]
    # first_only: only the first row of each sequence is computed (attending to all of its tokens)
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    d = hidden // heads
    attention(qkv, qkv_b, seqs.short_starts, seqs.short_lengths, heads, first_only, out, seqs.blocks_from)
    for start, end in seqs.long_spans:
        n = end - start
        m = 1 if first_only else n  # query rows
        rows = qkv[start:end] + qkv_b  # [n, 3 hidden]
        q = rows[:m, :hidden].reshape(m, heads, d).transpose(1, 0, 2)  # [heads, m, d]
        k_t = rows[:, hidden : 2 * hidden].reshape(n, heads, d).transpose(1, 2, 0)  # [heads, d, n]
        v = rows[:, 2 * hidden :].reshape(n, heads, d).transpose(1, 0, 2)  # [heads, n, d]
        scores = np.matmul(q, k_t)  # [heads, m, n]
        softmax_rows(scores, np.float32(1.0 / np.sqrt(d)))
        out[start : start + m].reshape(m, heads, d).transpose(1, 0, 2)[...] = np.matmul(scores, v)  # [heads, m, d]


def encoder_layer(cfg: BertConfig, lw: LayerWeights, seqs: Sequences, ws: Workspace, parts: int = 1) -> None:
    # ws.x [tokens, hidden] -> ws.x [tokens, hidden], in place
    lw.qkv_w(ws.x, ws.qkv, parts)  # [tokens, hidden] @ [hidden, 3 hidden] -> [tokens, 3 hidden]
    self_attention(cfg, ws.qkv, lw.qkv_b, seqs, ws.ctx)  # -> [tokens, hidden]
    after_attention(cfg, lw, ws, parts)


def after_attention(cfg: BertConfig, lw: LayerWeights, ws: Workspace, parts: int = 1) -> None:
    # ws.ctx [rows, hidden] (attention output), ws.x [rows, hidden] (layer input) -> ws.x [rows, hidden], in place.
    # Every step from here on works row by row, so it may run on any subset of the token rows.
    eps = cfg.layer_norm_eps
    lw.attn_out_w(ws.ctx, ws.proj, parts)  # [rows, hidden] @ [hidden, hidden]
    residual_layernorm(ws.proj, lw.attn_out_b, ws.x, lw.attn_ln_gamma, lw.attn_ln_beta, eps, ws.x)
    chunk = ws.ffn.shape[0]
    for a in range(0, ws.x.shape[0], chunk):  # the FFN, `chunk` rows at a time (FFN_ROWS)
        b = min(a + chunk, ws.x.shape[0])
        ffn = ws.ffn[: b - a]
        lw.ffn_in_w(ws.x[a:b], ffn, parts)  # [rows, hidden] @ [hidden, ffn] -> [rows, ffn]
        bias_gelu(ffn, lw.ffn_in_b)  # [rows, ffn], in place
        lw.ffn_out_w(ffn, ws.proj[a:b], parts)  # [rows, ffn] @ [ffn, hidden] -> [rows, hidden]
    residual_layernorm(ws.proj, lw.ffn_out_b, ws.x, lw.ffn_ln_gamma, lw.ffn_ln_beta, eps, ws.x)


def last_layer_first_tokens(cfg: BertConfig, lw: LayerWeights, seqs: Sequences, ws: Workspace, parts: int = 1) -> np.ndarray:
    # ws.x [tokens, hidden] -> [sequences, hidden]: the last layer's output at each sequence's first token only.
    # CLS pooling reads nothing else, and past attention every step works row by row, so the output projection
    # and FFN of the other rows (5/6 of the layer's matmul work at 9 of every 12 of its FLOPs) are skipped.
    # Keys and values are still needed for every token.
    lw.qkv_w(ws.x, ws.qkv, parts)  # [tokens, hidden] @ [hidden, 3 hidden] -> [tokens, 3 hidden]
    self_attention(cfg, ws.qkv, lw.qkv_b, seqs, ws.ctx, first_only=True)  # -> ws.ctx[first rows]
    first = seqs.offsets[:-1]
    n = first.shape[0]
    # gathered copies of the first rows; proj, ffn and qkv reused as scratch
    firsts = Workspace(n, ws.x[first], ws.qkv[:n], ws.ctx[first], ws.proj[:n], ws.ffn[:n])
    after_attention(cfg, lw, firsts, parts)
    return firsts.x


def encode(
    cfg: BertConfig, w: BertWeights, ids: np.ndarray, offsets: np.ndarray, ws: Workspace, pooling: str, parts: int = 1,
    long_sequence: int = LONG_SEQUENCE, blocks_from: int = VECTOR_FROM,
) -> np.ndarray:
    # ids [tokens] int32 (sequences packed back to back), offsets [sequences + 1] int64
    # -> pooled final hidden states [sequences, hidden], not normalized; parts: threads sharing each matmul;
    # long_sequence, blocks_from: the attention paths' thresholds (the plan's). The linear layers run as their
    # weights were prepared for the plan (bgesmall/linear.py).
    tokens = ids.shape[0]
    ws = ws.views(tokens)
    positions = (np.arange(tokens, dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets))).astype(np.int32)
    embeddings(cfg, w, ids, positions, ws.x)
    seqs = Sequences.from_offsets(offsets, long_sequence, blocks_from)
    for lw in w.layers[:-1]:
        encoder_layer(cfg, lw, seqs, ws, parts)
    if pooling == "cls":
        return last_layer_first_tokens(cfg, w.layers[-1], seqs, ws, parts)
    encoder_layer(cfg, w.layers[-1], seqs, ws, parts)
    return pool(ws.x, offsets, pooling)


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
