"""bgesmall against the engines users pick today, on the same weights, texts and thread count.

    python benchmarks/bench.py [--model DIR] [--threads N] [--engines bgesmall,ort-fp32,...] [--quick]
                               [--workloads corpus,sts,query] [--profile] [--markdown FILE]

Each (engine, workload) runs in its own subprocess (benchmarks/worker.py) so peak RSS and start-up are clean;
the engines take turns on each workload (so a burst of load on the shared machine hits them alike);
each engine first gets start-only processes (--start-repeats cold ones, then as many warm; for bgesmall "cold"
means an empty NUMBA_CACHE_DIR each time; the median of each is reported). Prints one markdown table per
workload plus start-up and the sgemm roofline.
--quick: 1/5 of the texts, 1 repeat, one start of each kind: for developing, not for figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import report
import roofline
import workloads
from checkpoint import CACHE_DIR, find_checkpoint
from engines import ENGINES

WORKER = Path(__file__).resolve().parent / "worker.py"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def missing_modules(engine) -> list[str]:
    return [m for m in engine.needs + (("onnx", "torch", "transformers") if engine.needs_onnx else ())
            if importlib.util.find_spec(m) is None]


def run_worker(engine: str, workload: str, args, ckpt, env: dict, save: Path | None = None) -> dict:
    cmd = [sys.executable, str(WORKER), "--engine", engine, "--model", str(ckpt.path), "--threads", str(args.threads),
           "--workload", workload, "--stsb", str(args.stsb), "--repeats", str(args.repeats),
           "--budget", str(args.budget), "--query-repeats", str(args.query_repeats)]
    if args.quick:
        cmd.append("--quick")
    if save:
        cmd += ["--save", str(save)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        return {"engine": engine, "workload": workload, "error": f"exit {p.returncode}: {tail}"}
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = wall
    return res


def cpu_info() -> dict:
    """The CPU's model name (lscpu), its family/model/stepping and which of the ISA extensions that matter it has."""
    model = "?"
    try:
        for ln in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if ln.startswith("Model name:"):
                model = ln.split(":", 1)[1].strip()
    except OSError:
        pass
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in cpuinfo.split("\n\n")[0].splitlines()))
    flags = f" {first.get('flags', '')} "
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
           if f" {f} " in flags]
    absent = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f not in isa]
    number = f"vendor {first.get('vendor_id', '?')}, family {first.get('cpu family', '?')}, model " \
             f"{first.get('model', '?')}, stepping {first.get('stepping', '?')}"
    return {"cpu": model, "cpu_number": number, "cores": os.cpu_count(), "isa": isa, "isa_absent": absent}


