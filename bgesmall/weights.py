"""Weights: one dataclass field per tensor, read from a safetensors file and checked against the config.

Tensor names are the checkpoint's own (transformers' `modeling_bert.py`), with or without a `bert.` prefix.
Linear weights (PyTorch's [out, in]) are packed once at load into the column panels that the matmul kernel
streams: W [in, out] as [ceil(out / PANEL), in, PANEL] (kernels/matmul.py; PANEL is 32 or 16 by CPU). Query, key
and value are fused into one [hidden, 3 * hidden] matrix before packing, so one product computes all three.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
from safetensors import safe_open

from . import packed
from .config import BertConfig, ModelLoadError
from .linear import Linear

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
    qkv_w: Linear  # W [hidden, 3 * hidden], query | key | value side by side
    qkv_b: np.ndarray  # [3 * hidden]
    attn_out_w: Linear  # W [hidden, hidden]
    attn_out_b: np.ndarray  # [hidden]
    attn_ln_gamma: np.ndarray  # [hidden]
    attn_ln_beta: np.ndarray  # [hidden]
    ffn_in_w: Linear  # W [hidden, ffn]
    ffn_in_b: np.ndarray  # [ffn]
    ffn_out_w: Linear  # W [ffn, hidden]
    ffn_out_b: np.ndarray  # [hidden]
    ffn_ln_gamma: np.ndarray  # [hidden]
    ffn_ln_beta: np.ndarray  # [hidden]


    LINEARS: ClassVar[tuple[str, ...]] = ("qkv_w", "attn_out_w", "ffn_in_w", "ffn_out_w")

    def linears(self) -> tuple[Linear, ...]:
        return tuple(getattr(self, name) for name in self.LINEARS)


@dataclass(frozen=True)
class BertWeights:
    embeddings: EmbeddingWeights
    layers: tuple[LayerWeights, ...]
    kept_key: dict | None = None  # the kept file's key (bgesmall/packed.py) if these arrays should be kept there

    @property
    def precision(self) -> str:
        """The tier the linear layers' weights are packed for: "fp32" or "bf16"."""
        return self.layers[0].qkv_w.precision if self.layers else "fp32"

    def prepare(self, plan) -> None:
        """Give every linear layer the plan's implementations (and the weight formats they read)."""
        for layer in self.layers:
            for lin in layer.linears():
                lin.prepare(plan.linear_choices(lin.shape))

    def keep(self) -> None:
        """Write the kept file for the next load (once the plan has given each layer its formats), if wanted: in
        the background (packed.write_soon)."""
        if self.kept_key is None:
            return
        e = self.embeddings
        arrays = {"word": e.word, "position": e.position, "token_type": e.token_type}
        for i, lin in enumerate(lin for layer in self.layers for lin in layer.linears()):
            arrays[f"{i}.panels"] = lin.panels
            if lin.dense is not None:
                arrays[f"{i}.torch"] = lin.dense.T  # dense is an [out, in] matrix's transpose: a view
        packed.write_soon(self.kept_key, arrays)


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


