"""The model's large arrays kept on disk in the formats the kernels read, so that a later load maps them.

Loading bge-small reads 133 MB and packs its 48 weight matrices into column panels (kernels/matmul.py,
`pack_columns`), rewriting 85 MB: most of a warm start's load, and much of it the cost of faulting in fresh
memory. The first load of a weights file on a machine writes (in a thread of its own: `write_soon`) what it
built to `plan_dir()` / weights-<file>-<key>.f32 (beside the plan, so beside numba's cache): every linear
layer's panels, the plain [out, in] matrix of those the plan runs through BLAS, and the three embedding tables.
A later load maps that file copy-on-write: nothing is read until a kernel touches it, the pages are the OS file
cache's own, and only the word-embedding rows of tokens in use are ever resident. The small tensors (biases,
LayerNorms) are read from the safetensors file as always, and so is the plain matrix of a layer that the file
lacks.

The key identifies the weights without reading them: the safetensors file's path, size, modification and
change times, inode, and header (every tensor's name, dtype, shape and byte range), with this layout's
version. As for a .pyc file, a file rewritten in place changes its times, and so its key. A kept file that
is short, of another key or shape, or unreadable is ignored with one line on stderr and written again; one
that cannot be written leaves the arrays in memory, also with one line. The file is replaced only by
renaming a finished one into place, so a mapped file never changes under a running model. Models with under
MIN_BYTES of linear weights load in milliseconds and are not kept. `BGESMALL_PACKED=0` turns this off.

File layout: a header (MAGIC, its own size as 8 little-endian bytes, then JSON {"key", "arrays": [[name, shape],
...]}, zero-padded to a multiple of 4096 bytes), then each array, float32 (the bf16 tier's panels: uint32 pairs
of bf16, kernels/matmul.py `pack_pairs`), C order, starting at a multiple of 4096 bytes. Offsets are recomputed from the shapes, which are checked against the config: the header names the
arrays, it does not place them. The file is flushed to disk before it is renamed into place, so a crash cannot
leave it whole in name and zero in part. Writing one also removes kept files whose weights file has gone or
changed, and temporary files a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .kernels.matmul import PANEL
from .plan import plan_dir, write_atomically

ENV = "BGESMALL_PACKED"
MAGIC = b"bgesmall weights\n"
VERSION = 2  # bump when the packing or the file layout changes
ALIGN = 4096  # the header and every array start at a multiple of this
MAX_HEADER = 1 << 20  # a 24-layer model's header is about 6 KB
MIN_BYTES = 8 << 20  # linear weights below this pack in a few milliseconds: not worth a file


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every linear layer, in the model's order: per layer QKV, attention output, FFN in, FFN out."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return [s for _ in range(cfg.num_hidden_layers) for s in ((3 * h, h), (h, h), (f, h), (h, f))]


def expected(cfg, dense: list[int], precision: str = "fp32") -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a file for this config, with the plain matrices of linear layers `dense` (indices)."""
    h = cfg.hidden_size
    arrays = [("word", (cfg.vocab_size, h)), ("position", (cfg.max_position_embeddings, h)),
              ("token_type", (cfg.type_vocab_size, h))]
    for i, (n, k) in enumerate(linear_shapes(cfg)):
        arrays.append((f"{i}.panels", (-(-n // PANEL), -(-k // 2) if precision == "bf16" else k, PANEL)))
        if i in dense:
            arrays.append((f"{i}.torch", (n, k)))
    return arrays


def enabled(cfg) -> bool:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return sum(4 * n * k for n, k in linear_shapes(cfg)) >= MIN_BYTES


def key(weights_path: Path, header: dict, precision: str = "fp32") -> dict:
    """What identifies the weights without reading them (see the module docstring), and their tier's format."""
    st = os.stat(weights_path)
    return {
        "version": VERSION,
        "precision": precision,
        "panel": PANEL,
        "byteorder": sys.byteorder,
        "path": str(Path(weights_path).resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": [st.st_dev, st.st_ino],
        "header": hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest(),
    }


def kept_path(k: dict) -> Path:
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]

    # the first part names the weights file and layout (what an earlier version of it shares), the second the key
    return plan_dir() / f"weights-{digest([k['path'], k['panel'], k['byteorder'], k['precision']])}-{digest(k)}.f32"


def _layout(arrays, header_bytes: int) -> tuple[list[int], int]:
    offsets, at = [], header_bytes
    for _, shape in arrays:
        offsets.append(at)
        at += -(-(4 * int(np.prod(shape))) // ALIGN) * ALIGN
    return offsets, at


def _read_meta(fh) -> tuple[dict, int]:
    """(the header's JSON, its size in bytes) from an open kept file; ValueError if it is not one."""
    start = fh.read(len(MAGIC) + 8)
    if len(start) < len(MAGIC) + 8 or not start.startswith(MAGIC):
        raise ValueError("not a weights file")
    (size,) = struct.unpack("<Q", start[len(MAGIC):])
    if size % ALIGN or not len(MAGIC) + 8 < size <= MAX_HEADER:
        raise ValueError(f"a header of {size} bytes")
    meta = json.loads(fh.read(size - len(MAGIC) - 8).rstrip(b"\0"))
    if not isinstance(meta, dict):
        raise ValueError("the header is not a JSON object")
    return meta, size


def read(k: dict, cfg) -> dict[str, np.ndarray] | None:
    """The kept arrays for key k, by name ("word", "position", "token_type", "<i>.panels", "<i>.torch"), mapped
    copy-on-write; None if there is no usable file."""
    path = kept_path(k)
    finish(path)  # this process may be writing it
    try:
        fh = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        _say(f"cannot read the kept weights {path} ({e.strerror}); loading from the model file")
        return None
    try:
        with fh:
            size = os.fstat(fh.fileno()).st_size
            meta, header_bytes = _read_meta(fh)
        if meta.get("key") != k:
            raise ValueError("made for another weights file")
        names = [name for name, _ in meta["arrays"]]
        dense = [int(n.split(".")[0]) for n in names if n.endswith(".torch")]
        arrays = expected(cfg, dense, k["precision"])
        if [[name, list(shape)] for name, shape in arrays] != meta["arrays"]:
            raise ValueError("its arrays are not this model's")
        offsets, total = _layout(arrays, header_bytes)
        if size != total:
            raise ValueError(f"{size} bytes where its arrays take {total}")
        flat = np.memmap(path, dtype=np.float32, mode="c", shape=(total // 4,)).view(np.ndarray)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as e:
        _say(f"ignoring the kept weights {path} ({e}); loading from the model file")
        return None
    # plain arrays (numba types an ndarray subclass by its base anyway), each keeping the map alive
    pairs = k["precision"] == "bf16"
    return {name: _typed(flat[o // 4 : o // 4 + int(np.prod(shape))].reshape(shape), pairs and name.endswith(".panels"))
            for o, (name, shape) in zip(offsets, arrays)}


def _typed(a: np.ndarray, pairs: bool) -> np.ndarray:
    return a.view(np.uint32) if pairs else a


def write_soon(k: dict, arrays: dict[str, np.ndarray]) -> None:
    """`write`, in a thread of its own: a first load returns without waiting for 130 MB to reach the disk (0.4 s
    of a cold start on a 2-core AMD EPYC), and the first embeddings run meanwhile. The thread is not a daemon,
    so the interpreter finishes the file before it exits; a `read` of the same file in this process, and
    `finish()`, wait for it."""
    path = kept_path(k)  # now: the folder is read from the environment
    thread = threading.Thread(target=write, args=(k, arrays, path), name="bgesmall-keep-weights")
    with _writing_lock:
        _writing[path] = thread
    thread.start()


_writing: dict[Path, threading.Thread] = {}  # kept files being written by write_soon, by path
_writing_lock = threading.Lock()


def finish(path: Path | None = None) -> None:
    """Wait until the kept files that write_soon is writing (only the one at `path`, if given) are written."""
    with _writing_lock:
        threads = list(_writing.values()) if path is None else [_writing[path]] if path in _writing else []
    for thread in threads:
        thread.join()
        with _writing_lock:
            for p, t in list(_writing.items()):
                if t is thread:
                    del _writing[p]


def write(k: dict, arrays: dict[str, np.ndarray], path: Path | None = None) -> Path | None:
    """Keep these arrays (named and ordered as `expected` lists them) for key k, atomically (a temporary file
    written, flushed to disk and renamed into place), and remove kept files that no longer match their weights
    file (see `_sweep`). On failure: one line on stderr, and None."""
    path = path or kept_path(k)
    listed = [(name, tuple(a.shape)) for name, a in arrays.items()]
    body = json.dumps({"key": k, "arrays": [[n, list(s)] for n, s in listed]}).encode()
    header_bytes = -(-(len(MAGIC) + 8 + len(body)) // ALIGN) * ALIGN
    offsets, total = _layout(listed, header_bytes)

    def fill(f) -> None:
        f.write((MAGIC + struct.pack("<Q", header_bytes) + body).ljust(header_bytes, b"\0"))
        for o, a in zip(offsets, arrays.values()):
            f.seek(o)
            a = np.ascontiguousarray(a, dtype=np.uint32 if a.dtype == np.uint32 else np.float32)
            f.write(a.data)  # 4 bytes an element either way: float32, or the bf16 tier's uint32 pairs
        f.truncate(total)

    try:
        if header_bytes > MAX_HEADER:
            raise OSError(f"its header would take {header_bytes} bytes")
        _sweep(path.parent, keep=path)
        write_atomically(path, fill, durable=True)
    except OSError as e:
        _say(f"cannot keep the packed weights in {path.parent} ({e.strerror or e}); they are packed at each "
             f"load (set BGESMALL_PLAN_DIR to a writable folder)")
        return None
    return path


def _sweep(folder: Path, keep: Path) -> None:
    """Remove kept files whose weights file is gone or has changed since (another version of a file, a model
    folder deleted) or that an earlier layout (VERSION) wrote, and temporary files a killed writer left more than an hour ago. A process that still maps
    a removed file keeps its pages (on a local disk; a file shared over NFS is not safe to remove under a
    reader on another machine: give each machine its own BGESMALL_PLAN_DIR there)."""
    now = time.time()
    for old in folder.glob(".weights-*.tmp"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > 3600:
                old.unlink()
    for old in folder.glob("weights-*.f32"):
        if old == keep:
            continue
        try:
            with open(old, "rb") as fh:
                k = _read_meta(fh)[0]["key"]
            st = os.stat(k["path"])
            stale = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, [st.st_dev, st.st_ino]] != [
                k["size"], k["mtime_ns"], k["ctime_ns"], k["inode"]] or k.get("version") != VERSION
        except FileNotFoundError:
            stale = True  # its weights file is gone (or, racing a writer, the kept file itself: nothing to do)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue  # unreadable or not ours: leave it alone
        if stale:
            with contextlib.suppress(OSError):
                old.unlink()


def _say(msg: str) -> None:
    print(f"bgesmall: {msg}", file=sys.stderr)
