"""Embedding on a Ray cluster with Ray Data (the optional extra `ray`).

    import ray, bgesmall.ray
    ds = ray.data.read_parquet("docs/")
    ds = bgesmall.ray.embed_dataset(ds, column="text")          # adds "embedding", fixed_size_list<float32>[384]
    ds.write_parquet("vectors/")

or, with the class as a Ray Data recipe expects it:

    ds.map_batches(bgesmall.ray.Embedder, fn_constructor_kwargs={"model": bgesmall.ray.ModelBundle.from_folder(dir)},
                   batch_format="pyarrow", concurrency=2, num_cpus=1)

The model needs no hub and no shared filesystem: the driver puts its folder's files in Ray's object store, and
each actor checks their sha256 before it writes them to a local folder and loads them (once per actor, with
the actor's CPUs as the engine's threads). A path every node sees can be given instead. An actor that dies is
restarted and its batches retried (Ray Data's max_restarts / max_task_retries), so each row comes out once.

This module is bgesmall.ray; `import ray` here is the real Ray (imports are absolute in Python 3).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.data

from .columns import EMBEDDING, EmbedOptions, embed_batch, with_embedding
from .fingerprint import combined, model_file_hashes, model_file_names, sha256_bytes
from .parquet_io import TableError, input_files, kind_of, pyarrow

DEFAULT_BATCH_ROWS = 256  # rows per map_batches call: ~3-4 s of work per core, small against Ray's overhead


@dataclass(frozen=True)
class ModelBundle:
    """A model folder on its way to the workers: its files in the object store (or a path every node sees)."""

    name: str  # the folder's name, so the loaded model is named as on the driver
    hashes: dict[str, str]  # relative file name -> sha256
    files_ref: list = field(default_factory=list)  # [ObjectRef of {name: bytes}]; a list, so Ray passes the ref
    shared_path: str | None = None

    @classmethod
    def from_folder(cls, folder, *, shared: bool = False) -> "ModelBundle":
        folder = Path(folder).expanduser().absolute()
        if shared:
            return cls(folder.name, model_file_hashes(folder), [], str(folder))
        data = {name: (folder / name).read_bytes() for name in model_file_names(folder)}
        return cls(folder.name, {n: sha256_bytes(b) for n, b in data.items()}, [ray.put(data)])

    @property
    def fingerprint(self) -> str:
        return combined(self.hashes)

    def materialize(self) -> Path:
        """On a worker: the model folder, checked against the driver's sha256 of every file."""
        if self.shared_path is not None:
            found = model_file_hashes(Path(self.shared_path))
            if found != self.hashes:
                raise ValueError(f"{self.shared_path} on this node does not hold the driver's model files "
                                 f"(differ: {', '.join(sorted(k for k in self.hashes if found.get(k) != self.hashes[k]))})")
            return Path(self.shared_path)
        data = ray.get(self.files_ref[0])
        for name, sha in self.hashes.items():
            if name not in data or sha256_bytes(data[name]) != sha:
                raise ValueError(f"model file {name} arrived damaged or missing (sha256 differs from the driver's)")
        home = Path(tempfile.gettempdir()) / "bgesmall-ray-models" / self.fingerprint[:32]
        folder = home / self.name
        if not folder.is_dir():  # written once per node; a half-written copy is never under the final name
            home.mkdir(parents=True, exist_ok=True)
            part = Path(tempfile.mkdtemp(dir=home, prefix=".part-"))
            for name, blob in data.items():
                (part / name).parent.mkdir(parents=True, exist_ok=True)
                (part / name).write_bytes(blob)
            try:
                os.rename(part, folder)
            except OSError:  # another actor on this node got there first
                shutil.rmtree(part, ignore_errors=True)
        return folder


def _actor_cpus() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # not inside a Ray worker
        cpus = os.cpu_count() or 1
    return max(1, int(round(cpus)))


