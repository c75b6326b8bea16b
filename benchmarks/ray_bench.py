"""Throughput of the table jobs against the library on the same machine, in one run:

1. `Model.embed` in chunks of 256 texts (what `bgesmall embed` does), warm;
2. the Ray job, `bgesmall embed --ray --input docs.parquet --output job/` (bgesmall.ray.run_job: a resumable job
   folder, shards embedded by one actor per node), on a local Ray that it starts itself with every core, as the
   CLI does; Ray's start-up, the actor's start and the model's load included in the whole job's rate. Timed on
   each of --ray-rows (default: a 1,000-row job, where the ~20 s start-up weighs, and a 10,000-row one, where it
   is amortized), and the start-up reported on its own: until Ray answers, until the actor has its model, until
   the first shard is back;
   optionally (--ray-data) the same on `bgesmall.ray.embed_dataset` (Ray Data: read_parquet -> map_batches ->
   write_parquet);
3. `bgesmall embed --input corpus.txt --output corpus.npy` against the resumable job
   `bgesmall embed --input corpus.txt --output job/` (in process, both warm, model load included).

Each Ray job is timed between two runs of `Model.embed` on the same rows, and compared with their mean.

    python benchmarks/ray_bench.py                                 # ~15 minutes on 2 quiet cores
    python benchmarks/ray_bench.py --ray-rows 1000 --rows 500      # quicker, noisier

Texts: the corpus workload's paragraphs of CPython's language reference (benchmarks/workloads.py), repeated to
--rows. Model: as benchmarks/bench.py (the real bge-small if found, else the bge-small-shaped random checkpoint;
same shapes, same compute). Targets (issue 12): Ray >= 0.85x the library, the job >= 0.97x plain embed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads  # noqa: E402
from checkpoint import find_checkpoint  # noqa: E402

import bgesmall  # noqa: E402
from bgesmall import cli  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def library(model, texts: list[str]) -> float:
    def run():
        for block in model.embed_iter(texts, chunk_size=256):
            pass

    return len(texts) / timed(run)


def ray_job(model_dir: Path, src: Path, out: Path, shard_rows: int) -> tuple[float, dict]:
    """(seconds, stats) of the CLI's Ray job from nothing: ray.init, the actor, the model, every shard written."""
    from bgesmall import jobs
    from bgesmall import ray as bray
    from bgesmall.columns import EmbedOptions

    stats: dict = {}
    seconds = timed(lambda: bray.run_job(str(src), out, EmbedOptions(), model_dir=str(model_dir), address="local",
                                         settings=jobs.JobSettings(shard_rows=shard_rows), progress=False,
                                         stats=stats))
    return seconds, stats


def ray_data_job(model_dir: Path, src: Path, out: Path, cores: int) -> float:
    """Seconds of embed_dataset's read -> embed -> write on a local Ray it starts (ray.init included)."""
    import ray

    from bgesmall import ray as bray

    start = time.perf_counter()
    ray.init(num_cpus=cores, log_to_driver=False, include_dashboard=False)
    try:
        bray.embed_dataset(ray.data.read_parquet(str(src)), model=model_dir).write_parquet(str(out))
    finally:
        ray.shutdown()
    return time.perf_counter() - start