def bgesmall_commit() -> str:
    """HEAD of the checkout, and whether the engine's sources (bgesmall/, kernels/) differ from it."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "bgesmall", "kernels"],
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"
    return f"{head}{' + uncommitted changes in bgesmall/ or kernels/' if dirty else ''}" if head else "?"


def machine_info(threads: int) -> dict:
    from threadpoolctl import threadpool_info

    blas = [f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}, {p.get('num_threads')} threads)"
            for p in threadpool_info() if p.get("user_api") == "blas" and "numpy" in p.get("filepath", "")]
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "commit": bgesmall_commit(),
        **cpu_info(),
        "threads": threads,
        "python": platform.python_version(), "numpy": np.__version__, "numpy_blas": blas,
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.get(k)},
        "loadavg": load,
    }


def median_start(runs: list[dict]) -> dict:
    """Of repeated start processes, the one with the median start time (of an even count, the slower of the
    middle two), carrying every run's time (`start_s_runs`); the first failed run instead, if any failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["start_s"])
    return dict(ordered[len(ordered) // 2], start_s_runs=[r["start_s"] for r in runs])


def compile_bytecode() -> str:
    """Byte-compile bgesmall's modules, as `pip install` does for every package (the peers' among them). A source
    checkout run with PYTHONDONTWRITEBYTECODE=1 (as on this project's machines) would otherwise compile every
    module from source at each start, which no installed bgesmall does."""
    import compileall

    spec = importlib.util.find_spec("bgesmall")
    if spec is None or not spec.submodule_search_locations:
        return "bgesmall not found"
    package = Path(next(iter(spec.submodule_search_locations)))
    dirs = [package] + [d for d in (package.parent / "kernels",) if d.is_dir()]  # a checkout's kernels/ folder
    ok = all(compileall.compile_dir(str(d), quiet=2, force=False) for d in dirs)
    return f"byte-compiled ({', '.join(str(d) for d in dirs)})" if ok else "byte-compiling failed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: real bge-small via bgesmall.locate, else the "
                                    "bge-small-shaped synthetic checkpoint, made once under benchmarks/.cache/)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine (default: all cores)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--workloads", default="corpus,sts,query", help="comma list of corpus, sts, query")
    ap.add_argument("--quick", action="store_true", help="1/5 of the texts and one repeat: for development only")
    ap.add_argument("--shared", help="the folder holding data/stsb-dev.tsv (default: $BGESMALL_SHARED, "
                                     "../shared beside the repo, /work/shared)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per workload; the median is reported")
    ap.add_argument("--budget", type=float, default=60.0, help="stop repeating a workload once it has taken this long")
    ap.add_argument("--query-repeats", type=int, default=300)
    ap.add_argument("--start-repeats", type=int, default=3,
                    help="start processes per engine, cold and warm each; the median is reported (--quick: 1)")
    ap.add_argument("--profile", action="store_true",
                    help="also time bgesmall, bgesmall-bf16 and ort-fp32 per length-sorted batch of 32 of the corpus")
    ap.add_argument("--markdown", help="also write the report to this file")
    args = ap.parse_args(argv)
    if args.start_repeats < 1:
        ap.error(f"--start-repeats must be 1 or more, not {args.start_repeats}")
    if args.quick:
        args.repeats, args.budget = 1, min(args.budget, 20.0)
    args.stsb = Path(args.shared) / "data" / "stsb-dev.tsv" if args.shared else workloads.default_stsb_path()

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]

    ckpt = find_checkpoint(args.model)
    log(f"model {ckpt.path} ({'random bge-shaped weights' if ckpt.synthetic else 'trained weights'})")
    wl = workloads.build(args.quick, args.stsb)
    stats = report.token_stats(ckpt, wl)

    skipped = {}
    for e in list(engines):
        miss = missing_modules(ENGINES[e])
        if miss:
            skipped[e] = f"not installed: {', '.join(miss)}"
    if any(ENGINES[e].needs_onnx and e not in skipped for e in engines):
        try:
            from export_onnx import ensure_onnx

            ensure_onnx(ckpt, log=log)
        except Exception as exc:  # noqa: BLE001 - any export failure only skips the ONNX peers
            for e in engines:
                if ENGINES[e].needs_onnx and e not in skipped:
                    skipped[e] = f"ONNX export failed: {type(exc).__name__}: {exc}"
    for e, why in skipped.items():
        log(f"skipping {e}: {why}")
    engines = [e for e in engines if e not in skipped]

    info = machine_info(args.threads)
    roofs = []  # the roofline, measured before each workload's turns and at the end: its spread shows the noise

    def measure_roofline(when: str) -> None:
        log(f"sgemm roofline, {args.threads} threads ({when})")
        r = roofline.measure(ckpt, args.threads, seconds=1.0)
        roofs.append((when, r))
        log(f"  {r.gflops:.0f} GFLOP/s ({', '.join(f'{t} tok: {g:.0f}' for t, g in r.by_tokens.items())})")

    measure_roofline("start")

    run_dir = CACHE_DIR / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Workload-major order: the engines take turns on each workload, so the noise of a shared machine falls on
    # all of them within minutes of each other rather than on whichever engine happened to run during a burst.
    results: dict[str, dict] = {e: {} for e in engines}
    if any(ENGINES[e].numba_cache for e in engines):
        info["bytecode"] = compile_bytecode()
    envs, tmps = {}, []
    starts = 1 if args.quick else args.start_repeats
    for e in engines:
        env = envs[e] = dict(os.environ)  # OPENBLAS_CORETYPE & co. are passed through untouched, and recorded
        for label in ("start_cold", "start_warm"):
            log(f"{e}: {label} x{starts}")
            runs = []
            for _ in range(starts):
                if label == "start_cold" and ENGINES[e].numba_cache:  # each bgesmall tier, each cold start its own
                    if runs:  # the previous cold start's folder (130 MB of kept weights): only the last one is used
                        tmps.pop().cleanup()
                    tmps.append(tempfile.TemporaryDirectory(prefix="bench-numba-"))  # kernels, plan, weights file
                    env["NUMBA_CACHE_DIR"] = tmps[-1].name  # empty: the start compiles every kernel
                runs.append(run_worker(e, "start", args, ckpt, env))
            results[e][label] = median_start(runs)  # the warm starts and the workloads: the last cold start's cache
    for w in wanted + (["profile"] if args.profile else []):
        if w in ("corpus", "sts"):
            measure_roofline(f"before {w}")
        for e in engines:
            if w == "profile" and e not in report.PROFILED:
                continue
            log(f"{e}: {w}")
            save = run_dir / f"{e}-{w}.npy" if w in ("corpus", "sts", "query") else None
            r = results[e][w] = run_worker(e, w, args, ckpt, envs[e], save)
            if "error" in r:
                log(f"  error: {r['error']}")
            elif "median_s" in r:
                log(f"  {r['n'] / r['median_s']:.1f} texts/s")
            elif "p50_s" in r:
                log(f"  p50 {r['p50_s'] * 1e3:.2f} ms")
    for t in tmps:
        t.cleanup()

    opprof = ""
    if args.profile and "bgesmall" in engines and "corpus" in wanted:
        log("bgesmall op profile (one thread)")
        cmd = [sys.executable, str(WORKER.parent / "opprofile.py"), "--model", str(ckpt.path),
               "--shared", str(args.stsb.parent.parent)] + (["--quick"] if args.quick else [])
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        opprof = p.stdout if p.returncode == 0 else f"(opprofile.py failed: {(p.stderr or p.stdout)[-300:]})\n"
    info["loadavg_end"] = os.getloadavg()
    measure_roofline("end")
    roof = roofline.spread(roofs)  # the ceiling is the best measurement: noise only lowers a rate
    accuracy = report.accuracy(run_dir, engines, wanted)
    text = report.render(args, argv if argv is not None else sys.argv[1:], ckpt, info, roof, stats, results,
                         accuracy, skipped, wanted)
    (run_dir / "results.json").write_text(json.dumps(
        {"machine": info, "roofline": roof.__dict__, "roofline_runs": [(w, r.__dict__) for w, r in roofs], "stats": stats, "results": results, "skipped": skipped},
        indent=1, default=str))
    text += "\n" + opprof if opprof else ""
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
        log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
