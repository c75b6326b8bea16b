"""Content fingerprints: of a model folder (the files that decide its vectors) and of a job's input files.

A resumable job stores both in its manifest and refuses to continue when either changed; the Ray job ships the
model files with their sha256 so that each worker can check what it received.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The files of a model folder that decide its embeddings (the rest, README, vocab.txt, ..., do not).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "sentence_bert_config.json",
               "1_Pooling/config.json")
SAMPLE_BYTES = 1 << 20  # an input file is fingerprinted by its size and the sha256 of its first and last MiB


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def model_file_names(folder: Path) -> list[str]:
    """The MODEL_FILES present in `folder` (config.json, model.safetensors and tokenizer.json always are)."""
    return [name for name in MODEL_FILES if (Path(folder) / name).is_file()]


def model_file_hashes(folder: Path) -> dict[str, str]:
    """{relative name: sha256} of the files that decide the model's vectors."""
    return {name: sha256_file(Path(folder) / name) for name in model_file_names(folder)}


def combined(hashes: dict[str, str]) -> str:
    """One sha256 over a {name: sha256} map, independent of the map's order."""
    return sha256_bytes("".join(f"{k}\0{v}\n" for k, v in sorted(hashes.items())).encode())


def input_file_fingerprint(path: Path) -> dict:
    """{size, sample}: the file's size and a sha256 of its first and last MiB (all of it when small).

    Cheap on a terabyte corpus, and a Parquet file's footer (its last bytes) describes every row group, so a
    rewritten file is seen even when its size stays the same."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * SAMPLE_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            h.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sample_sha256": h.hexdigest()}
