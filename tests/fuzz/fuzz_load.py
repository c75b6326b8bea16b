"""Fuzz model loading: a model folder whose config.json, tokenizer.json, safetensors header or safetensors
payload is replaced by the input (mutations of the real files, once the corpus holds them), into bgesmall.load.

Documented errors: ModelLoadError (a ValueError) and FileNotFoundError. Nothing else may raise; a folder that
loads must embed a text into one finite row.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import fuzz_main, small_checkpoint

TARGETS = ["config.json", "tokenizer.json", "header", "payload"]  # the first input byte picks one


@functools.lru_cache(maxsize=None)
def original_safetensors() -> bytes:
    return (small_checkpoint() / "model.safetensors").read_bytes()


@functools.lru_cache(maxsize=None)
def originals() -> dict[str, bytes]:
    folder = small_checkpoint()
    st = original_safetensors()
    (n,) = struct.unpack("<Q", st[:8])
    return {"config.json": (folder / "config.json").read_bytes(), "tokenizer.json": (folder / "tokenizer.json").read_bytes(),
            "header": st[8 : 8 + n], "payload": st[8 + n :]}


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    """The folder each input's model is written to: in memory (/dev/shm) where there is one, named by this process's
    id. It is removed at exit, and, as libFuzzer ends the process without Python's exit handlers, by the next run:
    a folder whose process is gone is removed here."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    for old in base.glob("bgesmall-fuzz-load-*"):
        if not _running(old.name.rsplit("-", 1)[-1]):
            shutil.rmtree(old, ignore_errors=True)
    root = base / f"bgesmall-fuzz-load-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    work = root / "model"
    shutil.copytree(small_checkpoint(), work)
    return work


def _running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):  # not a pid, or another user's process
        return True
    return True


_written: dict[str, bytes] = {}  # what each file in workdir() holds: a file the input does not change is not rewritten


def _write(name: str, content: bytes) -> None:
    if _written.get(name) != content:
        (workdir() / name).write_bytes(content)
        _written[name] = content


def seeds() -> list[bytes]:
    """One input per target that reproduces the real file: where mutations start from."""
    return [bytes([i]) + originals()[t] for i, t in enumerate(TARGETS)]


def one_input(data: bytes) -> None:
    import bgesmall

    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    files = dict(originals())
    files[target] = data[1:]
    _write("config.json", files["config.json"])
    _write("tokenizer.json", files["tokenizer.json"])
    _write("model.safetensors", struct.pack("<Q", len(files["header"])) + files["header"] + files["payload"]
           if target in ("header", "payload") else original_safetensors())
    try:
        model = bgesmall.load(workdir(), threads=1)
    except (bgesmall.ModelLoadError, FileNotFoundError):
        return
    vectors = model.embed(["a fuzzed model still embeds"])
    assert vectors.shape == (1, model.dim) and (np.isfinite(vectors).all() or data[0] % len(TARGETS) == 3)


if __name__ == "__main__":
    fuzz_main(one_input)
    sys.exit(0)
