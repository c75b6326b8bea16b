"""Embedding jobs over tables: one Parquet file streamed, or a resumable folder of shards.

A job folder holds part-000000.parquet, part-000001.parquet, ... (each `shard_rows` input rows, in order) and
manifest.json. A shard is written under a hidden temporary name, fsync'd and renamed when complete, so a file
with a final name is always whole. The same job run again continues after the last complete shard; a job whose
input, model, precision or settings differ from the manifest's is refused, with what changed said. The precision
recorded is the tier that runs (Model.precision: bf16 asked for on a CPU without AVX512_BF16 runs, and is
recorded as, fp32), so a folder never mixes shards of two tiers.

Every shard's rows are embedded in chunks of `batch_size` rows counted from the shard's first row, one model
call per chunk: the grouping depends on the shard's rows alone, so a resumed job's vectors are bit for bit those
of a job never interrupted.

Who embeds the shards is a `Shards` engine: `HereShards` (this process, `run_job`) or bgesmall.ray's actors
(`bgesmall embed --ray`). Either way this process reads the input, plans the shards, writes each one (temporary
name, fsync, rename) in order and keeps the manifest: `run_shards` is the one implementation of the folder.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from . import __version__
from .columns import EmbedOptions, check_keep, embed_batch, empty_output
from .fingerprint import combined, model_file_hashes
from .parquet_io import (Input, ParquetStream, TableError, commit, conform, part_name, pyarrow,
                         write_table_atomically)
from .precision import check_precision
from .progress import Progress

MANIFEST = "manifest.json"
FORMAT = "bgesmall-embed-job/1"
SHARD_RE = re.compile(r"^part-(\d{6})\.parquet$")
NULL_ROWS_KEY = b"bgesmall.null_rows"  # in each shard's schema metadata: its rows without a text
DEFAULT_SHARD_ROWS = 10_000  # ~2-3 minutes of work on 2 cores: what a kill can cost at most
NOTED_NULL_ROWS = 20  # rows without a text named in the summary and manifest (the rest are counted)


class JobError(TableError):
    """A job that cannot start or go on: the message says why and what to do."""


@dataclass
class Summary:
    rows: int = 0  # rows in the output (resumed ones included)
    null_rows: int = 0
    null_examples: list[str] = field(default_factory=list)  # where the first rows without a text are
    resumed_rows: int = 0  # rows found complete from an earlier run
    shards: int = 0
    seconds: float = 0.0

    def note_missing(self, where: Callable[[int], str], rows: list[int]) -> None:
        self.null_rows += len(rows)
        room = NOTED_NULL_ROWS - len(self.null_examples)
        self.null_examples += [where(r) for r in rows[:max(room, 0)]]

    def nulls_said(self) -> str:
        if not self.null_rows:
            return ""
        first = f"; first: {', '.join(self.null_examples[:3])}" if self.null_examples else ""
        return f"; {self.null_rows} row(s) without a text got a null embedding{first} (--strict makes that an error)"


def model_identity(model) -> dict:
    return folder_identity(model.path, model.name)


def folder_identity(folder: Path, name: str) -> dict:
    """The model as a job's manifest records it: its name and the sha256 of the files that decide its vectors."""
    hashes = model_file_hashes(folder)
    return {"name": name, "fingerprint": combined(hashes), "files": hashes}


def _chunks(inp: Input, start: int, rows: int) -> Iterator:
    """Tables of exactly `rows` input rows (the last may be shorter), from global row `start` on."""
    pa, _ = pyarrow()
    held, n = [], 0
    for batch in inp.batches(start, rows):
        held.append(batch)
        n += batch.num_rows
        while n >= rows:
            table = pa.Table.from_batches(held)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            held, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(held)


def embed_shard(model, table, opts: EmbedOptions, where: Callable[[int], str], first_row: int, batch_size: int,
                on_rows: Callable[[int], None] = lambda n: None) -> tuple[list, list[int]]:
    """[k] rows (global rows first_row...) -> (record batches with the embedding, the global rows without a text).

    One model call per `batch_size` rows counted from the table's first row: the vectors depend on its rows alone."""
    out, missing = [], []
    for offset in range(0, table.num_rows, batch_size):
        part = table.slice(offset, batch_size).combine_chunks().to_batches()
        if not part:
            continue
        batch, absent = embed_batch(model, part[0], opts, lambda i: where(first_row + offset + i))
        missing += [first_row + offset + i for i in absent]
        out.append(batch)
        on_rows(batch.num_rows)
    return out, missing


