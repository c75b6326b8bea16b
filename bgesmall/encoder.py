"""The BERT encoder, layer by layer, over packed token rows.

A batch of sequences is packed back to back into one [tokens, hidden] matrix, with `offsets` marking where
each sequence starts (offsets[s]:offsets[s + 1]). No padding exists, so none can leak into a result, and each
linear layer is one large matrix product over every token of the batch. Mirrors transformers'
`modeling_bert.py` (BertEmbeddings, BertSelfAttention, BertSelfOutput, BertIntermediate, BertOutput):

    x = LayerNorm(word[ids] + position[pos] + token_type[0])
    per layer:  x = LayerNorm(x + attention(x) W_o + b_o)
                x = LayerNorm(x + gelu(x W_i + b_i) W_f + b_f)

Shortcuts, stated openly: single-segment input only (token type 0, as embedding models use); no head mask,
no cross-attention, no KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BertConfig
from .kernels import attention, bias_gelu, embed_layernorm, residual_layernorm
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


def encoder_layer(cfg: BertConfig, lw: LayerWeights, offsets: np.ndarray, ws: Workspace) -> None:
    # ws.x [tokens, hidden] -> ws.x [tokens, hidden], in place
    eps = cfg.layer_norm_eps
    np.matmul(ws.x, lw.qkv_w, out=ws.qkv)  # [tokens, hidden] @ [hidden, 3 hidden] -> [tokens, 3 hidden]
    attention(ws.qkv, lw.qkv_b, offsets, cfg.num_attention_heads, ws.ctx)  # -> [tokens, hidden]
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
    for lw in w.layers:
        encoder_layer(cfg, lw, offsets, ws)
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
