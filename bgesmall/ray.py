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

`bgesmall embed --ray` (run_job here) is the resumable job folder of bgesmall.jobs with its shards embedded by
one ShardActor per node: the driver reads the input and writes the shards and the manifest.

Precision (bgesmall.precision): "fp32" or "bf16", any case; None is the driver's $BGESMALL_PRECISION, else fp32,
decided on the driver and sent to the actors. Embedder and embed_dataset run what the node can (bf16 on a CPU
without AVX512_BF16 runs fp32, with a warning, as bgesmall.load does); a job folder's shards must all be of the
tier its manifest records, so there every actor must run the tier asked for, or the job stops saying which node
cannot.

This module is bgesmall.ray; `import ray` here is the real Ray (imports are absolute in Python 3).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.data

from .columns import EMBEDDING, EmbedOptions, embed_batch, empty_output
from .fingerprint import combined, model_file_hashes, model_file_names, sha256_bytes
from .parquet_io import TableError, pyarrow
from .precision import requested

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
    """A Ray Data callable class: pyarrow table in, the same rows with the embedding column out.

    precision: the tier; None reads $BGESMALL_PRECISION where the actor runs (on its node, not the driver's:
    pass it explicitly, as embed_dataset does, to be sure)."""

    def __init__(self, model: ModelBundle | str | None = None, column: str = "text", output_column: str = EMBEDDING,
                 query: bool = False, strict: bool = False, keep: list[str] | None = None, threads: int | None = None,
                 precision: str | None = None):
        import bgesmall

        asked = requested(precision)  # checked before anything is loaded
        folder = model.materialize() if isinstance(model, ModelBundle) else model
        self.model = bgesmall.load(folder, threads=threads or _actor_cpus(), precision=asked)
        self.precision = self.model.precision  # the tier that runs on this node
        self.opts = EmbedOptions(field=column, output_column=output_column, query=query, strict=strict,
                                 keep=tuple(keep) if keep is not None else None)

    def __call__(self, table):  # pyarrow.Table [n rows] -> pyarrow.Table [n rows] + embedding
        pa, _ = pyarrow()
        batches = table.combine_chunks().to_batches()
        if not batches:
            out = empty_output(self.model, pa.RecordBatch.from_pylist([], schema=table.schema), self.opts)
        else:
            out, _ = embed_batch(self.model, batches[0], self.opts)
        return pa.Table.from_batches([out])


def embed_dataset(ds: "ray.data.Dataset", column: str = "text", output_column: str = EMBEDDING, model=None,
                  query: bool = False, precision: str | None = None, *, strict: bool = False,
                  keep: list[str] | None = None,
                  batch_size: int = DEFAULT_BATCH_ROWS, concurrency: int | None = None, num_cpus: float | None = None,
                  threads: int | None = None, model_path_shared: bool = False):
    """The dataset with an embedding column added (lazy, as Ray Data is).

    model: a model folder (default: the BGE-small weights bgesmall finds on the driver) or a ModelBundle.
    Defaults from the cluster: one actor per node (concurrency = the nodes with CPUs), reserving all but one of
    the node's CPUs (num_cpus), so that Ray Data's read and write tasks can be scheduled beside it (an actor
    holding every CPU starves them, and the job never starts), and running one engine thread per core of the
    node (threads), since those tasks mostly wait on I/O. Ray Data restarts a dead actor and retries its batches
    (its defaults max_restarts=-1, max_task_retries=-1). precision: "fp32" (the exact tier) or "bf16", any case;
    default the driver's $BGESMALL_PRECISION, else fp32; another value is a ValueError here, before anything starts.
    A node whose CPU lacks AVX512_BF16 runs bf16 as fp32 (with a warning), as bgesmall.load does."""
    precision = requested(precision)
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
                               "strict": strict, "keep": keep, "threads": threads, "precision": precision},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )


# ---- the CLI's job: bgesmall embed --ray [ADDRESS] --input 'docs/*.parquet' --output vectors/ ----

IN_FLIGHT_PER_ACTOR = 2  # shards queued at an actor: the next one is there when it finishes one
AHEAD_PER_ACTOR = 4  # shards at work or done but not yet written (a later one waits for an earlier one)


class ShardActor:
    """A Ray actor embedding whole shards, as bgesmall.jobs does on one machine (chunks of batch_size rows
    counted from the shard's first row), with the model an Embedder loads.

    The model comes with each call and is loaded by the first: a restarted actor loads it again from the call Ray
    retries (constructor arguments holding object refs would have to outlive the job for a restart to work)."""

    def __init__(self, opts: EmbedOptions, batch_size: int, where, precision: str, threads: int | None = None):
        """precision: the job's tier (canonical), which this actor's model must run."""
        self.opts, self.batch_size, self.where = opts, batch_size, where
        self.precision, self.threads = precision, threads
        self.embedder: Embedder | None = None

    def load(self, model: ModelBundle) -> int:
        if self.embedder is None:
            opts = self.opts
            self.embedder = Embedder(model=model, column=opts.field, output_column=opts.output_column,
                                     query=opts.query, strict=opts.strict, threads=self.threads,
                                     keep=list(opts.keep) if opts.keep is not None else None, precision=self.precision)
            if self.embedder.precision != self.precision:  # a shard of another tier would break the folder
                from .jobs import JobError

                runs, self.embedder = self.embedder.precision, None
                raise JobError(f"node {socket.gethostname()} runs precision {runs!r}, not this job's "
                               f"{self.precision!r} (bf16 needs a CPU with AVX512_BF16): run the job where every "
                               f"node can, or as a new job (another --output) with --precision {runs}")
        return os.getpid()

    def embed(self, model: ModelBundle, first_row: int, table) -> tuple[list, list[int]]:
        from .jobs import embed_shard

        self.load(model)
        return embed_shard(self.embedder.model, table, self.embedder.opts, self.where, first_row, self.batch_size)

    def empty(self, model: ModelBundle, batch):
        self.load(model)
        return empty_output(self.embedder.model, batch, self.embedder.opts)