class TensorFile:
    """The tensors of one safetensors file, checked against the config before anything is copied.

    The header is read and checked here first (its length, then every tensor's dtype, shape and byte range
    against the file), so that a damaged or hostile file is refused with the tensor it is about before any
    allocation sized from it; `safetensors` then validates the file a second time. The bytes of each tensor
    are read straight into a fresh float32 array with plain file reads, one tensor at a time, so loading holds
    no second copy of the model (a memory map would add every page it touched to the process's resident
    memory).
    """

    def __init__(self, path: Path, cfg: BertConfig):
        self.path = path
        self.want = expected_shapes(cfg)
        self.header, self.data_start = read_header(path)
        try:
            with safe_open(str(path), framework="numpy") as fh:
                fh.keys()
        except Exception as e:  # safetensors raises its own error types for a truncated or corrupt header
            raise ModelLoadError(f"{path}: not a readable safetensors file ({e}); download it again") from e
        self.names = {_canonical(k): k for k in self.header if k != "__metadata__"}
        missing = [k for k in self.want if k not in self.names]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ModelLoadError(
                f"{path}: tensor {missing[0]!r}{more} is missing (expected shape {self.want[missing[0]]}); "
                "is this a BERT checkpoint matching its config.json?"
            )
        for name, shape in self.want.items():
            info = self.header[self.names[name]]
            if tuple(info["shape"]) != shape:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} has shape {tuple(info['shape'])}, expected {shape} from config.json"
                )
            if info["dtype"] not in _DTYPES:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}; expected F32, F16, BF16 or F64"
                )
        need = 4 * sum(math.prod(shape) for shape in self.want.values())  # float32 at rest
        memory = _physical_memory()
        if memory is not None and need > memory:
            raise ModelLoadError(
                f"{path}: config.json's sizes need {need / 2**30:.1f} GiB of float32 weights, more than this "
                f"machine's {memory / 2**30:.1f} GiB of memory"
            )

    def get(self, name: str) -> np.ndarray:
        """One tensor, by canonical name, as a C-contiguous float32 array of its checked shape."""
        info = self.header[self.names[name]]
        begin, end = info["data_offsets"]
        raw = np.empty(end - begin, dtype=np.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            if fh.readinto(raw) != raw.size:
                raise ModelLoadError(f"{self.path}: file ends inside tensor {name!r}; download it again")
        dtype = info["dtype"]
        if dtype == "BF16":  # numpy has no bfloat16: widen the 16-bit words to float32 (exact)
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(F32)
        else:
            arr = raw.view(_DTYPES[dtype]).astype(F32, copy=dtype != "F32")
        return arr.reshape(self.want[name])


_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
# Every safetensors dtype (a checkpoint may hold integer buffers such as position_ids beside its weights).
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 4 << 20  # bge-small's header is 18 KB; a BERT-large one 45 KB


def read_header(path: Path) -> tuple[dict, int]:
    """safetensors header -> ({name: {"dtype", "shape", "data_offsets"}}, offset of the data), every entry
    checked: a known dtype, a shape of whole numbers, a byte range inside the file whose length is the
    shape's, no two ranges overlapping. ModelLoadError names the file and the tensor otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{path}: {size} bytes, too short for a safetensors file; download it again")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ModelLoadError(
                    f"{path}: the header claims {n} bytes, but the file has {size - 8} after the length and a "
                    f"model header is at most {MAX_HEADER_BYTES}; the file is damaged, download it again"
                )
            raw = fh.read(n)
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path} does not exist: the model folder needs model.safetensors (`bgesmall download` fetches it)"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file: the header is not JSON ({e}); "
                             "download it again") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the header is a JSON {type(header).__name__}, not an object of tensors")
    data_size = size - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ModelLoadError(f"{where}: its header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ITEM_BYTES:
            raise ModelLoadError(f"{where} has dtype {dtype!r}, which safetensors does not define")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ModelLoadError(f"{where} has shape {shape!r}; expected a list of whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ModelLoadError(f"{where} has data_offsets {offsets!r}; expected [begin, end], 0 <= begin <= end")
        begin, end = offsets
        if end > data_size:
            raise ModelLoadError(
                f"{where}: data_offsets {offsets} run past the end of the file (its data is {data_size} bytes); "
                "the file is truncated or damaged, download it again"
            )
        nbytes = math.prod(shape) * _ITEM_BYTES[dtype]
        if end - begin != nbytes:
            raise ModelLoadError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} "
                                 f"of {dtype} needs {nbytes}")
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise ModelLoadError(f"{path}: tensors {a!r} and {b!r} overlap in the file; download it again")
    return header, 8 + n


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX: no check
        return None


def load_weights(path: Path, cfg: BertConfig, plan=None, precision: str = "fp32") -> BertWeights:
    """plan: the kernel plan (bgesmall/plan.py), if known before loading; each linear layer then takes the
    formats it reads as it is built (no unpacking later for BLAS). precision: the tier whose weight format the
    linear layers are packed in, "fp32" or "bf16" (bgesmall/precision.py; checked and runnable here). The embedding tables, the panels and BLAS's
    matrices are mapped from the kept file when there is one for this weights file (bgesmall/packed.py);
    otherwise `BertWeights.keep()` writes one, once the plan has given each layer its formats."""
    tensors = TensorFile(path, cfg)
    t = tensors.get
    key = packed.key(path, tensors.header, precision) if packed.enabled(cfg) else None
    kept = packed.read(key, cfg) if key else None
    linears: list[Linear] = []

    def table(name: str, tensor: str) -> np.ndarray:
        return kept[name] if kept else t(tensor)

    def _linear(names: list[str]) -> Linear:
        # PyTorch's [out, in] (QKV: three stacked) -> W [in, out] in column panels (kernels/matmul.py)
        i = len(linears)
        out_features = sum(tensors.want[n][0] for n in names)
        choices = None if plan is None else plan.linear_choices((tensors.want[names[0]][1], out_features))

        def source() -> np.ndarray:  # [out, in], as the file holds it
            if kept and f"{i}.torch" in kept:
                return kept[f"{i}.torch"]
            return np.concatenate([t(n) for n in names]) if len(names) > 1 else t(names[0])

        if kept is None:
            lin = Linear.from_torch(source(), choices, precision)
        else:
            lin = Linear(kept[f"{i}.panels"], out_features, in_features=tensors.want[names[0]][1])
            if choices is not None:  # the plain matrix is read only where BLAS runs
                lin.prepare(choices, source=source() if any(how == "blas" for _, how in choices) else None)
        linears.append(lin)
        return lin

    emb = EmbeddingWeights(
        word=table("word", "embeddings.word_embeddings.weight"),
        position=table("position", "embeddings.position_embeddings.weight"),
        token_type=table("token_type", "embeddings.token_type_embeddings.weight"),
        ln_gamma=t("embeddings.LayerNorm.weight"),
        ln_beta=t("embeddings.LayerNorm.bias"),
    )
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        qkv = [p + f"attention.self.{n}." for n in ("query", "key", "value")]
        layers.append(
            LayerWeights(
                qkv_w=_linear([n + "weight" for n in qkv]),
                qkv_b=np.concatenate([t(n + "bias") for n in qkv]),
                attn_out_w=_linear([p + "attention.output.dense.weight"]),
                attn_out_b=t(p + "attention.output.dense.bias"),
                attn_ln_gamma=t(p + "attention.output.LayerNorm.weight"),
                attn_ln_beta=t(p + "attention.output.LayerNorm.bias"),
                ffn_in_w=_linear([p + "intermediate.dense.weight"]),
                ffn_in_b=t(p + "intermediate.dense.bias"),
                ffn_out_w=_linear([p + "output.dense.weight"]),
                ffn_out_b=t(p + "output.dense.bias"),
                ffn_ln_gamma=t(p + "output.LayerNorm.weight"),
                ffn_ln_beta=t(p + "output.LayerNorm.bias"),
            )
        )
    return BertWeights(embeddings=emb, layers=tuple(layers), kept_key=key if kept is None else None)
