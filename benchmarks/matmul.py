"""bgesmall's packed matmul against numpy's sgemm, on one thread, for the 48 linear products of bge-small.

    python benchmarks/matmul.py [--rows 1,8,9,17,64,256]

Each product gets its own random weights (48 matrices, 85 MB: streamed from memory, as in a real pass). For each
row count it reports the median time of all 48 products with numpy (OpenBLAS, weights [in, out]) and with
bgesmall.kernels.linear (weights packed into column panels), and their ratio. The figures quoted in
kernels/matmul.py come from this script.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from bgesmall.kernels import linear, pack_columns  # noqa: E402

SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]  # one layer: QKV, attention out, FFN in, FFN out


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,8,9,12,13,17,18,64,256", help="comma list of row counts (tokens)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES * 12]
    packed = [pack_columns(w) for w in weights]
    print("| rows | numpy sgemm ms | bgesmall linear ms | speed-up |")
    print("|---:|---:|---:|---:|")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: rng.standard_normal((m, k)).astype(np.float32) for k, _ in SHAPES}
        outs = [np.empty((m, w.shape[1]), np.float32) for w in weights]
        blas = median_ms(lambda: [np.matmul(xs[w.shape[0]], w, out=o) for w, o in zip(weights, outs)], args.repeats)
        ours = median_ms(lambda: [linear(xs[w.shape[0]], p, o) for w, p, o in zip(weights, packed, outs)], args.repeats)
        print(f"| {m} | {blas:.2f} | {ours:.2f} | {blas / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
