"""The float32 matmul ceiling of this machine: numpy's sgemm on the model's own GEMM shapes.

ceiling texts/s = measured sgemm FLOP/s / FLOPs of the average text of the workload (linear + attention
matmuls at the texts' real lengths, no padding: see Checkpoint.flops_per_text). No engine doing the same
float32 arithmetic can beat it by much; an engine's "fraction of roofline" is its texts/s over this ceiling.
The FLOPs are the whole model's, as every peer computes it: under CLS pooling bgesmall skips the last layer's
output projection and FFN for all but the first token (bgesmall/encoder.py, last_layer_first_tokens), about 6%
of the work on the corpus, so its fraction counts work it did not need to do.

The memory floor of a query: a pass of a few tokens still reads every linear weight once (85 MB of float32 for
bge-small, far more than any L2 and more than most L3s), so its time is at least those bytes over the rate at
which the machine can stream them. That rate is measured here as numpy's sgemv (OpenBLAS, the same threads) over
a matrix of the model's linear-weight size: a plain read of every byte with one multiply-add each.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from checkpoint import Checkpoint


@dataclass(frozen=True)
class Roofline:
    gflops: float  # best sgemm rate over the token counts tried, GFLOP/s
    by_tokens: dict  # tokens -> GFLOP/s, one encoder layer's four linear GEMMs
    threads: int
    runs: tuple = ()  # (when, GFLOP/s) of each measurement that went into it
    read_gbs: float = 0.0  # best streaming read rate, GB/s (sgemv over the model's linear-weight bytes)
    read_runs: tuple = ()  # (when, GB/s) of each measurement


def layer_gemms(ckpt: Checkpoint, tokens: int, rng) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The four linear GEMMs of one layer at `tokens` rows: (a, b, out) with out = a @ b."""
    h, i = ckpt.hidden_size, ckpt.intermediate_size
    shapes = [(h, 3 * h), (h, h), (h, i), (i, h)]  # QKV, attention output, FFN up, FFN down
    return [(rng.standard_normal((tokens, k), np.float32), rng.standard_normal((k, n), np.float32),
             np.empty((tokens, n), np.float32)) for k, n in shapes]


def spread(measured: list[tuple[str, Roofline]]) -> Roofline:
    """The best rate per token count over measurements taken at different times of one run, with each one's rate."""
    first = measured[0][1]
    by = {t: max(r.by_tokens[t] for _, r in measured) for t in first.by_tokens}
    return Roofline(gflops=max(by.values()), by_tokens=by, threads=first.threads,
                    runs=tuple((when, r.gflops) for when, r in measured),
                    read_gbs=max(r.read_gbs for _, r in measured), read_runs=tuple((w, r.read_gbs) for w, r in measured))


def measure(ckpt: Checkpoint, threads: int, token_counts=(256, 1024, 4096), seconds: float = 1.5) -> Roofline:
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    by_tokens = {}
    with threadpool_limits(threads):
        for t in token_counts:
            gemms = layer_gemms(ckpt, t, rng)
            flops = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in gemms)
            for a, b, out in gemms:  # warm-up
                np.matmul(a, b, out=out)
            rates = []
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end or len(rates) < 3:
                t0 = time.perf_counter()
                for a, b, out in gemms:
                    np.matmul(a, b, out=out)
                rates.append(flops / (time.perf_counter() - t0) / 1e9)
            by_tokens[t] = float(np.median(rates))
        read = read_rate(ckpt, seconds / 2)
    return Roofline(gflops=max(by_tokens.values()), by_tokens=by_tokens, threads=threads, read_gbs=read)


def read_rate(ckpt: Checkpoint, seconds: float) -> float:
    """GB/s of numpy's sgemv over a float32 matrix of the model's linear-weight bytes (threads as set by the
    caller): the best of repeats, as a streaming read is only ever slowed by noise."""
    h = ckpt.hidden_size
    w = np.ones((ckpt.linear_weight_bytes // 4 // h, h), np.float32)  # written: real pages, not the zero page
    x = np.ones(h, np.float32)
    w @ x
    best, t_end, n = 0.0, time.perf_counter() + seconds, 0
    while time.perf_counter() < t_end or n < 5:
        t0 = time.perf_counter()
        w @ x
        best, n = max(best, w.nbytes / (time.perf_counter() - t0) / 1e9), n + 1
    return best