class Embedder:
    """A Ray Data callable class: pyarrow table in, the same rows with the embedding column out."""

    def __init__(self, model: ModelBundle | str | None = None, column: str = "text", output_column: str = EMBEDDING,
                 query: bool = False, strict: bool = False, keep: list[str] | None = None, threads: int | None = None):
        import bgesmall

        folder = model.materialize() if isinstance(model, ModelBundle) else model
        self.model = bgesmall.load(folder, threads=threads or _actor_cpus())
        self.opts = EmbedOptions(field=column, output_column=output_column, query=query, strict=strict,
                                 keep=tuple(keep) if keep is not None else None)

    def __call__(self, table):  # pyarrow.Table [n rows] -> pyarrow.Table [n rows] + embedding
        pa, _ = pyarrow()
        batches = table.combine_chunks().to_batches()
        if not batches:
            import numpy as np

            empty = pa.RecordBatch.from_pylist([], schema=table.schema)
            out = with_embedding(empty, np.zeros((0, self.model.dim), np.float32), np.zeros(0, bool), self.opts)
        else:
            out, _ = embed_batch(self.model, batches[0], self.opts)
        return pa.Table.from_batches([out])


def embed_dataset(ds: "ray.data.Dataset", column: str = "text", output_column: str = EMBEDDING, model=None,
                  query: bool = False, *, strict: bool = False, keep: list[str] | None = None,
                  batch_size: int = DEFAULT_BATCH_ROWS, concurrency: int | None = None, num_cpus: float | None = None,
                  threads: int | None = None, model_path_shared: bool = False):
    """The dataset with an embedding column added (lazy, as Ray Data is).

    model: a model folder (default: the BGE-small weights bgesmall finds on the driver) or a ModelBundle.
    Defaults from the cluster: one actor per node (concurrency = the nodes with CPUs), reserving all but one of
    the node's CPUs (num_cpus), so that Ray Data's read and write tasks can be scheduled beside it (an actor
    holding every CPU starves them, and the job never starts), and running one engine thread per core of the
    node (threads), since those tasks mostly wait on I/O. Ray Data restarts a dead actor and retries its batches
    (its defaults max_restarts=-1, max_task_retries=-1)."""
    if isinstance(model, ModelBundle):
        bundle = model
    else:
        if model is None:
            from .locate import find_model_dir

            model = find_model_dir()
        bundle = ModelBundle.from_folder(model, shared=model_path_shared)
    node_cpus = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
    smallest = int(min(node_cpus, default=1))
    if num_cpus is None:
        num_cpus = max(1, smallest - 1)
    if concurrency is None:
        concurrency = max(1, len(node_cpus))
    if threads is None:
        per_node = max(1, concurrency // max(1, len(node_cpus)))  # actors sharing a node's cores
        threads = max(1, smallest // per_node)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model": bundle, "column": column, "output_column": output_column, "query": query,
                               "strict": strict, "keep": keep, "threads": threads},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )


# ---- the CLI's job: bgesmall embed --ray [ADDRESS] --input 'docs/*.parquet' --output vectors/ ----


def run_job(input_spec: str, out: Path, opts: EmbedOptions, *, model_dir: str | None, address: str,
            model_path_shared: bool = False, batch_size: int = DEFAULT_BATCH_ROWS) -> dict:
    """Read Parquet input, embed it on the cluster, write a folder of Parquet files: -> {rows, null_rows}."""
    files = input_files(input_spec)
    if any(kind_of(p) != "parquet" for p in files):
        raise TableError("--ray reads Parquet input (a file, a folder or a glob of .parquet files)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TableError(f"--output {out}: not an empty folder; Ray writes a new folder of Parquet files")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    try:
        ds = ray.data.read_parquet([str(p.absolute()) for p in files])
        ds = embed_dataset(ds, column=opts.field, output_column=opts.output_column, model=model_dir,
                           query=opts.query, strict=opts.strict, keep=list(opts.keep) if opts.keep else None,
                           batch_size=batch_size, model_path_shared=model_path_shared)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        try:
            ds.write_parquet(str(out.absolute()))
        except Exception as e:
            cause = _cause(e)
            if isinstance(cause, TableError):
                raise TableError(str(cause)) from None
            raise
    finally:
        if started_here:
            ray.shutdown()
    return count_output(out, opts.output_column)


def _cause(e: BaseException) -> BaseException | None:
    seen = e
    while seen is not None:
        if isinstance(seen, TableError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def count_output(folder: Path, column: str = EMBEDDING) -> dict:
    """{rows, null_rows} of a folder of Parquet files, from the embedding column alone."""
    _, pq = pyarrow()
    rows = nulls = 0
    for path in sorted(folder.glob("*.parquet")):
        emb = pq.read_table(path, columns=[column]).column(column)
        rows += len(emb)
        nulls += emb.null_count
    return {"rows": rows, "null_rows": nulls}
