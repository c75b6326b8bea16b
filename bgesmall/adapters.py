"""What the framework adapters (bgesmall.langchain, .llama_index, .haystack, .chroma) have in common.

- `shared_model`: one loaded Model per (folder, threads, load options), shared by every adapter instance that
  asks for the same one while any of them is alive (a weak cache: a model nobody holds is freed). The precision
  option is keyed as the tier asked for ("BF16" and "bf16" are one; absent or None: $BGESMALL_PRECISION, else fp32).
- `passage_vectors` / `query_vectors`: the input rule for what a framework passes (None or [] gives an empty
  result; a str or a non-string item raises TypeError naming it, as Model.embed does), then the embedding, with
  BGE's query instruction for queries only.
- `one_text`: the same rule for a single query or text.
- `load_arguments`: what a framework's saved config keeps to load the same model again.
- `missing_extra`: the ImportError an adapter raises when its framework is not installed.

None of this imports a framework; each adapter module imports its own.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

import numpy as np

from .model import Model, load
from .precision import check_precision, requested
from .threads import default_workers
from .tokenizer import check_texts

_models: "weakref.WeakValueDictionary[tuple, Model]" = weakref.WeakValueDictionary()
_models_lock = threading.Lock()


def shared_model(model=None, *, threads: int | None = None, **load_kwargs) -> Model:
    """A loaded Model: `model` itself when it is one, else bgesmall.load(model, threads=threads, **load_kwargs),
    loaded once and shared with every caller that names the same folder, threads and load options.

    model: a model folder (str or path), None for the BGE-small weights bgesmall.load finds, or a loaded Model.
    load_kwargs: passed to bgesmall.load as they are, so a load option added there works here unchanged;
    precision ("fp32" or "bf16", any case) is checked first and passed in its canonical spelling.
    """
    if isinstance(model, Model):
        if threads is not None or load_kwargs:
            given = ", ".join(["threads"] * (threads is not None) + sorted(load_kwargs))
            raise ValueError(
                f"{given} apply when bgesmall loads the model: pass a model folder with them, "
                "or give them to bgesmall.load yourself and pass the loaded Model alone"
            )
        return model
    check_model_argument(model)
    load_kwargs = canonical_options(load_kwargs)
    tier = requested(load_kwargs.get("precision"))  # a bad tier fails before the model is looked for
    if model is None:
        from .locate import find_model_dir

        folder = find_model_dir()
    else:
        folder = Path(model).expanduser().resolve()
    options = {**load_kwargs, "precision": tier}
    key = (str(folder), default_workers() if threads is None else threads, _options_key(options))
    with _models_lock:  # one load per key, even when threads ask at once
        found = _models.get(key)
        if found is None:
            found = _models[key] = load(folder, threads=threads, **load_kwargs)
        return found


def canonical_options(load_kwargs: dict) -> dict:
    """The load options with precision, when given, checked and in its canonical spelling ("BF16" -> "bf16")."""
    if load_kwargs.get("precision") is None:
        return dict(load_kwargs)
    return {**load_kwargs, "precision": check_precision(load_kwargs["precision"])}


def load_arguments(model, threads: int | None, load_kwargs: dict) -> dict:
    """What rebuilds an adapter's model, for a framework's saved config: shared_model(**load_arguments(...)).
    The folder as given (None stays None: the BGE-small weights wherever the loading machine has them); for a
    loaded Model, its folder, threads and the precision it runs."""
    if isinstance(model, Model):
        return {"model": str(model.path), "threads": model.threads, "precision": model.precision, **load_kwargs}
    return {"model": None if model is None else str(model), "threads": threads, **canonical_options(load_kwargs)}


def check_model_argument(model) -> None:
    """TypeError unless `model` is what the adapters take: a folder (str or path), None, or a loaded Model."""
    if not (model is None or isinstance(model, (str, os.PathLike, Model))):
        raise TypeError(
            f"model is {type(model).__name__}: pass a model folder (str or path), None for the BGE-small weights, "
            "or a Model from bgesmall.load"
        )


def _options_key(load_kwargs: dict) -> tuple:
    for name, value in load_kwargs.items():
        try:
            hash(value)
        except TypeError:
            raise TypeError(f"load option {name}={value!r} cannot key the shared model cache: pass a hashable value") from None
    return tuple(sorted(load_kwargs.items()))


def framework_texts(texts) -> list[str]:
    """What a framework passes as a list of texts -> list[str]: None -> []; a str, a non-iterable or a
    non-string item -> TypeError (naming the item's index), exactly as Model.embed checks its input."""
    return [] if texts is None else check_texts(texts)


def one_text(text, what: str = "the query") -> str:
    """A single text a framework passes (a query): it must be a str."""
    if not isinstance(text, str):
        raise TypeError(f"{what} is {type(text).__name__}, not str")
    return text


def passage_vectors(model: Model, texts) -> np.ndarray:
    """[n] passages -> [n, dim] float32 unit rows, no instruction; None or [] -> [0, dim]."""
    return model.embed(framework_texts(texts))


def query_vectors(model: Model, texts) -> np.ndarray:
    """[n] queries -> [n, dim] float32 unit rows, each with BGE's query instruction; None or [] -> [0, dim]."""
    return model.embed_queries(framework_texts(texts))


def missing_extra(framework: str, extra: str) -> ImportError:
    """The error for an adapter whose framework is not installed: what is missing and the pip line."""
    return ImportError(f'bgesmall.{extra.replace("-", "_")} needs {framework}: pip install "bgesmall[{extra}]"')
