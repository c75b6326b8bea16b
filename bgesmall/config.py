"""Model configuration: what `config.json` and the sentence-transformers files of a checkpoint say.

Field names are the checkpoint's own (`hidden_size`, `num_hidden_layers`, ...), so a config.json maps
onto `BertConfig` one to one; `BGE_SMALL` is the preset for BAAI/bge-small-en-v1.5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


class ModelLoadError(ValueError):
    """A model folder, its config or its weights could not be used. The message says what to do."""


SUPPORTED_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification")
SUPPORTED_ACTIVATIONS = ("gelu",)  # exact erf GELU, as BERT uses; "gelu_new" (tanh) is a different function


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522  # bert-base-uncased WordPiece vocabulary
    hidden_size: int = 384  # bge-small width; 768 for base, 1024 for large
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # head size 32 for bge-small
    intermediate_size: int = 1536  # FFN width, 4 x hidden
    max_position_embeddings: int = 512  # learned absolute positions: the hard token limit
    type_vocab_size: int = 2  # segment embeddings; a single text uses type 0 only
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @property
    def num_parameters(self) -> int:
        """Encoder parameters (embeddings, layers); the pooler, unused for embeddings, is not counted."""
        h, f = self.hidden_size, self.intermediate_size
        emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        return emb + self.num_hidden_layers * layer

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "BertConfig":
        if not isinstance(d, dict):
            raise ModelLoadError(f"{source}: holds a JSON {type(d).__name__}, not an object of config fields")
        model_type = d.get("model_type", "bert")
        archs = d.get("architectures") or ["BertModel"]
        if not isinstance(archs, list):
            archs = [archs]
        if model_type != "bert" or not any(isinstance(a, str) and a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ModelLoadError(
                f"{source}: model_type={model_type!r}, architectures={archs} is not a BERT encoder; "
                f"bgesmall runs BERT checkpoints ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if d.get("hidden_act", "gelu") not in SUPPORTED_ACTIVATIONS:
            raise ModelLoadError(
                f"{source}: hidden_act={d.get('hidden_act')!r} is not supported; bgesmall implements "
                f"{SUPPORTED_ACTIVATIONS} (exact erf GELU) only"
            )
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(
                f"{source}: position_embedding_type={d['position_embedding_type']!r} is not supported "
                "(only 'absolute' positions, as BERT and BGE use)"
            )
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        for k, limit in SIZE_LIMITS.items():
            v = getattr(cfg, k)
            if not _is_int(v) or v < 1:
                raise ModelLoadError(f"{source}: {k}={v!r}: each must be a whole number >= 1")
            if v > limit:
                raise ModelLoadError(
                    f"{source}: {k}={v} is beyond any BERT checkpoint bgesmall can run (at most {limit}); "
                    "the file is damaged or not a BERT config"
                )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ModelLoadError(
                f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                f"{cfg.num_attention_heads}"
            )
        eps = cfg.layer_norm_eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ModelLoadError(f"{source}: layer_norm_eps={eps!r}: it must be a number between 0 and 1")
        return cfg


# Upper bounds on config.json sizes, far above any BERT (bert-large: 1024 wide, 24 layers, 16 heads, 4096 FFN,
# 30522 tokens, 512 positions): a size past these is a damaged or hostile file, refused before anything is
# allocated from it. The weights' total is checked against the machine's memory too (weights.py).
SIZE_LIMITS = {
    "vocab_size": 1 << 22,  # 4M tokens; the largest multilingual vocabularies have 250k
    "hidden_size": 8192,
    "num_hidden_layers": 256,
    "num_attention_heads": 1024,
    "intermediate_size": 65536,
    "max_position_embeddings": 65536,
    "type_vocab_size": 1024,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


BGE_SMALL = BertConfig()  # BAAI/bge-small-en-v1.5


@dataclass(frozen=True)
class EmbedderConfig:
    """How a checkpoint turns hidden states into one vector: the sentence-transformers files."""

    pooling: str = "cls"  # BGE: the [CLS] token's final hidden state; all-MiniLM: mean over tokens
    max_seq_length: int = 512  # tokens per text, [CLS] and [SEP] included
    normalize: bool = True  # sentence-transformers' Normalize module: listed in modules.json, or no modules.json

    @classmethod
    def from_folder(cls, folder: Path, bert: BertConfig) -> "EmbedderConfig":
        pooling = "cls"
        pool_file = folder / "1_Pooling" / "config.json"
        if pool_file.is_file():
            p = _read_json(pool_file, dict)
            if p.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif p.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:
                modes = [k for k, v in p.items() if k.startswith("pooling_mode") and v]
                raise ModelLoadError(f"{pool_file}: pooling {modes} is not supported (cls or mean only)")
        max_len = bert.max_position_embeddings
        st_file = folder / "sentence_bert_config.json"
        if st_file.is_file():
            max_len = _read_json(st_file, dict).get("max_seq_length") or max_len
            if not _is_int(max_len) or max_len < 2:
                raise ModelLoadError(f"{st_file}: max_seq_length={max_len!r}: it must be a whole number >= 2 "
                                     "(tokens per text, [CLS] and [SEP] included)")
        normalize = True
        modules_file = folder / "modules.json"
        if modules_file.is_file():
            modules = _read_json(modules_file, list)
            normalize = any(isinstance(m, dict) and str(m.get("type", "")).endswith("Normalize") for m in modules)
        return cls(pooling, min(max_len, bert.max_position_embeddings), normalize)


MAX_JSON_BYTES = 1 << 20  # config files are a few hundred bytes: a larger one is not a config


def _read_json(path: Path, kind: type = dict):
    """The JSON value of a small config file, which must be a `kind` (dict or list)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelLoadError(f"{path}: {size} bytes, far more than a config file holds (at most "
                                 f"{MAX_JSON_BYTES}); the file is damaged or not a config")
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: cannot read it as JSON ({e}); re-download or repair the file") from e
    if not isinstance(value, kind):
        raise ModelLoadError(f"{path}: holds a JSON {type(value).__name__}, expected a JSON "
                             f"{'object' if kind is dict else 'array'}")
    return value


def read_bert_config(folder: Path) -> BertConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json: pass a model folder in the Hugging Face layout "
            "(config.json, model.safetensors, tokenizer.json), e.g. the one `bgesmall download` makes"
        )
    return BertConfig.from_dict(_read_json(path, dict), source=str(path))
