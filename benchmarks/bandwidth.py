"""The floor under a single query's latency: how fast this machine reads the model's float32 weights.

    python benchmarks/bandwidth.py [--mb 85]

A one-query forward pass multiplies a few token rows by every linear weight once: 85 MB of float32 for
bge-small (21.2M linear parameters), too big for the caches (this machine: 2 x 1 MB L2, 32 MB L3), so each query
streams them from memory. This times a numba sum over an array of that size on one thread and split over two,
and prints the time one pass over the weights takes at that rate: no float32 engine answers a query faster.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np


@numba.njit("f4(f4[::1])", nogil=True, fastmath=True)
def _sum(a):  # [n] -> a reduction the CPU can run at load bandwidth
    t = np.float32(0.0)
    for i in range(a.shape[0]):
        t += a[i]
    return t


def best_seconds(fn, repeats: int = 15) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=85.0, help="bytes to stream, in MB (default 85: bge-small's linear weights)")
    args = ap.parse_args(argv)
    a = np.ones(int(args.mb * 1e6) // 4, dtype=np.float32)
    halves = [a[: a.size // 2], a[a.size // 2 :]]
    with ThreadPoolExecutor(2) as pool:
        for threads, fn in ((1, lambda: _sum(a)), (2, lambda: list(pool.map(_sum, halves)))):
            sec = best_seconds(fn)
            print(f"{threads} thread{'s' if threads > 1 else ''}: {args.mb / 1e3 / sec:.1f} GB/s, "
                  f"one pass over {args.mb:g} MB in {sec * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