# ---- one file ----


def embed_to_file(model, inp: Input, out: Path, opts: EmbedOptions, *, batch_size: int = 256,
                  progress: bool = True) -> Summary:
    """Stream the input's rows into one Parquet file (via a temporary name), `batch_size` rows at a time."""
    start, summary = time.perf_counter(), Summary()
    writer = ParquetStream(out)
    bar = Progress(inp.total_rows, enabled=progress, unit="rows")
    try:
        for table in _chunks(inp, 0, batch_size):
            batches, missing = embed_shard(model, table, opts, inp.where, summary.rows, batch_size, bar.update)
            summary.note_missing(inp.where, missing)
            for batch in batches:
                writer.write(batch)
                summary.rows += batch.num_rows
        if writer.writer is None:  # no rows: an empty file with the output's columns
            writer.write(empty_output(model, inp.empty_batch(), opts))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


# ---- a resumable folder of shards ----


@dataclass(frozen=True)
class JobSettings:
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_size: int = 256
    # the numeric tier asked for (bgesmall.precision: "fp32" or "bf16", any case, kept canonical); None:
    # $BGESMALL_PRECISION, else fp32, when the model is loaded. The manifest records the tier that runs.
    precision: str | None = None

    def __post_init__(self):
        if self.precision is not None:
            object.__setattr__(self, "precision", check_precision(self.precision))


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"part-{index:06d}.parquet"


