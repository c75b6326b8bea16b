"""Arrow columns in, an embedding column out: the step every table job shares (one file, shards, Ray).

The embedding is a fixed-size list<float32>[dim] column; a row without a text (missing, null, not a string)
gets a null there and is counted, or, with strict, stops the job with the row named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .parquet_io import TableError, pyarrow

EMBEDDING = "embedding"


@dataclass(frozen=True)
class EmbedOptions:
    field: str = "text"
    output_column: str = EMBEDDING
    query: bool = False
    strict: bool = False
    keep: tuple[str, ...] | None = None  # input columns to keep beside the embedding; None: all of them


def texts_of(batch, field: str) -> list[str | None]:
    """The batch's `field` as Python strings; None where a row has no string there."""
    pa, _ = pyarrow()
    if field not in batch.schema.names:
        raise TableError(f"no column {field!r} (the columns: {', '.join(batch.schema.names)}); "
                         "choose the text column with --field NAME")
    col = batch.column(field)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode() if hasattr(col, "dictionary_decode") else col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or getattr(pa.types, "is_string_view", lambda t: False)(col.type)):
        return [None] * len(col)  # numbers, lists, ...: no row holds a text
    return col.to_pylist()


def check_keep(schema, keep: tuple[str, ...] | None) -> None:
    if keep:
        missing = [k for k in keep if k not in schema.names]
        if missing:
            raise TableError(f"--keep {','.join(keep)}: no column {', '.join(map(repr, missing))} in the input "
                             f"(its columns: {', '.join(schema.names)})")


def with_embedding(batch, vectors: np.ndarray, valid: np.ndarray, opts: EmbedOptions):
    """[n] rows + [n, dim] float32 + [n] bool -> the kept columns and the embedding column (null where not valid)."""
    pa, _ = pyarrow()
    names = list(opts.keep) if opts.keep is not None else [n for n in batch.schema.names if n != opts.output_column]
    check_keep(batch.schema, opts.keep)
    n, dim = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(n * dim))
    mask = None if valid.all() else pa.array(~valid)
    emb = pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)
    arrays = [batch.column(name) for name in names] + [emb]
    return pa.RecordBatch.from_arrays(arrays, names=names + [opts.output_column])


def empty_output(model, batch, opts: EmbedOptions):
    """A batch with no rows -> the output's columns and no rows (what an empty input gives)."""
    return with_embedding(batch, np.zeros((0, model.dim), np.float32), np.zeros(0, bool), opts)


def embed_batch(model, batch, opts: EmbedOptions, where: Callable[[int], str] = lambda i: f"row {i}"):
    """[n] rows -> ([n] rows with the embedding column, the indices of rows without a text).

    The texts are embedded in one model call, so the vectors depend on this batch's rows alone."""
    texts = texts_of(batch, opts.field)
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing and opts.strict:
        raise TableError(f"{where(missing[0])}: no text in {opts.field!r} (missing, null or not a string), "
                         f"and --strict is set; {len(missing)} such row(s) in this batch")
    vectors = np.zeros((len(texts), model.dim), dtype=np.float32)
    valid = np.array([t is not None for t in texts], dtype=bool)
    present = [t for t in texts if t is not None]
    if present:
        vectors[valid] = model.embed_queries(present) if opts.query else model.embed(present)
    return with_embedding(batch, vectors, valid, opts), missing
