"""The `bgesmall` command: embed, similarity, info, download, serve.

Exit codes: 0 success, 2 usage error (argparse, or a --precision / $BGESMALL_PRECISION that is not a tier: one
line naming the valid ones), 1 runtime failure with the reason on stderr (no traceback for an expected failure: a
missing model, a bad input line, a failed download, an unwritable output).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import IO
from collections.abc import Iterable, Iterator

PROG = "bgesmall"
NPY_HEADER_BYTES = 128  # fixed .npy header size, so the row count can be filled in after streaming the rows


class CLIError(Exception):
    """An expected runtime failure: printed as `bgesmall <command>: <message>`, exit code 1."""


# ---- reading texts ----


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _lines(stream: IO[bytes], source: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, without its line ending; a UTF-8 BOM on the first line is dropped."""
    for number, raw in enumerate(stream, start=1):
        text = _decode(raw, f"{source} line {number}").rstrip("\n").rstrip("\r")
        if number == 1:
            text = text.removeprefix("\ufeff")
        yield number, text


def _jsonl_texts(lines: Iterable[tuple[int, str]], source: str, field: str, records: list | None) -> Iterator[str]:
    for number, line in lines:
        if not line.strip():
            continue  # blank lines separate nothing in JSONL
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{source} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise CLIError(f"{source} line {number}: no field {field!r} (choose the text field with --field NAME)")
        if not isinstance(obj[field], str):
            raise CLIError(f"{source} line {number}: field {field!r} is {type(obj[field]).__name__}, not a string")
        if records is not None:
            records.append(obj)
        yield obj[field]


def _open_input(name: str) -> tuple[IO[bytes], str]:
    if name == "-":
        return sys.stdin.buffer, "stdin"
    try:
        return open(name, "rb"), name
    except OSError as e:
        raise CLIError(f"cannot read {name}: {e.strerror}") from None


def _count_lines(name: str) -> int | None:
    """Lines in a regular file (for the progress total); None for stdin or a pipe."""
    if name == "-" or not os.path.isfile(name):
        return None
    from .parquet_io import count_lines  # no pyarrow needed for this

    return count_lines(Path(name))


# ---- writing embeddings ----


def _row_json(row) -> str:
    # 9 significant digits round-trip a float32 exactly
    return "[" + ",".join(f"{x:.9g}" for x in row.tolist()) + "]"


class _PartFile:
    """An output file written under a hidden temporary name and renamed only when complete, so a failed run
    leaves nothing half-written behind."""

    def __init__(self, path: Path, mode: str):
        self.path, self.rows = path, 0
        self.part = path.with_name(f".{path.name}.part")
        self.f = open(self.part, mode, **({} if "b" in mode else {"encoding": "utf-8"}))

    def close(self) -> None:
        self.f.close()
        os.replace(self.part, self.path)

    def abort(self) -> None:
        self.f.close()
        self.part.unlink(missing_ok=True)


class NpyWriter(_PartFile):
    """Streams rows into a .npy file: a fixed-size header placeholder, the rows, then the real header."""

    def __init__(self, path: Path, dim: int):
        super().__init__(path, "wb")
        self.dim = dim
        self.f.write(b"\0" * NPY_HEADER_BYTES)

    def write(self, block) -> None:  # [k, dim] float32
        self.f.write(block.astype("<f4", copy=False).tobytes(order="C"))
        self.rows += block.shape[0]

    def close(self) -> None:
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (self.rows, self.dim)
        pad = NPY_HEADER_BYTES - 10 - len(header) - 1
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + (NPY_HEADER_BYTES - 10).to_bytes(2, "little"))
        self.f.write((header + " " * pad + "\n").encode("latin1"))
        super().close()


