"""Weights: one dataclass field per tensor, read from a safetensors file and checked against the config.

Tensor names are the checkpoint's own (transformers' `modeling_bert.py`), with or without a `bert.` prefix.
Linear weights keep PyTorch's [out, in] layout; the encoder multiplies by their transpose, which BLAS
reads without a copy. Query, key and value are fused into one [3 * hidden, hidden] matrix at load.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from .config import BertConfig, ModelLoadError

F32 = np.float32


@dataclass(frozen=True)
class EmbeddingWeights:
    word: np.ndarray  # [vocab, hidden]
    position: np.ndarray  # [max_positions, hidden]
    token_type: np.ndarray  # [type_vocab, hidden]
    ln_gamma: np.ndarray  # [hidden]
    ln_beta: np.ndarray  # [hidden]


@dataclass(frozen=True)
class LayerWeights:
    qkv_w: np.ndarray  # [3 * hidden, hidden]  query, key, value stacked
    qkv_b: np.ndarray  # [3 * hidden]
    attn_out_w: np.ndarray  # [hidden, hidden]
    attn_out_b: np.ndarray  # [hidden]
    attn_ln_gamma: np.ndarray  # [hidden]
    attn_ln_beta: np.ndarray  # [hidden]
    ffn_in_w: np.ndarray  # [ffn, hidden]
    ffn_in_b: np.ndarray  # [ffn]
    ffn_out_w: np.ndarray  # [hidden, ffn]
    ffn_out_b: np.ndarray  # [hidden]
    ffn_ln_gamma: np.ndarray  # [hidden]
    ffn_ln_beta: np.ndarray  # [hidden]


@dataclass(frozen=True)
class BertWeights:
    embeddings: EmbeddingWeights
    layers: tuple[LayerWeights, ...]


def expected_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the encoder needs, by its canonical name, with the shape the config implies."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (h, h)
            shapes[p + f"attention.self.{name}.bias"] = (h,)
        shapes[p + "attention.output.dense.weight"] = (h, h)
        shapes[p + "attention.output.dense.bias"] = (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = (h,)
        shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (f, h)
        shapes[p + "intermediate.dense.bias"] = (f,)
        shapes[p + "output.dense.weight"] = (h, f)
        shapes[p + "output.dense.bias"] = (h,)
        shapes[p + "output.LayerNorm.weight"] = (h,)
        shapes[p + "output.LayerNorm.bias"] = (h,)
    return shapes


def _canonical(name: str) -> str:
    """`bert.encoder...` -> `encoder...`; old TF-style `LayerNorm.gamma/beta` -> `LayerNorm.weight/bias`."""
    if name.startswith("bert."):
        name = name[len("bert.") :]
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """numpy has no bfloat16: read the raw 16-bit words and widen them to float32 (exact)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        info = json.loads(fh.read(n))[name]
        begin, end = info["data_offsets"]
        fh.seek(8 + n + begin)
        raw = np.frombuffer(fh.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(F32).reshape(info["shape"])


def read_tensors(path: Path, cfg: BertConfig) -> dict[str, np.ndarray]:
    """Every expected tensor as float32, checked against the config. Errors name file, tensor and shapes."""
    want = expected_shapes(cfg)
    try:
        fh = safe_open(str(path), framework="numpy")
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path} does not exist: the model folder needs model.safetensors (`bgesmall download` fetches it)"
        ) from None
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt header
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e}); download it again") from e
    out: dict[str, np.ndarray] = {}
    with fh:
        names = {_canonical(k): k for k in fh.keys()}
        missing = [k for k in want if k not in names]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ModelLoadError(
                f"{path}: tensor {missing[0]!r}{more} is missing (expected shape {want[missing[0]]}); "
                "is this a BERT checkpoint matching its config.json?"
            )
        for name, shape in want.items():
            sl = fh.get_slice(names[name])
            found, dtype = tuple(sl.get_shape()), sl.get_dtype()
            if found != shape:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} has shape {found}, expected {shape} from config.json"
                )
            if dtype == "BF16":
                arr = _read_bf16(path, names[name])
            elif dtype in ("F32", "F16", "F64"):
                arr = fh.get_tensor(names[name])
            else:
                raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype}; expected F32, F16 or BF16")
            out[name] = np.ascontiguousarray(arr, dtype=F32)
    return out


def load_weights(path: Path, cfg: BertConfig) -> BertWeights:
    t = read_tensors(path, cfg)
    emb = EmbeddingWeights(
        word=t["embeddings.word_embeddings.weight"],
        position=t["embeddings.position_embeddings.weight"],
        token_type=t["embeddings.token_type_embeddings.weight"],
        ln_gamma=t["embeddings.LayerNorm.weight"],
        ln_beta=t["embeddings.LayerNorm.bias"],
    )
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        qkv = [p + f"attention.self.{n}." for n in ("query", "key", "value")]
        layers.append(
            LayerWeights(
                qkv_w=np.concatenate([t[n + "weight"] for n in qkv], axis=0),
                qkv_b=np.concatenate([t[n + "bias"] for n in qkv]),
                attn_out_w=t[p + "attention.output.dense.weight"],
                attn_out_b=t[p + "attention.output.dense.bias"],
                attn_ln_gamma=t[p + "attention.output.LayerNorm.weight"],
                attn_ln_beta=t[p + "attention.output.LayerNorm.bias"],
                ffn_in_w=t[p + "intermediate.dense.weight"],
                ffn_in_b=t[p + "intermediate.dense.bias"],
                ffn_out_w=t[p + "output.dense.weight"],
                ffn_out_b=t[p + "output.dense.bias"],
                ffn_ln_gamma=t[p + "output.LayerNorm.weight"],
                ffn_ln_beta=t[p + "output.LayerNorm.bias"],
            )
        )
    return BertWeights(embeddings=emb, layers=tuple(layers))
