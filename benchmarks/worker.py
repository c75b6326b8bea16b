"""Run one engine on one workload in a fresh process; print one JSON line. Started by bench.py.

A fresh process per (engine, workload) keeps the peak RSS and the start-up time of each engine clean.
Workload "start" only measures import + load + first embedding (run by bench.py --start-repeats times cold, then
as many times warm).
"""
from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # before any heavy import: the cold start counts the engine's imports

import argparse
import json
import os
import resource
import sys
from pathlib import Path


def pin_threads(n: int) -> None:
    """Every thread pool to n threads, before the engine imports anything that reads these variables."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                "BGESMALL_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no engine may reach for a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Linux's ru_maxrss is inherited across fork and exec, so a worker
    started by a bench.py that had run the ONNX export (torch, 1.8 GB) would report that peak for every engine;
    VmHWM in /proc/self/status belongs to this process's address space alone."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: KiB (Linux), bytes (macOS)


def timed_repeats(fn, repeats: int, budget_s: float) -> list[float]:
    """At least one run; more (up to `repeats`) while the total stays under budget_s."""
    times = []
    t_all = time.perf_counter()
    while len(times) < repeats:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_all + times[-1] > budget_s:
            break
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--workload", required=True, choices=["start", "corpus", "sts", "query", "profile"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stsb", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=90.0, help="seconds of timed repeats before stopping early")
    ap.add_argument("--query-repeats", type=int, default=200)
    ap.add_argument("--save", help="write the workload's embeddings to this .npy")
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import numpy as np
    import workloads
    from checkpoint import load_checkpoint
    from engines import ENGINES

    ckpt = load_checkpoint(Path(args.model))
    engine = ENGINES[args.engine]()
    w = workloads.build(args.quick, Path(args.stsb))
    t_imports = time.perf_counter()
    engine.load(ckpt, args.threads)
    t_load = time.perf_counter()
    engine.embed([workloads.QUERY])
    t_first = time.perf_counter()
    from threadpoolctl import threadpool_info, threadpool_limits

    limits = threadpool_limits(args.threads)  # BLAS/OpenMP pools loaded by the engine, pinned again
    res = {
        "engine": args.engine,
        "workload": args.workload,
        "describe": engine.describe(),
        "precision": engine.precision(),  # what ran: bgesmall's Model.precision, OpenVINO's inference precision
        "start_s": t_first - T_PROCESS,
        "load_s": t_load - t_imports,
        "first_embed_s": t_first - t_load,
        "threadpools": [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version", "architecture")}
                        for p in threadpool_info()],
    }
    if args.workload == "start":
        res["rss_mb"] = peak_rss_mb()
    elif args.workload == "query":
        q = [workloads.QUERY]
        for _ in range(10):
            engine.embed(q)
        lat = []
        t_stop = time.perf_counter() + args.budget / 2  # a slow engine gets fewer calls, not a longer run
        for _ in range(args.query_repeats // (4 if args.quick else 1)):
            t = time.perf_counter()
            engine.embed(q)
            lat.append(time.perf_counter() - t)
            if t > t_stop and len(lat) >= 20:
                break
        lat = np.array(lat)
        res.update(n=len(lat), p50_s=float(np.percentile(lat, 50)), p99_s=float(np.percentile(lat, 99)),
                   mean_s=float(lat.mean()), rss_mb=peak_rss_mb())
        if args.save:  # the query's vector, [1, dim]: its cosine to the reference's goes in the query table
            np.save(args.save, np.asarray(engine.embed(q), np.float32))
    elif args.workload == "profile":
        res["batches"] = profile(engine, ckpt, w["corpus"].texts)
        res["rss_mb"] = peak_rss_mb()
    else:
        texts = w[args.workload].texts
        longest = max(texts, key=len)
        engine.embed(texts[:64] + [longest])  # warm-up: every code path and the largest buffers
        emb = None

        def run():
            nonlocal emb
            emb = engine.embed(texts)

        times = timed_repeats(run, args.repeats, args.budget)
        res.update(n=len(texts), times_s=times, median_s=float(np.median(times)), rss_mb=peak_rss_mb())
        if args.save:
            np.save(args.save, np.asarray(emb, np.float32))
    limits.restore_original_limits()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def profile(engine, ckpt, texts: list[str]) -> list[dict]:
    """Time the engine on the corpus cut into length-sorted batches of 32 (the ORT peers' batches), one by one."""
    from engines import BATCH
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(ckpt.max_tokens)
    lens = [len(e.ids) for e in tok.encode_batch(texts)]
    order = sorted(range(len(texts)), key=lambda i: lens[i])
    out = []
    for s in range(0, len(order), BATCH):
        idx = order[s:s + BATCH]
        batch = [texts[i] for i in idx]
        engine.embed(batch)  # warm
        best = min(timed_repeats(lambda b=batch: engine.embed(b), 3, 5.0))
        real = [lens[i] for i in idx]
        out.append({"n": len(idx), "max_len": max(real), "real_tokens": sum(real), "padded_tokens": max(real) * len(idx),
                    "seconds": best, "useful_flops": sum(ckpt.flops_per_text(n) for n in real)})
    return out


if __name__ == "__main__":
    sys.exit(main())