class JsonlWriter(_PartFile):
    """One JSON object per line: the input record (JSONL input) or {index, text}, plus "embedding"."""

    def __init__(self, path: Path, records: list | None):
        super().__init__(path, "w")
        self.records = records

    def write(self, block, texts: list[str]) -> None:
        for row, text in zip(block, texts):
            if self.records is not None:
                obj = dict(self.records.pop(0))
                obj.pop("embedding", None)
            else:
                obj = {"index": self.rows, "text": text}
            # ASCII escapes keep every text writable, lone surrogates included; the line stays valid JSON.
            head = json.dumps(obj, ensure_ascii=True)[:-1] + (", " if obj else "")
            self.f.write(head + '"embedding": ' + _row_json(row) + "}\n")
            self.rows += 1


class JsonArrayWriter:
    """A JSON array of arrays, one row per line, streamed to stdout or (via a temporary name) to a .json file."""

    def __init__(self, stream: IO[str] | None = None, path: Path | None = None):
        self.path, self.rows = path, 0
        self.part = path.with_name(f".{path.name}.part") if path is not None else None
        self.stream = open(self.part, "w", encoding="utf-8") if self.part is not None else stream
        self.stream.write("[")

    def write(self, block) -> None:
        for row in block:
            self.stream.write(("\n" if self.rows == 0 else ",\n") + _row_json(row))
            self.rows += 1
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n]\n" if self.rows else "]\n")
        self.stream.flush()
        if self.part is not None:
            self.stream.close()
            os.replace(self.part, self.path)

    def abort(self) -> None:
        if self.part is not None:
            self.stream.close()
            self.part.unlink(missing_ok=True)


# ---- commands ----


def _load(model_dir: str | None, precision: str | None = None, command: str = "embed", **options):
    """bgesmall.load, its warnings (bf16 asked for on a CPU without AVX512_BF16) said on one line each."""
    import bgesmall

    with warnings.catch_warnings(record=True) as said:  # the filters in force still apply
        model = bgesmall.load(model_dir, precision=precision, **options)
    for w in said:
        print(f"{PROG} {command}: {str(w.message).removeprefix('bgesmall: ')}", file=sys.stderr)
    return model


def _progress(total: int | None, enabled: bool):
    from .progress import Progress

    return Progress(total, enabled=enabled, unit="texts")


def _tee(texts: Iterable[str], seen: list[str]) -> Iterator[str]:
    for t in texts:
        seen.append(t)
        yield t