class RayShards:
    """A job's shards embedded by one ShardActor per node of the cluster (holding all its CPUs, one engine thread
    per core), several shards at once; results come back in shard order, to be written by this process.

    Ray is reached (ray.init) only when there is something to embed: a complete job starts nothing. A killed actor
    is restarted and its shards retried (max_restarts / max_task_retries -1); the shard is written once, here."""

    def __init__(self, model_dir: Path, *, address: str = "local", model_path_shared: bool = False,
                 stats: dict | None = None):
        from .model import ModelFiles

        self.folder = ModelFiles.in_folder(model_dir).folder.absolute()
        self.address, self.shared = address, model_path_shared
        self.stats = stats if stats is not None else {}
        self.started_here, self.actors, self.bundle = False, [], None
        self.start = time.perf_counter()

    def model_identity(self) -> dict:
        from .jobs import folder_identity

        return folder_identity(self.folder, self.folder.name)

    def precision(self, settings) -> str:
        return requested(settings.precision)  # every actor must run it (ShardActor.load)

    def _connect(self, opts: EmbedOptions, batch_size: int, where, precision: str) -> None:
        if self.actors:
            return
        if not ray.is_initialized():
            self.started_here = True
            local = self.address == "local"  # a Ray of our own for this job: no dashboard on its cores
            ray.init(address=None if local else self.address, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}},
                     **({"include_dashboard": False} if local else {}))
        self.stats["connected"] = time.perf_counter() - self.start
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.bundle = ModelBundle.from_folder(self.folder, shared=self.shared)
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
        actor_class = ray.remote(ShardActor)
        for node in nodes:
            cpus = int(node["Resources"]["CPU"])
            self.actors.append(actor_class.options(
                num_cpus=cpus, max_restarts=-1, max_task_retries=-1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=True),
            ).remote(opts, batch_size, where, precision, cpus))
        # a model that cannot load is said now, once
        self.stats["actor_pids"] = _get([a.load.remote(self.bundle) for a in self.actors])
        self.stats["actors_ready"] = time.perf_counter() - self.start

    def embed(self, shards, opts, settings, where, on_rows):
        self._connect(opts, settings.batch_size, where, self.precision(settings))
        ahead = AHEAD_PER_ACTOR * len(self.actors)
        queued = {a: 0 for a in range(len(self.actors))}
        at_work: dict = {}  # ObjectRef -> (shard number in this run, actor index)
        done: dict = {}  # shard number -> ObjectRef, finished
        submitted = written = 0
        shards = iter(shards)
        more = True
        while True:
            while more and submitted - written < ahead and min(queued.values()) < IN_FLIGHT_PER_ACTOR:
                item = next(shards, None)
                if item is None:
                    more = False
                    break
                actor = min(queued, key=queued.get)
                first_row, table = item
                at_work[self.actors[actor].embed.remote(self.bundle, first_row, table)] = (submitted, actor)
                queued[actor] += 1
                submitted += 1
            if written in done:
                batches, missing = _get(done.pop(written))
                written += 1
                if "first_shard" not in self.stats:
                    self.stats["first_shard"] = time.perf_counter() - self.start
                on_rows(sum(b.num_rows for b in batches))
                yield batches, missing
                continue
            if not at_work:
                return
            finished, _ = ray.wait(list(at_work), num_returns=1)
            number, actor = at_work.pop(finished[0])
            queued[actor] -= 1
            done[number] = finished[0]

    def empty(self, inp, opts, settings):
        self._connect(opts, settings.batch_size, inp.where, self.precision(settings))
        return _get(self.actors[0].empty.remote(self.bundle, inp.empty_batch()))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_here:
            ray.shutdown()


def _get(refs):
    """ray.get, with a TableError raised in an actor (a row without a text under --strict, a missing column)
    said as it is."""
    try:
        return ray.get(refs)
    except Exception as e:
        cause = _cause(e)
        if isinstance(cause, TableError):
            raise TableError(str(cause)) from None
        raise


def run_job(input_spec: str, out: Path, opts: EmbedOptions, *, model_dir: str | None, address: str,
            model_path_shared: bool = False, settings=None, overwrite: bool = False, progress: bool = True,
            stats: dict | None = None):
    """The resumable job of bgesmall.jobs (a folder of shards and a manifest; run again after a kill, it
    continues after the last complete shard), its shards embedded on a Ray cluster: -> a jobs.Summary.

    This process reads the input and writes the shards, so the workers need neither on their disks.
    `stats` (if given) gets seconds from the start: connected (Ray reached), actors_ready (models loaded),
    first_shard (the first shard back); and actor_pids, the actors' process ids (for benchmarks and tests)."""
    from . import jobs
    from .parquet_io import Input

    settings = settings or jobs.JobSettings()
    inp = Input.open(input_spec, opts.field)
    if model_dir is None:
        from .locate import find_model_dir

        model_dir = find_model_dir()
    engine = RayShards(Path(model_dir), address=address, model_path_shared=model_path_shared, stats=stats)
    try:
        return jobs.run_shards(engine, inp, out, opts, settings, overwrite=overwrite, progress=progress)
    finally:
        engine.close()


def _cause(e: BaseException) -> BaseException | None:
    seen = e
    while seen is not None:
        if isinstance(seen, TableError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None