def ray_paths(model, model_dir: Path, texts: list[str], work: Path, cores: int, sizes: list[int],
              ray_data: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bgesmall import jobs

    for n in sizes:
        rows = texts[:n]
        src = work / f"docs-{n}.parquet"
        pq.write_table(pa.table({"id": list(range(n)), "text": rows}), src, row_group_size=256)
        shard_rows = max(1, n // 10)
        before = library(model, rows)
        seconds, stats = ray_job(model_dir, src, work / f"job-{n}", shard_rows)
        middle = library(model, rows) if ray_data else None
        data_seconds = ray_data_job(model_dir, src, work / f"data-{n}", cores) if ray_data else None
        after = library(model, rows)
        assert jobs.read_job(work / f"job-{n}").column("id").to_pylist() == list(range(n))
        lib = (before + after) / 2 if middle is None else (before + middle) / 2
        rate = n / seconds
        ready = stats["actors_ready"]
        print(f"{n} rows:")
        print(f"  Model.embed (chunks of 256):   {before:8.1f} and {after:.1f} rows/s (before and after)"
              + (f", {middle:.1f} between the Ray jobs" if middle is not None else ""))
        print(f"  Ray job (bgesmall embed --ray, {shard_rows}-row shards), whole job: {rate:8.1f} rows/s in "
              f"{seconds:.1f} s ({rate / lib:.2f}x the library; target >= 0.85x)")
        print(f"    start-up: Ray up {stats['connected']:.1f} s, actor with its model {ready:.1f} s, first shard "
              f"back {stats['first_shard']:.1f} s")
        print(f"    after the start-up: {n / (seconds - ready):8.1f} rows/s ({n / (seconds - ready) / lib:.2f}x)")
        if data_seconds is not None:
            mean = (middle + after) / 2
            print(f"  Ray Data (embed_dataset), whole job: {n / data_seconds:8.1f} rows/s in {data_seconds:.1f} s "
                  f"({n / data_seconds / mean:.2f}x the mean of the library runs around it)")


def cli_rows_per_s(args: list[str], rows: int, cpu: list[float]) -> float:
    """rows/s of wall time; appends the CPU-seconds this process spent (all its threads) to `cpu`."""
    start = time.process_time()
    seconds = timed(lambda: cli.main(["embed", "-q", *args]))
    cpu.append(time.process_time() - start)
    return rows / seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: as benchmarks/bench.py)")
    ap.add_argument("--rows", type=int, default=2000, help="texts of the one-machine job comparison (default 2000)")
    ap.add_argument("--ray-rows", default="1000,10000", help="rows of each Ray job (default 1000,10000)")
    ap.add_argument("--ray-data", action="store_true", help="also time embed_dataset (Ray Data) on each size")
    ap.add_argument("--skip-ray", action="store_true", help="leave out the Ray jobs")
    ap.add_argument("--skip-job", action="store_true", help="leave out the one-machine job comparison")
    args = ap.parse_args(argv)

    ckpt = find_checkpoint(args.model)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    sizes = [int(n) for n in args.ray_rows.split(",") if n.strip()]
    paragraphs = workloads.corpus_paragraphs()
    texts = [paragraphs[i % len(paragraphs)] for i in range(max([args.rows, *sizes]))]
    print(f"CPU: {cpu_name()}, {cores} cores; load average {os.getloadavg()[0]:.1f} at start")
    print(f"model: {ckpt.path} ({'random bge-small-shaped weights' if ckpt.synthetic else 'trained weights'})")
    print(f"texts: paragraphs of the corpus workload, repeated to {len(texts)}")

    model = bgesmall.load(ckpt.path)
    model.embed(texts[:64])  # compile / warm
    # Each path is timed between two runs of its reference, and compared with their mean: on cores shared with
    # other work the load drifts over minutes, and a ratio of runs far apart measures the drift.
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_ray:
            ray_paths(model, ckpt.path, texts, work, cores, sizes, args.ray_data)
        if args.skip_job:
            print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine's cores are shared)")
            return 0
        texts = texts[:args.rows]
        (work / "corpus.txt").write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
        common = ["--model", str(ckpt.path), "-i", str(work / "corpus.txt")]
        plain_args = [*common, "-o", str(work / "corpus.npy")]
        job_args = [*common, "-o", str(work / "job"), "--shard-rows", str(max(1, len(texts) // 4))]
        cpu: list[float] = []  # CPU-seconds: steadier than wall time when other work shares the cores
        before = cli_rows_per_s(plain_args, len(texts), cpu)
        job = cli_rows_per_s(job_args, len(texts), cpu)
        after = cli_rows_per_s(plain_args, len(texts), cpu)
        shutil.rmtree(work / "job")
        plain = (before + after) / 2
        print(f"bgesmall embed -> .npy:      {before:8.1f} and {after:.1f} rows/s (before and after the job); "
              f"{cpu[0]:.1f} and {cpu[2]:.1f} CPU-s")
        print(f"resumable job (4 shards):    {job:8.1f} rows/s  ({job / plain:.2f}x plain embed; target >= 0.97x); "
              f"{cpu[1]:.1f} CPU-s ({(cpu[0] + cpu[2]) / 2 / cpu[1]:.2f}x plain's rows per CPU-second)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine's cores are shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
