"""Where bgesmall's time goes, op by op: one thread, the corpus (or STS-B), each kernel call timed.

    python benchmarks/opprofile.py [--model DIR] [--workload corpus|sts] [--quick] [--precision fp32|bf16]

Wraps the kernels that bgesmall.encoder calls (its module globals: self_attention, bias_gelu, residual_layernorm,
embed_layernorm, and matmul by shape) with timers, then runs model.embed on the workload with one
worker thread, so the op times add up to the wall time; the rest is tokenization, packing and pooling.
Compares each matmul's rate with numpy's single-thread sgemm on the same shape. Depends on bgesmall's
internal module layout: if that changes, this script says so instead of timing the wrong thing.
"""
from __future__ import annotations

import os

for _v in ("BGESMALL_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import workloads
from checkpoint import find_checkpoint

TIMES: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])  # op -> [calls, seconds, flops]


def timed(name, fn, flops=None):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        rec = TIMES[name]
        rec[0] += 1
        rec[1] += time.perf_counter() - t
        if flops:
            rec[2] += flops(*args, **kwargs)
        return out

    return wrapper


def attention_flops(cfg, qkv, bias, seqs, out, first_only=False):  # Q.K^T and P.V over all heads, each sequence alone
    lens = np.diff(seqs.offsets).astype(np.float64)
    queries = np.ones_like(lens) if first_only else lens
    return float(4 * (queries * lens).sum() * out.shape[1])


def install(encoder, names: dict) -> None:
    # self_attention: the fused kernel for short sequences and the BLAS path for long ones, timed as one op
    for attr in ("self_attention", "bias_gelu", "residual_layernorm", "embed_layernorm"):
        if not hasattr(encoder, attr):
            raise SystemExit(f"bgesmall.encoder has no {attr!r} any more: update benchmarks/opprofile.py")
        label = "attention" if attr == "self_attention" else attr
        setattr(encoder, attr, timed(label, getattr(encoder, attr), attention_flops if attr == "self_attention" else None))

    from bgesmall.linear import Linear  # every linear layer runs through Linear.__call__ (the plan's choice)

    real_call = Linear.__call__

    def call(self, x, out, parts=1):  # the linear layers: x [rows, in] @ W [in, out]
        name = names.get((x.shape[1], out.shape[1]), f"matmul [{x.shape[1]}x{out.shape[1]}]")
        t = time.perf_counter()
        real_call(self, x, out, parts)
        rec = TIMES[name]
        rec[0] += 1
        rec[1] += time.perf_counter() - t
        rec[2] += 2.0 * x.shape[0] * x.shape[1] * out.shape[1]

    Linear.__call__ = call


def sgemm_rate(m: int, k: int, n: int) -> float:
    a = np.random.default_rng(0).standard_normal((m, k), np.float32)
    b = np.random.default_rng(1).standard_normal((n, k), np.float32).T
    out = np.empty((m, n), np.float32)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--workload", default="corpus", choices=["corpus", "sts"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shared")
    ap.add_argument("--precision", default="fp32", help="the tier to profile: fp32 (exact) or bf16")
    args = ap.parse_args(argv)
    ckpt = find_checkpoint(args.model)
    stsb = Path(args.shared) / "data" / "stsb-dev.tsv" if args.shared else workloads.default_stsb_path()
    texts = workloads.build(args.quick, stsb)[args.workload].texts

    import bgesmall
    from bgesmall import encoder

    model = bgesmall.load(ckpt.path, precision=args.precision)
    model.embed(texts[:64] + [max(texts, key=len)])  # compile / warm before timing
    h, f = ckpt.hidden_size, ckpt.intermediate_size
    names = {(h, 3 * h): f"matmul QKV [T,{h}]x[{h},{3 * h}]", (h, h): f"matmul attn out [T,{h}]x[{h},{h}]",
             (h, f): f"matmul FFN in [T,{h}]x[{h},{f}]", (f, h): f"matmul FFN out [T,{f}]x[{f},{h}]"}
    install(encoder, names)
    t = time.perf_counter()
    model.embed(texts)
    wall = time.perf_counter() - t
    if not TIMES:
        raise SystemExit("no kernel was timed: bgesmall no longer runs through bgesmall.encoder's globals")

    tokens = sum(model.count_tokens(texts))
    print(f"### bgesmall op profile ({model.precision}): {args.workload}, {len(texts)} texts, {tokens} tokens, one thread, "
          f"{wall:.2f} s wall ({len(texts) / wall:.1f} texts/s)\n")
    print("| op | calls | s | share | GFLOP/s | numpy sgemm, 1 thread, same shape at 1024 rows |")
    print("|---|---:|---:|---:|---:|---:|")
    shapes = {v: k for k, v in names.items()}
    for name, (calls, sec, flops) in sorted(TIMES.items(), key=lambda kv: -kv[1][1]):
        ref = ""
        if name in shapes:
            ref = f"{sgemm_rate(1024, *shapes[name]):.0f}"
        print(f"| {name} | {calls} | {sec:.2f} | {100 * sec / wall:.0f}% | "
              f"{f'{flops / sec / 1e9:.0f}' if flops else ''} | {ref} |")
    rest = wall - sum(v[1] for v in TIMES.values())
    print(f"| outside the kernels (tokenize, pack, pool, Python) | | {rest:.2f} | {100 * rest / wall:.0f}% | | |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
