"""Where the BAAI/bge-small-en-v1.5 weights are on this machine, and where a download puts them.

`find_model_dir()` looks, in order, at:
1. the `BGESMALL_MODEL` environment variable (a folder; used as given, never skipped for another place),
2. the checkout's `weights/bge-small-en-v1.5/` (when bgesmall runs from a source checkout),
3. the user cache `$XDG_CACHE_HOME/bgesmall/bge-small-en-v1.5` (default `~/.cache/bgesmall/...`),
4. a Hugging Face hub cache that sentence-transformers users already have:
   `$HF_HUB_CACHE` or `$HF_HOME/hub` (default `~/.cache/huggingface/hub`), under
   `models--BAAI--bge-small-en-v1.5/snapshots/<revision>/`, the pinned revision first.
A folder counts when it holds config.json, model.safetensors and tokenizer.json: the downloader only gives
a file its final name once verified, so presence is enough (no hashing on every load; `bgesmall download
--check` re-verifies a folder). When no place has the model, it is downloaded (verified) into the default
folder with a one-line notice on stderr, unless HF_HUB_OFFLINE=1 or the hub cannot be reached: then
ModelNotFoundError lists each place looked at and the command to run. It never falls back to another model.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import download as dl

MODEL_FOLDER = dl.BGE_SMALL.folder_name  # "bge-small-en-v1.5"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ModelNotFoundError(FileNotFoundError):
    """No local copy of the model; the message lists the places looked at and what to run."""

    def __init__(self, message: str, searched: list[Place]):
        super().__init__(message)
        self.searched = searched

    def __str__(self) -> str:  # FileNotFoundError's own str() wants errno/filename
        return self.args[0]


@dataclass(frozen=True)
class Place:
    label: str  # e.g. "BGESMALL_MODEL", "checkout", "user cache", "Hugging Face cache"
    path: Path | None  # None: not applicable here (e.g. not running from a checkout)
    note: str  # why it was not used


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def _missing(folder: Path) -> str:
    if not folder.is_dir():
        return "does not exist"
    return "lacks " + ", ".join(n for n in REQUIRED_FILES if not (folder / n).is_file())


def checkout_root() -> Path | None:
    """The source checkout bgesmall runs from: the package's parent with a pyproject.toml naming bgesmall
    and a weights/ folder. None for an installed (non-editable) package."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        names_us = 'name = "bgesmall"' in pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    return root if names_us and (root / "weights").is_dir() else None


def checkout_weights_dir() -> Path | None:
    root = checkout_root()
    return root / "weights" / MODEL_FOLDER if root is not None else None


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "bgesmall" / MODEL_FOLDER


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "hub"


def hf_snapshots(repo_id: str = dl.REPO_ID, revision: str = dl.REVISION) -> list[Path]:
    """Snapshot folders of a repo in the hub cache: the pinned revision first, then the newest others."""
    snapshots = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return []
    others = sorted((p for p in snapshots.iterdir() if p.is_dir() and p.name != revision),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    pinned = snapshots / revision
    return ([pinned] if pinned.is_dir() else []) + others


def default_download_dir() -> Path:
    """Where `bgesmall download` puts the model: the checkout's weights/ when run from one, else the user cache."""
    return checkout_weights_dir() or user_cache_dir()


def search_local() -> tuple[Path | None, list[Place]]:
    """The first complete folder in search order (None if none), and every place looked at."""
    places: list[Place] = []
    env = os.environ.get("BGESMALL_MODEL")
    if env:
        folder = Path(env).expanduser()
        if is_complete(folder):
            return folder, places
        # An explicit choice that does not hold a model is an error, not a reason to use another folder.
        place = Place("BGESMALL_MODEL", folder, _missing(folder))
        raise ModelNotFoundError(
            f"BGESMALL_MODEL={env} is not a usable model folder: it {place.note}. A model folder holds "
            f"{', '.join(REQUIRED_FILES)}. Fix or unset BGESMALL_MODEL, or run "
            f"`bgesmall download --to {folder}`.",
            [place],
        )
    places.append(Place("BGESMALL_MODEL", None, "not set"))
    checkout = checkout_weights_dir()
    if checkout is not None and is_complete(checkout):
        return checkout, places
    places.append(Place("checkout", checkout, _missing(checkout) if checkout else "not running from a checkout"))
    cache = user_cache_dir()
    if is_complete(cache):
        return cache, places
    places.append(Place("user cache", cache, _missing(cache)))
    snapshots = hf_snapshots()
    for snap in snapshots:
        if is_complete(snap):
            return snap, places
        places.append(Place("Hugging Face cache", snap, _missing(snap)))
    if not snapshots:
        hub_dir = hf_hub_cache() / f"models--{dl.REPO_ID.replace('/', '--')}" / "snapshots"
        places.append(Place("Hugging Face cache", hub_dir, "does not exist"))
    return None, places


def _not_found(places: list[Place], reason: str) -> ModelNotFoundError:
    lines = [f"{dl.REPO_ID} was not found on this machine and {reason.rstrip('.')}.", "Looked in:"]
    for p in places:
        lines.append(f"  - {p.label}: {p.path if p.path is not None else '-'} ({p.note})")
    lines.append(
        f"To fix: run `bgesmall download` on a machine with network access (it writes {default_download_dir()}), "
        "or copy a model folder here and set BGESMALL_MODEL=/path/to/folder or pass --model; "
        "see weights/README.md."
    )
    return ModelNotFoundError("\n".join(lines), places)


def find_model_dir(*, download: bool = True) -> Path:
    """The folder holding the BGE-small weights; downloads them on first use when the hub is reachable.

    Raises ModelNotFoundError (a FileNotFoundError) when there is none and it cannot or may not download.
    """
    found, places = search_local()
    if found is not None:
        return found
    if dl.is_offline():
        raise _not_found(places, "HF_HUB_OFFLINE=1 forbids downloading it")
    if not download:
        raise _not_found(places, "downloading was not requested")
    dest = default_download_dir()
    print(
        f"bgesmall: {dl.REPO_ID} not found locally; downloading revision {dl.REVISION[:12]} (~133 MB, verified) "
        f"to {dest} (set HF_HUB_OFFLINE=1 to prevent this)",
        file=sys.stderr,
        flush=True,
    )
    try:
        dl.download(dest, dl.BGE_SMALL)  # looked up at call time, so tests can pin a fake hub's files
    except dl.DownloadError as e:
        raise _not_found(places, f"the automatic download failed: {e}") from e
    if not is_complete(dest):
        raise _not_found(places, f"the download to {dest} did not produce {', '.join(REQUIRED_FILES)}")
    return dest
