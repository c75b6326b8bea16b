"""Tables in and out: a job's input rows (Parquet files, or one .txt/.jsonl file) as Arrow record batches, and
Parquet files written so that none is ever seen half-written under its final name.

pyarrow is the optional extra `parquet`; this module imports it only when a table is read or written.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .fingerprint import input_file_fingerprint

EXTRA = "pip install 'bgesmall[parquet]'"
GLOB_CHARS = "*?["


class TableError(Exception):
    """An input or output problem the user can fix: said as it is, exit code 1."""


def pyarrow():
    """(pyarrow, pyarrow.parquet), or a TableError saying which extra to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"Parquet needs pyarrow, which is not installed: {EXTRA}") from None
    return pa, pq


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "txt"


def input_files(spec: str) -> list[Path]:
    """A file, a folder (its *.parquet files, recursively) or a glob -> the files, sorted (the row order)."""
    if any(c in spec for c in GLOB_CHARS) and not Path(spec).exists():
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise TableError(f"--input {spec}: the pattern matches no file")
    elif Path(spec).is_dir():
        files = sorted(p for p in Path(spec).rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise TableError(f"--input {spec}: the folder holds no .parquet file")
    elif Path(spec).is_file():
        files = [Path(spec)]
    else:
        raise TableError(f"cannot read {spec}: no such file or folder")
    kinds = {kind_of(p) for p in files}
    if len(files) > 1 and kinds != {"parquet"}:
        raise TableError(f"--input {spec}: several files are read only when all are .parquet "
                         f"(found {', '.join(sorted(kinds))})")
    return files


@dataclass
class Input:
    """The rows of a job, numbered from 0 across its files in order.

    Parquet: every column, the text in `field`. JSONL: each record's fields (a record lacking `field`, or whose
    value there is not a string, keeps a null in it). Text: one row per line, in a column `field`."""

    spec: str
    field: str
    files: list[Path]
    kind: str
    rows_per_file: list[int] | None  # Parquet: from the footers; else None (counted while reading)

    @classmethod
    def open(cls, spec: str, field: str | None) -> "Input":
        files = input_files(spec)
        kind = kind_of(files[0])
        field = field or "text"
        if kind != "parquet":
            return cls(spec, field, files, kind, None)
        _, pq = pyarrow()
        rows = []
        for path in files:
            schema, meta = _parquet_footer(pq, path)
            if field not in schema.names:
                raise TableError(f"{path} has no column {field!r} (its columns: {', '.join(schema.names)}); "
                                 "choose the text column with --field NAME")
            rows.append(meta.num_rows)
        return cls(spec, field, files, kind, rows)

    @property
    def total_rows(self) -> int | None:
        if self.rows_per_file is not None:
            return sum(self.rows_per_file)
        return count_lines(self.files[0])  # an upper bound for JSONL (blank lines are not rows)

    def fingerprint(self) -> dict:
        """What a resumed job checks: the field, and each file's name, size and sampled sha256."""
        base = Path(self.spec) if Path(self.spec).is_dir() else None
        return {"kind": self.kind, "field": self.field, "files": [
            {"name": str(p.relative_to(base) if base else p.name), **input_file_fingerprint(p)} for p in self.files]}

    def where(self, row: int) -> str:
        """Where global row `row` comes from, for messages: 'docs/b.parquet row 5' or 'docs.jsonl record 3'."""
        if self.rows_per_file is None:
            return f"{self.files[0]} {'line' if self.kind == 'txt' else 'record'} {row + 1}"
        for path, n in zip(self.files, self.rows_per_file):
            if row < n:
                return f"{path} row {row}"
            row -= n
        return f"{self.spec} row {row}"

    def batches(self, start: int, rows: int) -> Iterator:
        """Record batches of at most `rows` rows, from global row `start` on, in order."""
        if self.kind == "parquet":
            yield from self._parquet_batches(start, rows)
        else:
            yield from self._line_batches(start, rows)

    def empty_batch(self):
        """A batch with this input's columns and no rows (the schema of an empty output)."""
        pa, pq = pyarrow()
        if self.kind == "parquet":
            return pa.RecordBatch.from_pylist([], schema=_parquet_footer(pq, self.files[0])[0])
        return pa.RecordBatch.from_pydict({self.field: pa.array([], pa.string())})

    def _parquet_batches(self, start: int, rows: int) -> Iterator:
        _, pq = pyarrow()
        for path, n in zip(self.files, self.rows_per_file):
            if start >= n:
                start -= n
                continue
            try:
                f = pq.ParquetFile(path)
                groups, skip = [], start
                for g in range(f.metadata.num_row_groups):  # whole row groups before `start` are not read
                    g_rows = f.metadata.row_group(g).num_rows
                    if skip >= g_rows and not groups:
                        skip -= g_rows
                    else:
                        groups.append(g)
                for batch in f.iter_batches(batch_size=rows, row_groups=groups):
                    if skip:
                        batch, skip = batch.slice(min(skip, batch.num_rows)), max(0, skip - batch.num_rows)
                    if batch.num_rows:
                        yield batch
            except OSError as e:
                raise TableError(f"cannot read {path}: {e}") from None
            start = 0

    def _line_batches(self, start: int, rows: int) -> Iterator:
        pa, _ = pyarrow()
        path = self.files[0]
        records: list = []
        row = 0
        try:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    record = self._record(raw, number, path)
                    if record is None:
                        continue
                    row += 1
                    if row <= start:
                        continue
                    records.append(record)
                    if len(records) == rows:
                        yield self._to_batch(pa, records)
                        records = []
        except OSError as e:
            raise TableError(f"cannot read {path}: {e.strerror or e}") from None
        if records:
            yield self._to_batch(pa, records)

    def _record(self, raw: bytes, number: int, path: Path) -> dict | None:
        # one line -> a record ({field: text} for a text file), or None for a blank JSONL line
        try:
            line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
        except UnicodeDecodeError as e:
            raise TableError(f"{path} line {number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        if self.kind == "txt":
            return {self.field: line}
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TableError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TableError(f"{path} line {number}: a JSON {type(obj).__name__}, not an object")
        if not isinstance(obj.get(self.field), str):  # missing, null or not a string: a null text, counted later
            obj[self.field] = None
        return obj

    def _to_batch(self, pa, records: list):
        batch = pa.RecordBatch.from_pylist(records)
        i = batch.schema.get_field_index(self.field)
        if batch.column(i).type != pa.string():  # all null in this batch: still a string column
            batch = batch.set_column(i, self.field, batch.column(i).cast(pa.string()))
        return batch


def _parquet_footer(pq, path: Path):
    try:
        f = pq.ParquetFile(path)
        return f.schema_arrow, f.metadata
    except Exception as e:  # ArrowInvalid for a file that is not Parquet, OSError for an unreadable one
        raise TableError(f"cannot read {path}: not a readable Parquet file ({e})") from None


def count_lines(path: Path) -> int:
    """Lines in a file, a last line without a newline included."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


# ---- writing ----


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def part_name(path: Path) -> Path:
    """The hidden temporary name a file is written under before it gets `path`."""
    return path.with_name(f".{path.name}.part")


def commit(part: Path, path: Path) -> None:
    """fsync `part`, rename it to `path`, fsync the folder: after this, `path` is complete on disk."""
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, path)
    fsync_dir(path.parent)


def write_table_atomically(path: Path, table, metadata: dict[str, str] | None = None, row_group_rows: int = 8192):
    """Write a whole Arrow table as the Parquet file `path`, via a temporary name; nothing is left on failure."""
    _, pq = pyarrow()
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    part = part_name(path)
    try:
        pq.write_table(table, part, row_group_size=row_group_rows)
        commit(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class ParquetStream:
    """A Parquet file written batch by batch under a temporary name, renamed by close(); abort() removes it.

    The first batch sets the schema; a later batch whose column types differ (JSONL records that disagree) is
    cast to it, or refused with the column named."""

    def __init__(self, path: Path):
        self.path, self.part, self.rows = path, part_name(path), 0
        self.writer = None

    def write(self, batch) -> None:
        pa, pq = pyarrow()
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.part, batch.schema)
        elif batch.schema != self.writer.schema:
            batch = conform(pa, batch, self.writer.schema, self.rows)
        self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self.writer.close()
        commit(self.part, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.part.unlink(missing_ok=True)


def conform(pa, batch, schema, first_row: int):
    """`batch` with the columns and types of `schema` (a missing column as nulls), or a TableError naming the column."""
    columns = []
    for f in schema:
        if f.name not in batch.schema.names:
            columns.append(pa.nulls(batch.num_rows, f.type))
            continue
        col = batch.column(f.name)
        try:
            columns.append(col.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise TableError(f"column {f.name!r} is {col.type} from row {first_row} on, but {f.type} before: "
                             "the output file needs one type per column") from None
    extra = [n for n in batch.schema.names if n not in schema.names]
    if extra:
        raise TableError(f"column(s) {', '.join(extra)} first appear at row {first_row} or later: the output file's "
                         "columns are those of the first rows; name the columns to keep with --keep")
    return pa.RecordBatch.from_arrays(columns, schema=schema)
