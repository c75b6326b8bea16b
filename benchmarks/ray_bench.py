"""Throughput of the table jobs against the library on the same machine, in one run:

1. `Model.embed` in chunks of 256 texts (what `bgesmall embed` does), warm;
2. the Ray path: `bgesmall.ray.embed_dataset` on a local Ray with every core (`ray.init(num_cpus=cores)`),
   Parquet read -> embed -> Parquet write, actor start and model load included;
3. `bgesmall embed --input corpus.txt --output corpus.npy` against the resumable job
   `bgesmall embed --input corpus.txt --output job/` (in process, both warm, model load included).

    python benchmarks/ray_bench.py                 # ~6 minutes on 2 quiet cores
    python benchmarks/ray_bench.py --rows 500      # quicker, noisier

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


def ray_path(model_dir: Path, texts: list[str], work: Path, cores: int, small: int = 64) -> tuple[float, float]:
    """(rows/s of the whole job, rows/s with the start-up taken off): the job over `small` rows is timed too, and
    its time (actor start, model sent, checked and loaded, Ray Data's planning) subtracted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from bgesmall import ray as bray

    def job(rows: list[str], name: str) -> float:
        src = work / f"{name}.parquet"
        pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), src, row_group_size=256)
        out = work / f"{name}-out"
        seconds = timed(lambda: bray.embed_dataset(ray.data.read_parquet(str(src)), model=model_dir)
                        .write_parquet(str(out)))
        assert bray.count_output(out)["rows"] == len(rows)
        return seconds

    ray.init(num_cpus=cores, log_to_driver=False, include_dashboard=False)
    try:
        start_up = job(texts[:small], "small")
        whole = job(texts, "docs")
    finally:
        ray.shutdown()
    return len(texts) / whole, (len(texts) - small) / max(whole - start_up, 1e-9)


def cli_rows_per_s(args: list[str], rows: int, cpu: list[float]) -> float:
    """rows/s of wall time; appends the CPU-seconds this process spent (all its threads) to `cpu`."""
    start = time.process_time()
    seconds = timed(lambda: cli.main(["embed", "-q", *args]))
    cpu.append(time.process_time() - start)
    return rows / seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: as benchmarks/bench.py)")
    ap.add_argument("--rows", type=int, default=2000, help="texts per run (default 2000)")
    ap.add_argument("--skip-ray", action="store_true", help="leave out the Ray path")
    args = ap.parse_args(argv)

    ckpt = find_checkpoint(args.model)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    paragraphs = workloads.corpus_paragraphs()
    texts = [paragraphs[i % len(paragraphs)] for i in range(args.rows)]
    print(f"CPU: {cpu_name()}, {cores} cores; load average {os.getloadavg()[0]:.1f} at start")
    print(f"model: {ckpt.path} ({'random bge-small-shaped weights' if ckpt.synthetic else 'trained weights'})")
    print(f"texts: {len(texts)} paragraphs of the corpus workload")

    model = bgesmall.load(ckpt.path)
    model.embed(texts[:64])  # compile / warm
    # Each path is timed between two runs of its reference, and compared with their mean: on cores shared with
    # other work the load drifts over minutes, and a ratio of runs far apart measures the drift.
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_ray:
            before = library(model, texts)
            r, steady = ray_path(ckpt.path, texts, work, cores)
            after = library(model, texts)
            lib = (before + after) / 2
            print(f"Model.embed (chunks of 256): {before:8.1f} and {after:.1f} rows/s (before and after Ray)")
            print(f"Ray Data, local, {cores} CPUs:  {r:8.1f} rows/s  ({r / lib:.2f}x the library; target >= 0.85x)")
            print(f"  start-up taken off:        {steady:8.1f} rows/s  ({steady / lib:.2f}x)")
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