def job_identity(model: dict, inp: Input, opts: EmbedOptions, settings: JobSettings, precision: str) -> dict:
    """What a resumed job must share with the one that started the folder (`model`: a folder_identity;
    `precision`: the tier its shards are embedded in)."""
    return {
        "input": inp.fingerprint(),
        "model": model,
        "precision": precision,
        "query": opts.query,
        "keep": list(opts.keep) if opts.keep is not None else None,
        "output_column": opts.output_column,
        "shard_rows": settings.shard_rows,
        "batch_size": settings.batch_size,
        "bgesmall": __version__,
    }


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two job identities, in words."""
    said = []
    if old["input"] != new["input"]:
        said.append(_input_change(old["input"], new["input"]))
    if old["model"]["fingerprint"] != new["model"]["fingerprint"]:
        changed = sorted(k for k in set(old["model"]["files"]) | set(new["model"]["files"])
                         if old["model"]["files"].get(k) != new["model"]["files"].get(k))
        said.append(f"the model changed ({old['model']['name']} -> {new['model']['name']}; files that differ: "
                    f"{', '.join(changed)})")
    labels = {"precision": "precision", "query": "--query", "keep": "--keep", "output_column": "the output column",
              "shard_rows": "--shard-rows", "batch_size": "--batch-size", "bgesmall": "the bgesmall version"}
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            said.append(f"{label} changed ({old.get(key)!r} -> {new.get(key)!r})")
    return said


def _input_change(old: dict, new: dict) -> str:
    if old["field"] != new["field"]:
        return f"the text field changed ({old['field']!r} -> {new['field']!r})"
    before = {f["name"]: f for f in old["files"]}
    after = {f["name"]: f for f in new["files"]}
    parts = []
    if gone := sorted(set(before) - set(after)):
        parts.append(f"no longer there: {', '.join(gone)}")
    if added := sorted(set(after) - set(before)):
        parts.append(f"new: {', '.join(added)}")
    for name in sorted(set(before) & set(after)):
        if before[name]["size"] != after[name]["size"]:
            parts.append(f"{name} changed size ({before[name]['size']} -> {after[name]['size']} bytes)")
        elif before[name] != after[name]:
            parts.append(f"{name} changed content")
    if not parts and [f["name"] for f in old["files"]] != [f["name"] for f in new["files"]]:
        parts.append("the files' order changed")
    return "the input changed (" + "; ".join(parts or ["its kind changed"]) + ")"


class JobFolder:
    """The output folder of a resumable job: its manifest and its complete shards."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest_path = folder / MANIFEST

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise JobError(f"{self.manifest_path}: unreadable ({e}); delete {self.folder} to start over") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise JobError(f"{self.manifest_path} is not a bgesmall job manifest; choose another --output folder")
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        part = part_name(self.manifest_path)
        try:
            part.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            commit(part, self.manifest_path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def ours(self) -> list[Path]:
        """Files this job writes: shards, their temporaries, the manifest."""
        return [p for p in self.folder.iterdir()
                if SHARD_RE.match(p.name) or p.name == MANIFEST or
                (p.name.startswith(".") and p.name.endswith(".part") and
                 (SHARD_RE.match(p.name[1:-5]) or p.name[1:-5] == MANIFEST))]

    def prepare(self, overwrite: bool) -> dict | None:
        """Make the folder ready: -> the manifest of the job already there, or None for a new job."""
        if self.folder.exists() and not self.folder.is_dir():
            raise JobError(f"--output {self.folder} is a file; a job writes a folder of shards (give a new folder)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JobError(f"cannot create {self.folder}: {e.strerror or e}") from None
        manifest = self.read_manifest()
        others = [p.name for p in self.folder.iterdir() if p not in self.ours()]
        if manifest is None and (others or self.ours()):
            shown = ", ".join(sorted(others or [p.name for p in self.ours()])[:5])
            raise JobError(f"--output {self.folder} holds files that are not this job's ({shown}); "
                           "give an empty or new folder")
        if overwrite:
            for p in self.ours():
                p.unlink()
            return None
        for p in self.ours():  # temporaries of a killed run: never complete
            if p.name.endswith(".part"):
                p.unlink()
        return manifest

    def complete_shards(self, shard_rows: int) -> list[tuple[Path, int, int]]:
        """(path, rows, rows without a text) of the complete shards, which must follow on from part-000000."""
        _, pq = pyarrow()
        found = sorted((int(m.group(1)), p) for p in self.folder.iterdir() if (m := SHARD_RE.match(p.name)))
        shards = []
        for expect, (index, path) in enumerate(found):
            if index != expect:
                raise JobError(f"{self.folder}: shard {shard_path(self.folder, expect).name} is missing but later "
                               "ones exist; the folder was changed by hand: run with --overwrite to start over")
            meta = pq.ParquetFile(path).metadata
            nulls = int((meta.metadata or {}).get(NULL_ROWS_KEY, b"0"))
            shards.append((path, meta.num_rows, nulls))
        for path, rows, _ in shards[:-1]:
            if rows != shard_rows:
                raise JobError(f"{path} holds {rows} rows, not {shard_rows}: run with --overwrite to start over")
        return shards


class Shards(Protocol):
    """Who embeds a job's shards. `embed` yields, for each (first global row, table) it is given and in that
    order, (record batches with the embedding, the global rows without a text), calling on_rows(n) as rows are
    done; it may read ahead (several shards at work at once). `empty` is a no-row output with the columns."""

    def model_identity(self) -> dict: ...

    def precision(self, settings: JobSettings) -> str:
        """The tier the shards are embedded in, as the manifest records it (known before anything is embedded)."""
        ...

    def embed(self, shards: Iterator, opts: EmbedOptions, settings: JobSettings, where: Callable[[int], str],
              on_rows: Callable[[int], None]) -> Iterator[tuple[list, list[int]]]: ...

    def empty(self, inp: Input, opts: EmbedOptions, settings: JobSettings): ...


class HereShards:
    """The shards embedded in this process, one after another."""

    def __init__(self, model):
        self.model = model

    def model_identity(self) -> dict:
        return model_identity(self.model)

    def precision(self, settings: JobSettings) -> str:
        return self.model.precision  # what runs: loaded with settings.precision, or fp32 where bf16 cannot run

    def embed(self, shards, opts, settings, where, on_rows):
        for first_row, table in shards:
            yield embed_shard(self.model, table, opts, where, first_row, settings.batch_size, on_rows)

    def empty(self, inp, opts, settings):
        return empty_output(self.model, inp.empty_batch(), opts)


def run_job(model, inp: Input, folder: Path, opts: EmbedOptions, settings: JobSettings = JobSettings(), *,
            overwrite: bool = False, progress: bool = True) -> Summary:
    """Embed the input into `folder` as shards, continuing after the last complete shard of an earlier run.
    The model is loaded by the caller (with settings.precision); the manifest records model.precision."""
    from .precision import runnable

    if settings.precision is not None and runnable(settings.precision) != model.precision:
        raise ValueError(f"settings.precision is {settings.precision!r} but the model runs {model.precision!r}: "
                         f"load it with bgesmall.load(..., precision={settings.precision!r})")
    return run_shards(HereShards(model), inp, folder, opts, settings, overwrite=overwrite, progress=progress)


def run_shards(engine: Shards, inp: Input, folder: Path, opts: EmbedOptions, settings: JobSettings = JobSettings(),
               *, overwrite: bool = False, progress: bool = True) -> Summary:
    """run_job with the shards embedded by `engine`; this process reads, plans, writes and keeps the manifest."""
    check_keep(inp.empty_batch().schema, opts.keep)
    job = JobFolder(folder)
    identity = job_identity(engine.model_identity(), inp, opts, settings, engine.precision(settings))
    manifest = job.prepare(overwrite)
    if manifest is not None:
        changed = differences(manifest["job"], identity)
        if changed:
            raise JobError(f"{folder} holds a job that differs from this one: {'; '.join(changed)}. To start over, "
                           f"run the command with --overwrite or delete {folder}; or write to another --output")
    summary = Summary()
    done = job.complete_shards(settings.shard_rows)
    summary.shards = len(done)
    summary.rows = summary.resumed_rows = sum(rows for _, rows, _ in done)
    summary.null_rows = sum(nulls for _, _, nulls in done)
    summary.null_examples = list((manifest or {}).get("null_examples", []))
    shard_list = [{"file": p.name, "rows": r, "null_rows": n} for p, r, n in done]

    def save(complete: bool) -> None:
        job.write_manifest({"format": FORMAT, "job": identity, "complete": complete, "rows": summary.rows,
                            "null_rows": summary.null_rows, "null_examples": summary.null_examples,
                            "shards": shard_list})

    if manifest is not None and manifest.get("complete") and len(done) == len(manifest.get("shards", [])):
        return summary  # nothing left to do
    start = time.perf_counter()
    try:
        save(False)
        total = inp.total_rows
        bar = Progress(total, enabled=progress, unit="rows", initial=summary.rows)
        try:
            tables = _shard_tables(inp, summary.rows, settings.shard_rows)
            for batches, missing in engine.embed(tables, opts, settings, inp.where, bar.update):
                rows = sum(b.num_rows for b in batches)
                summary.note_missing(inp.where, missing)
                path = shard_path(folder, summary.shards)
                _write_shard(path, batches, len(missing), _first_schema(folder), summary.rows)
                summary.shards += 1
                summary.rows += rows
                shard_list.append({"file": path.name, "rows": rows, "null_rows": len(missing)})
                save(False)
            if summary.shards == 0:  # an empty input: one empty shard, so readers see the columns
                path = shard_path(folder, 0)
                _write_shard(path, [engine.empty(inp, opts, settings)], 0)
                summary.shards = 1
                shard_list.append({"file": path.name, "rows": 0, "null_rows": 0})
            save(True)
        finally:
            bar.close()
    except OSError as e:
        raise JobError(f"cannot write to {folder}: {e.strerror or e}; the {summary.shards} complete shard(s) are "
                       "kept: fix the cause (e.g. free disk space) and run the same command again to continue") from None
    summary.seconds = time.perf_counter() - start
    return summary


def _shard_tables(inp: Input, start: int, shard_rows: int) -> Iterator:
    """(first global row, table) of each shard from global row `start` on."""
    for table in _chunks(inp, start, shard_rows):
        yield start, table
        start += table.num_rows


def _first_schema(folder: Path):
    """The columns of part-000000 (every shard keeps them), or None before it is written."""
    _, pq = pyarrow()
    first = shard_path(folder, 0)
    return pq.read_schema(first).remove_metadata() if first.is_file() else None


def _write_shard(path: Path, batches: list, null_rows: int, schema=None, first_row: int = 0) -> None:
    pa, _ = pyarrow()
    if schema is not None:  # JSONL records whose types differ from the first shard's: cast, or say which column
        batches = [b if b.schema.equals(schema) else conform(pa, b, schema, first_row) for b in batches]
    table = pa.Table.from_batches(batches)
    write_table_atomically(path, table, {NULL_ROWS_KEY: str(null_rows).encode()})


def read_job(folder: Path):
    """The output of a complete job folder as one Arrow table, rows in input order."""
    pa, pq = pyarrow()
    folder = Path(folder)
    manifest = JobFolder(folder).read_manifest()
    if manifest is None:
        raise JobError(f"{folder} holds no {MANIFEST}: not a bgesmall job folder")
    return pa.concat_tables(pq.read_table(folder / s["file"]) for s in manifest["shards"])