def cmd_embed(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.subparser
    if _table_job(args):
        return _embed_table(args)
    if args.keep or args.strict or args.overwrite or args.shard_rows is not None:
        parser.error("--keep, --strict, --overwrite and --shard-rows apply to Parquet output or a job folder "
                     "(--output FILE.parquet or --output FOLDER)")
    source = "-" if args.texts == ["-"] else args.input  # a file or stdin; None: the TEXT arguments
    if args.texts and args.input:
        parser.error("give texts as arguments (or -) or with --input FILE, not both")
    if "-" in args.texts and args.texts != ["-"]:
        parser.error("'-' (read stdin) cannot be mixed with texts given as arguments")
    if not args.texts and not args.input:
        parser.error("no texts: give TEXT arguments, --input FILE, or - to read standard input")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    out = Path(args.output) if args.output else None
    kind = out.suffix.lower() if out else None
    if kind not in (None, ".npy", ".jsonl", ".json"):
        parser.error(f"--output {args.output}: unknown format {kind or '(no extension)'}; use .npy, .jsonl or .json")

    if source is None and args.field:
        parser.error("--field applies to --input FILE or - (JSONL), not to texts given as arguments")

    with contextlib.ExitStack() as closing:
        records: list | None = None
        if source is None:
            texts: Iterable[str] = list(args.texts)
            total: int | None = len(args.texts)
        else:
            field = args.field
            if field is None and source.lower().endswith((".jsonl", ".ndjson")):
                field = "text"
            stream, label = _open_input(source)
            if stream is not sys.stdin.buffer:
                closing.enter_context(stream)
            lines = _lines(stream, label)
            if field is not None:
                records = [] if kind == ".jsonl" else None
                texts = _jsonl_texts(lines, label, field, records)
            else:
                texts = (t for _, t in lines)
            total = _count_lines(source)
        return _embed_stream(args, texts, total, out, kind, records)


# ---- tables: Parquet in or out, resumable job folders, Ray (the work is in bgesmall.jobs and bgesmall.ray) ----


def _table_job(args: argparse.Namespace) -> bool:
    """Parquet in or out, a folder as output (a resumable job) or --ray: the table path."""
    out = Path(args.output) if args.output else None
    source = args.input or ""
    return (args.ray is not None or (out is not None and out.suffix.lower() in (".parquet", ""))
            or source.lower().endswith(".parquet") or os.path.isdir(source)
            or (any(c in source for c in "*?[") and not os.path.exists(source)))


def _embed_table(args: argparse.Namespace) -> int:
    from .columns import EmbedOptions
    from .parquet_io import TableError

    parser: argparse.ArgumentParser = args.subparser
    if not args.input or args.input == "-" or args.texts:
        parser.error("Parquet output, a job folder and --ray read --input FILE, FOLDER or 'GLOB' "
                     "(not standard input or TEXT arguments)")
    out = Path(args.output) if args.output else None
    if out is None or out.suffix.lower() not in (".parquet", ""):
        parser.error(f"--input {args.input} is read as a table: give --output FILE.parquet or --output FOLDER "
                     "(a resumable job)")
    if args.ray is not None and out.suffix.lower() == ".parquet":
        parser.error("--ray writes a resumable job folder: give --output FOLDER (not FILE.parquet)")
    if args.batch_size < 1 or (args.shard_rows is not None and args.shard_rows < 1):
        parser.error("--batch-size and --shard-rows must be at least 1")
    keep = tuple(k.strip() for k in args.keep.split(",") if k.strip()) if args.keep else None
    opts = EmbedOptions(field=args.field or "text", query=args.query, strict=args.strict, keep=keep)
    from . import jobs

    settings = jobs.JobSettings(shard_rows=args.shard_rows or jobs.DEFAULT_SHARD_ROWS, batch_size=args.batch_size,
                                precision=args.precision)
    try:
        if args.ray is not None:
            return _embed_on_ray(args, opts, out, settings)
        return _embed_table_here(args, opts, out, settings)
    except TableError as e:
        raise CLIError(str(e)) from None


def _job_said(summary, out: Path) -> str:
    resumed = f" ({summary.resumed_rows} done by an earlier run)" if summary.resumed_rows else ""
    return f"{summary.shards} shard(s) in {out}{resumed}{summary.nulls_said()}"


def _embed_table_here(args: argparse.Namespace, opts, out: Path, settings) -> int:
    from . import jobs
    from .parquet_io import Input

    inp = Input.open(args.input, args.field)
    model = _load(args.model, args.precision)
    if out.suffix.lower() == ".parquet":
        if out.parent and not out.parent.is_dir():
            raise CLIError(f"cannot write {out}: folder {out.parent} does not exist")
        try:
            summary = jobs.embed_to_file(model, inp, out, opts, batch_size=args.batch_size, progress=not args.quiet)
        except OSError as e:
            raise CLIError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"{PROG} embed: wrote {summary.rows} embeddings x {model.dim} to {out}{summary.nulls_said()}",
              file=sys.stderr)
        return 0
    summary = jobs.run_job(model, inp, out, opts, settings, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{PROG} embed: {summary.rows} embeddings x {model.dim} in {_job_said(summary, out)}", file=sys.stderr)
    return 0


def _embed_on_ray(args: argparse.Namespace, opts, out: Path, settings) -> int:
    try:
        from . import ray as bgesmall_ray
    except ImportError as e:
        raise CLIError(f"--ray needs Ray Data, which is not installed ({e}): pip install 'bgesmall[ray]'") from None
    summary = bgesmall_ray.run_job(args.input, out, opts, model_dir=args.model, address=args.ray,
                                   model_path_shared=args.model_shared, settings=settings, overwrite=args.overwrite,
                                   progress=not args.quiet)
    print(f"{PROG} embed: {summary.rows} embeddings on Ray in {_job_said(summary, out)}", file=sys.stderr)
    return 0


def _embed_stream(args, texts: Iterable[str], total: int | None, out: Path | None, kind: str | None,
                  records: list | None) -> int:
    """Embed `texts` chunk by chunk and stream the rows to the chosen writer."""
    model = _load(args.model, args.precision)
    if out is not None and out.parent and not out.parent.is_dir():
        raise CLIError(f"cannot write {out}: folder {out.parent} does not exist")
    seen: list[str] = []
    try:
        if kind == ".npy":
            writer = NpyWriter(out, model.dim)
        elif kind == ".jsonl":
            writer = JsonlWriter(out, records)
        elif kind == ".json":
            writer = JsonArrayWriter(path=out)
        else:
            writer = JsonArrayWriter(sys.stdout)
    except OSError as e:
        raise CLIError(f"cannot write {out or 'standard output'}: {e.strerror or e}") from None
    bar = _progress(total, enabled=not args.quiet)
    ok = False
    try:
        for block in model.embed_iter(_tee(texts, seen), chunk_size=args.batch_size, query=args.query):
            if isinstance(writer, JsonlWriter):
                writer.write(block, seen[: block.shape[0]])
            else:
                writer.write(block)
            del seen[: block.shape[0]]
            bar.update(block.shape[0])
        ok = True
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        raise CLIError(f"cannot write {out or 'standard output'}: {e.strerror or e}") from None
    finally:
        bar.close()
        if not ok:
            writer.abort()
    try:
        writer.close()
    except OSError as e:
        writer.abort()
        raise CLIError(f"cannot write {out or 'standard output'}: {e.strerror or e}") from None
    if out is not None:
        print(f"{PROG} embed: wrote {writer.rows} embeddings x {model.dim} to {out}", file=sys.stderr)
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    model = _load(args.model, args.precision, "similarity")
    a = model.embed_queries([args.a]) if args.query else model.embed([args.a])
    b = model.embed([args.b])
    print(f"{float(a[0] @ b[0]):.6f}")  # rows are unit vectors: the dot product is the cosine
    return 0


def _blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        names = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
        env = ", ".join(f"{n}={os.environ[n]}" for n in names if n in os.environ)
        return f"unknown (threadpoolctl not installed; {env or 'no OPENBLAS/MKL/OMP_NUM_THREADS set'})"
    import numpy  # noqa: F401  (loads the BLAS so threadpoolctl can see it)

    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return "unknown (no BLAS library found by threadpoolctl)"
    return ", ".join(f"{p['num_threads']} ({p.get('internal_api')}, {Path(p['filepath']).name})" for p in pools)


def _numba_cache_dir() -> str:
    import numba

    if numba.config.CACHE_DIR:
        return f"{numba.config.CACHE_DIR} (NUMBA_CACHE_DIR)"
    try:
        from .kernels import compile_ahead

        return str(compile_ahead._cache_dir() or "none writable: the kernels compile in memory")
    except Exception:  # a numba internals change must not break `info`
        return "next to the kernel modules (__pycache__), else numba's user cache"


TIERS_SAID = {"fp32": "the exact tier, float32 throughout",
              "bf16": "linear layers in bfloat16 via AVX512_BF16; sums and the rest in float32"}


def precision_note(asked: str, runs: str) -> str | None:
    """Why the tier that runs is not the one asked for (None when it is)."""
    if asked == runs:
        return None
    if asked == "bf16":
        return "bf16 was asked for, but this CPU has no AVX512_BF16: the exact fp32 tier runs instead"
    return f"{asked} was asked for, but {runs} runs"


def info_dict(model, precision: str | None = None) -> dict:
    """What `bgesmall info` says; `precision`: the tier asked for (default: the one that runs)."""
    from . import download

    cfg = model.config
    asked = precision or model.precision
    return {
        "model": model.name,
        "path": str(model.path),
        "pinned": f"{download.REPO_ID}@{download.REVISION}",
        "precision": model.precision,
        "precision_requested": asked,
        "precision_note": precision_note(asked, model.precision),
        "dim": model.dim,
        "parameters": model.num_parameters,
        "max_tokens": model.max_tokens,
        "pooling": model.pooling,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "worker_threads": model.threads,
        "blas_threads": _blas_threads(),
        "numba_cache": _numba_cache_dir(),
        "plan": model.plan.describe(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    model = _load(args.model, args.precision, "info")
    info = info_dict(model, args.precision)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("model", info["model"]),
        ("path", info["path"]),
        ("precision", f"{info['precision']} ({TIERS_SAID.get(info['precision'], info['precision'])})"
                      + (f"; {info['precision_note']}" if info["precision_note"] else "")),
        ("dimensions", info["dim"]),
        ("parameters", f"{info['parameters']:,}"),
        ("max tokens", f"{info['max_tokens']} (incl. [CLS] and [SEP])"),
        ("pooling", info["pooling"]),
        ("layers", f"{info['layers']} ({info['heads']} heads, vocab {info['vocab_size']:,})"),
        ("threads", f"{info['worker_threads']} workers, one per core, each single-threaded "
                    "(set BGESMALL_NUM_THREADS to change); a query made alone "
                    + ("shares its matmuls among them" if model.threads > 1 and model.plan.query == "split"
                       else "runs on one" + (" (the plan's choice)" if model.threads > 1 else ""))),
        ("BLAS threads", f"{info['blas_threads']} (held at 1 while bgesmall runs batches)"),
        ("numba cache", info["numba_cache"]),
    ]
    rows += [("plan" if i == 0 else "", line) for i, line in enumerate(info["plan"])]
    for key, value in rows:
        print(f"{key + ':' if key else '':<15}{value}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .plan import ENV_PLAN, fingerprint, plan_path
    from .tune import plan_for

    model = _load(args.model, args.precision, "tune", plan="default")  # the weights; the plan is measured below
    plan = plan_for(model.config, model.weights, model.threads, remeasure=True)
    fp = fingerprint(model.config, model.threads, model.precision)
    print(f"model: {model.name}, {model.precision}, {model.threads} threads, CPU: {fp['cpu']}")
    print("best time of each candidate (ms), candidates taking turns; * the one chosen:")
    for decision, times in plan.timings.items():
        chosen = _chosen(plan, decision, times)
        cells = "  ".join(f"{'*' if name == chosen else ' '}{name} {t * 1e3:.3f}" for name, t in times.items())
        print(f"  {decision:<42}{cells}")
    print("plan:")
    for line in plan.describe():
        print(f"  {line}")
    path = plan_path(fp)
    print(f"kept in {path}" if path.is_file() else "not kept (see the message above): used by this process only")
    if os.environ.get(ENV_PLAN):
        print(f"note: {ENV_PLAN}={os.environ[ENV_PLAN]} is set, so loads use that instead; unset it to use this plan")
    return 0


def _chosen(plan, decision: str, times: dict) -> str | None:
    """Which candidate of one measured decision the plan took (for marking it in `bgesmall tune`)."""
    if decision.startswith("linear "):
        key, rows = decision.split()[1], int(decision.split()[3])
        choices = plan.linear.get(key, ())
        return next((name for lo, name in reversed(choices) if rows >= lo), None)
    if decision.startswith("attention at "):
        return "blas" if int(decision.split()[2]) >= plan.long_sequence else "fused"
    if decision.startswith("blocks at "):
        return "blocks" if int(decision.split()[2]) >= plan.blocks_from else "rows"
    if decision.startswith("batch tokens"):
        return str(plan.batch_tokens)
    if decision.startswith("query"):
        return plan.query
    return None


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


class _DownloadBar:
    """One line per file on a terminal: name, bar, percent, size done/total, speed."""

    def __init__(self, stream: IO[str]):
        self.stream, self.name, self.start, self.last = stream, None, 0.0, 0.0

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if name != self.name:
            self.name, self.start = name, now
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        elapsed = now - self.start
        rate = f"{_human(done / elapsed)}/s" if elapsed > 0.2 else ""
        pct = 100 * done / total if total else 100
        fill = int(24 * pct / 100)
        self.stream.write(f"\r{name[:28]:<28} [{'#' * fill}{'.' * (24 - fill)}] {pct:5.1f}% "
                          f"{_human(done):>9} / {_human(total):<9} {rate:<12}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def cmd_download(args: argparse.Namespace) -> int:
    from . import download, locate

    manifest = download.manifest_for(args.repo, args.revision)
    if args.to:
        dest = Path(args.to).expanduser().absolute()
    elif manifest is download.BGE_SMALL:
        dest = locate.default_download_dir()
    else:
        dest = locate.default_download_dir().parent / manifest.folder_name
    if args.check:
        results = download.check_folder(dest, manifest)
        for r in results:
            print(f"{r.name:<36}{r.status:<10}{r.detail}")
        bad = [r for r in results if r.status in ("missing", "mismatch")]
        if bad:
            raise CLIError(f"{dest} does not hold a verified copy of {manifest.repo_id}@{manifest.revision[:12]}: "
                           f"{', '.join(r.name + ' ' + r.status for r in bad)}; run `bgesmall download --to {dest}`")
        print(f"{dest}: verified against the pinned hashes of {manifest.repo_id}@{manifest.revision[:12]}")
        return 0
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"{PROG} download: {msg}", file=sys.stderr))
    say(f"{manifest.repo_id}@{manifest.revision[:12]} from {download.hub_endpoint()} to {dest}")
    tty = sys.stderr.isatty() and not args.quiet  # a progress bar on a terminal, nothing per file otherwise
    reports = download.download(dest, manifest, progress=_DownloadBar(sys.stderr) if tty else None, log=say)
    kept = [r for r in reports if r.status != "absent"]
    fetched = sum(r.size for r in reports if r.status == "downloaded")
    say(f"{len(kept)} files verified in {dest} ({_human(fetched)} downloaded, "
        f"{sum(r.status == 'verified' for r in reports)} already there)")
    print(dest)  # stdout: the folder, for scripts (MODEL=$(bgesmall download -q))
    return 0


def _serve_unavailable(reason: str):
    def run(args: argparse.Namespace) -> int:
        raise CLIError(f"the server is not available in this installation ({reason})")

    return run


# ---- the parser ----

EPILOGS = {
    "main": """examples:
  bgesmall download                          fetch BAAI/bge-small-en-v1.5 (verified) once
  bgesmall embed "a sentence" "another"      JSON embeddings on stdout
  bgesmall embed --input docs.txt --output docs.npy
  bgesmall similarity "a cat" "a kitten"
  bgesmall info""",
    "embed": """examples:
  bgesmall embed "first text" "second text"                 # JSON array of arrays on stdout
  bgesmall embed --query "how do plants make food?"         # with BGE's query instruction
  bgesmall embed --input docs.txt --output docs.npy         # one text per line -> float32 [n, dim]
  bgesmall embed --input docs.jsonl --field body --output out.jsonl   # records + "embedding"
  cat docs.txt | bgesmall embed - --output docs.npy         # read standard input
  bgesmall embed --model path/to/all-MiniLM-L6-v2 "any BERT checkpoint folder"
  bgesmall embed --precision bf16 --input docs.txt --output docs.npy   # bf16 tier (CPUs with AVX512_BF16)
  bgesmall embed --input docs.parquet --field text --keep id,url --output vectors.parquet
  bgesmall embed --input 'docs/*.parquet' --output vectors/       # resumable: run it again after a kill
  bgesmall embed --ray auto --input 'docs/*.parquet' --output vectors/   # on a Ray cluster; resumable too

Large inputs are streamed in chunks of --batch-size texts (bounded memory, input order kept). A .jsonl or
.ndjson input uses --field text unless told otherwise. Output rows are L2-normalized float32.""",
    "similarity": """examples:
  bgesmall similarity "The cat sits on the mat." "A cat is sitting on a mat."
  bgesmall similarity --query "what is a cat?" "Cats are small domesticated carnivores."
  bgesmall similarity --precision bf16 "a cat" "a kitten"

Prints the cosine similarity of the two embeddings (a number in [-1, 1]).""",
    "info": """examples:
  bgesmall info
  bgesmall info --model path/to/model --json
  bgesmall info --precision bf16                 # the tier that runs, and why if it is not bf16""",
    "tune": """examples:
  bgesmall tune
  bgesmall tune --model path/to/model

Times bgesmall's candidate kernels on this machine (the model's own shapes and weights, at most about 3 s),
prints each candidate's best time and the plan chosen, and keeps it beside numba's cache, where every later
load finds it. A model's first load on a machine does the same by itself. BGESMALL_PLAN forces choices
instead (e.g. BGESMALL_PLAN=default, or linear=blas,query=single; see `bgesmall info` for the plan in use).""",
    "download": """examples:
  bgesmall download                                 # to weights/bge-small-en-v1.5 in a checkout, else ~/.cache/bgesmall
  bgesmall download --to /data/bge-small-en-v1.5
  bgesmall download --check --to /data/bge-small-en-v1.5   # verify a copied folder, no network
  HF_ENDPOINT=https://mirror.example bgesmall download

Every file is checked (size, sha256 pinned for revision 5c38ec7c and announced by the hub) before it gets its
final name; a rerun resumes a broken transfer and skips verified files. Environment: HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE=1 (no network: stop).""",
    "serve": """examples:
  bgesmall serve                                   # http://127.0.0.1:8000/v1/embeddings
  bgesmall serve --host 0.0.0.0 --port 8080 --api-key secret
  bgesmall serve --precision bf16                  # /health and /v1/models say the tier that runs""",
}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="a BERT checkpoint folder (config.json, model.safetensors, tokenizer.json); "
                        "default: the BGE-small weights bgesmall finds (see `bgesmall download --help`)")


def add_precision(p: argparse.ArgumentParser) -> None:
    """--precision TIER; checked (exit 2, one line) by main and by the server's run, not by argparse, so that the
    message is one line and $BGESMALL_PRECISION is checked the same way."""
    p.add_argument("--precision", default=None, metavar="TIER",
                   help="numeric tier: fp32, the exact engine, or bf16 (linear layers in bfloat16; needs a CPU with "
                        "AVX512_BF16, elsewhere fp32 runs, with a warning); default $BGESMALL_PRECISION, else fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="BAAI/bge-small-en-v1.5 text embeddings on the CPU (numpy + numba).",
                     epilog=EPILOGS["main"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("embed", help="embed texts (arguments, a file, JSONL or stdin)", epilog=EPILOGS["embed"],
                       description="Embed texts and write the vectors as JSON (stdout), .npy or .jsonl.")
    _add_model(p)
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed; - reads standard input")
    p.add_argument("--input", "-i", metavar="FILE", help="read texts from FILE (one per line, or JSONL); - is stdin")
    p.add_argument("--field", metavar="NAME", help="read JSONL input and embed this field of each record")
    p.add_argument("--output", "-o", metavar="FILE", help="write FILE.npy (float32 [n, dim]), FILE.jsonl or FILE.json")
    p.add_argument("--query", action="store_true", help="embed as search queries (prepends BGE's instruction)")
    add_precision(p)
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="texts per chunk (default 256)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    # tables and jobs (bgesmall.jobs, bgesmall.ray): --input FILE.parquet|FOLDER|'GLOB', --output FILE.parquet|FOLDER
    p.add_argument("--keep", metavar="COLS", help="Parquet output: keep only these input columns (comma-separated) "
                                                  "beside the embedding (default: all)")
    p.add_argument("--strict", action="store_true", help="a row without a text is an error (default: a null "
                                                          "embedding, counted in the summary)")
    p.add_argument("--overwrite", action="store_true", help="job folder (with or without --ray): delete its shards "
                                                             "and start over")
    p.add_argument("--shard-rows", type=int, default=None, metavar="N",
                   help="job folder: rows per shard (default 10000)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: 'auto', an address, or none for a local one (extra: bgesmall[ray])")
    p.add_argument("--model-shared", action="store_true",
                   help="--ray: every node reads --model DIR at the same path (default: it is sent to the workers)")
    p.set_defaults(func=cmd_embed, subparser=p)

    p = sub.add_parser("similarity", help="cosine similarity of two texts", epilog=EPILOGS["similarity"],
                       description="Print the cosine similarity of two texts' embeddings.")
    _add_model(p)
    p.add_argument("a", metavar="TEXT")
    p.add_argument("b", metavar="TEXT")
    p.add_argument("--query", action="store_true", help="embed the first text as a query (BGE's instruction)")
    add_precision(p)
    p.set_defaults(func=cmd_similarity, subparser=p)

    p = sub.add_parser("info", help="model, dimensions, threads, caches", epilog=EPILOGS["info"],
                       description="Show the model found (or given), its shape, and the runtime's threads and caches.")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_precision(p)
    p.set_defaults(func=cmd_info, subparser=p)

    p = sub.add_parser("tune", help="measure and keep the fastest kernels for this machine", epilog=EPILOGS["tune"],
                       description="Measure bgesmall's candidate kernels on this CPU and keep the fastest plan "
                                   "(each tier has its own plan: --precision).")
    _add_model(p)
    add_precision(p)
    p.set_defaults(func=cmd_tune, subparser=p)

    from . import download

    p = sub.add_parser("download", help="fetch the model weights (verified)", epilog=EPILOGS["download"],
                       description=f"Download {download.REPO_ID} at the pinned revision {download.REVISION}, "
                                   "verifying every file.")
    p.add_argument("--to", metavar="DIR", help="destination folder (default: weights/bge-small-en-v1.5 in a "
                                               "checkout, else $XDG_CACHE_HOME/bgesmall/bge-small-en-v1.5)")
    p.add_argument("--check", action="store_true", help="verify the folder against the pinned hashes; no network")
    p.add_argument("--repo", default=download.REPO_ID, help=argparse.SUPPRESS)  # advanced: another BERT repo
    p.add_argument("--revision", default=download.REVISION, help=argparse.SUPPRESS)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_download, subparser=p)

    p = sub.add_parser("serve", help="OpenAI-compatible embeddings server", epilog=EPILOGS["serve"],
                       description="Serve /v1/embeddings (needs the server extra: pip install 'bgesmall[server]').")
    try:
        from . import server
    except ImportError as e:
        p.set_defaults(func=_serve_unavailable(str(e)), subparser=p)
    else:
        server.add_arguments(p)
        p.set_defaults(func=server.run, subparser=p)
    return parser


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    if hasattr(args, "precision"):  # before anything is loaded or written: a bad tier is a usage error
        from .precision import requested

        try:
            args.precision = requested(args.precision)  # canonical ("BF16" -> "bf16"), $BGESMALL_PRECISION if unset
        except ValueError as e:
            print(f"{PROG} {args.command}: {e}", file=sys.stderr)
            return 2
    from . import download

    try:
        from .config import ModelLoadError
    except ImportError:  # pragma: no cover
        ModelLoadError = ValueError  # noqa: N806
    try:
        return int(args.func(args) or 0)
    except (CLIError, download.DownloadError, FileNotFoundError, ModelLoadError, ValueError) as e:
        # ValueError: the library's own input and settings errors, written to be read (e.g. BGESMALL_NUM_THREADS)
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `bgesmall embed ... | head`: the reader left; not an error of ours
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
