"""The planner: time every candidate of each choice in bgesmall/plan.py on this machine and keep the fastest.

Robust to a noisy, shared machine the way FFTW's planner is: candidates of one choice take turns (a burst of
load from elsewhere falls on all of them), each is timed several times and its best time counts (noise only
ever adds time), and a candidate replaces the built-in one only if it is faster by more than MARGIN (a length
threshold, chosen where one path overtakes the other, takes none: see _threshold). The whole
measurement is held to BUDGET_S seconds; a choice not reached by then keeps the built-in value, and the plan
says so. Everything runs on the model's own weights and shapes, on one thread, as each worker runs a batch;
the split of a lone query is timed on the split thread with its team, as queries run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import numpy as np

from . import encoder
from .kernels.attention import VECTOR_FROM
from .linear import IMPLEMENTATIONS, Linear
from .plan import (
    ATTENTION_LENGTHS, BATCH_TOKENS, BLOCK_LENGTHS, ENV_PLAN, LINEAR, NEVER, ROW_CLASSES, Plan, default_plan,
    fingerprint, parse_forced, read_plan, shape_key, write_plan,
)
from .threads import on_split_thread, single_threaded_blas

BUDGET_S = 3.0
MARGIN = 0.03  # a challenger must beat the built-in candidate by 3%: noise must not flip a choice


def best_times(candidates: dict, repeats: int, deadline: float, warm_up: bool = True) -> dict[str, float]:
    """name -> best of `repeats` timings of candidates[name](), the candidates taking turns; one warm-up each."""
    for fn in candidates.values() if warm_up else ():
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return best


def pick(times: dict[str, float], incumbent: str) -> str:
    """The fastest candidate, unless it beats the incumbent by MARGIN or less."""
    fastest = min(times, key=times.get)
    return fastest if times[fastest] < times[incumbent] * (1 - MARGIN) else incumbent


def measure(cfg, weights, threads: int, budget_s: float = BUDGET_S) -> Plan:
    """A plan measured for this model on this machine, in at most about budget_s seconds (of measuring: the tier's
    kernels, compiled or loaded at their first use, are made ready first: the bf16 tier's are compiled at their
    first call, which on a cold start took the whole budget)."""
    # first, one layer over a 1-token and a VECTOR_FROM-token sequence, and a split query product: every kernel
    # the measurements run is compiled or loaded before the clock starts (a kernel deferred to its first call: the
    # bf16 tier's, the scalar attention of heads that are not 32 wide, a compile-ahead child's share)
    ws = encoder.Workspace.allocate(cfg, 1 + VECTOR_FROM)
    ws.x[:] = 1.0
    encoder.encoder_layer(cfg, weights.layers[0], encoder.Sequences.from_offsets(
        np.array([0, 1, 1 + VECTOR_FROM], dtype=np.int64), NEVER), ws.views(1 + VECTOR_FROM))
    lin = weights.layers[0].qkv_w
    x1 = np.zeros((1, lin.shape[0]), dtype=np.float32)
    out1 = np.empty((1, lin.out_features), dtype=np.float32)
    if threads > 1:
        on_split_thread(lambda parts: lin(x1, out1, parts), threads)
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    plan = default_plan(cfg)
    timings: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    rng = np.random.default_rng(0)
    with single_threaded_blas():
        linear = {}
        for lin in _one_of_each_shape(weights):
            key = shape_key(lin.shape)
            choices = []
            for lo, rows in ROW_CLASSES:
                if time.perf_counter() > deadline:
                    skipped.append(f"linear {key} {lo}+ rows")
                    choices.append((lo, "tiles"))
                    continue
                times = _time_linear(lin, rows, rng, deadline)
                timings[f"linear {key} at {rows} rows"] = times
                choices.append((lo, pick(times, "tiles")))
            linear[key] = _merge(choices)
        plan = replace(plan, linear=linear)

        # (a length past the model's positions, or the deadline, can leave a choice with nothing measured: then it
        # keeps its built-in value, and the plan says so)
        times = _time_blocks(cfg, weights, rng, deadline) if cfg.hidden_size == 32 * cfg.num_attention_heads else None
        if times:
            timings.update({f"blocks at {n} tokens": t for n, t in sorted(times.items())})
            plan = replace(plan, blocks_from=_threshold(times, "rows", "blocks", settled=None))
        elif times is not None:
            skipped.append("attention blocks")

        times = _time_attention(cfg, weights, rng, deadline, plan.blocks_from)
        if times:
            timings.update({f"attention at {n} tokens": t for n, t in sorted(times.items())})
            plan = replace(plan, long_sequence=_threshold(times))
        else:
            skipped.append("attention")

        if threads > 1 and time.perf_counter() < deadline:
            times = on_split_thread(lambda parts: best_times(
                {"split": _query_products(weights, parts, rng), "single": _query_products(weights, 1, rng)}, 5, deadline
            ), threads)
            if times is None:  # no usable threading layer: nothing to time
                plan = replace(plan, query="single")
            else:
                timings["query (48 products of 8 rows)"] = times
                plan = replace(plan, query=pick(times, "split"))
        elif threads > 1:
            skipped.append("query")
        if time.perf_counter() < deadline:
            times = _time_batch_tokens(cfg, weights, plan, rng, deadline)
            timings["batch tokens (time per 1024 tokens)"] = times
            plan = replace(plan, batch_tokens=int(pick(times, "1024")))
        else:
            skipped.append("batch tokens")

    source = f"measured in {time.perf_counter() - t0:.2f} s"
    if skipped:
        source += f" (time limit reached: built-in choice for {', '.join(skipped)})"
    return replace(plan, source=source, timings=timings)


def _one_of_each_shape(weights) -> list[Linear]:
    seen = {}
    for lin in weights.layers[0].linears():
        seen.setdefault(lin.shape, lin)
    return list(seen.values())


def _probe(lin: Linear, choices: tuple[tuple[int, str], ...]) -> Linear:
    """The same weight prepared for other choices, leaving the model's own Linear as it is."""
    probe = Linear(lin.panels, lin.out_features, in_features=lin.in_features)
    probe.prepare(choices)
    return probe


def _time_linear(lin: Linear, rows: int, rng, deadline: float) -> dict[str, float]:
    # every implementation in LINEAR for this weight's tier on x [rows, in] -> [rows, out], the weight's own values
    exact = lin.precision == "fp32"
    probe = _probe(lin, ((1, "blas" if exact else "tiles"),))  # the plain matrix too, for the BLAS candidate
    x = rng.standard_normal((rows, lin.shape[0])).astype(np.float32)
    out = np.empty((rows, lin.out_features), dtype=np.float32)
    # blocks of 48 change nothing below 49 rows; BLAS has no bf16 format
    names = [n for n in LINEAR if not (n == "tiles/48" and rows <= 48) and (exact or n != "blas")]
    candidates = {n: (lambda n=n: IMPLEMENTATIONS[n](probe, x, out)) for n in names}
    return best_times(candidates, 7 if rows < 256 else 3, deadline)


def _merge(choices: list[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    # ((1, a), (32, a), (256, b)) -> ((1, a), (256, b))
    merged = []
    for lo, name in choices:
        if not merged or merged[-1][1] != name:
            merged.append((lo, name))
    return tuple(merged)


def _time_blocks(cfg, weights, rng, deadline: float) -> dict[int, dict[str, float]]:
    # per length n: the fused kernel (heads of 32) a query row at a time, and eight rows at a time
    return _time_paths(cfg, weights, rng, deadline, BLOCK_LENGTHS,
                       {"rows": lambda n: (NEVER, n + 1), "blocks": lambda n: (NEVER, n)})


def _time_attention(cfg, weights, rng, deadline: float, blocks_from: int) -> dict[int, dict[str, float]]:
    # per length n: the fused kernel, and the BLAS path
    return _time_paths(cfg, weights, rng, deadline, ATTENTION_LENGTHS,
                       {"fused": lambda n: (NEVER, blocks_from), "blas": lambda n: (1, blocks_from)})


def _time_paths(cfg, weights, rng, deadline: float, lengths, paths) -> dict[int, dict[str, float]]:
    # per length n, the longest first: ~512 tokens of n-token sequences through each attention path, paths[name](n)
    # the (long_sequence, blocks_from) that sends them there, the first path the short sequences' and the second the
    # long ones'. It stops after the first length at which the second path is not faster: that settles the
    # threshold (_threshold reads down from the longest length to the first such one), so shorter lengths would
    # change nothing (on Zen 5, attention's fused kernel wins at 256 tokens: one length measured instead of nine).
    # That length's verdict is checked with a second round of timings (one noisy round had sent Zen 5's
    # blocks_from to 128, where every other measurement gave 24-48).
    short, long = paths
    h = cfg.hidden_size
    bias = weights.layers[0].qkv_b
    out = {}
    for n in sorted(lengths, reverse=True):
        if n > cfg.max_position_embeddings:
            continue
        if time.perf_counter() > deadline:
            break
        count = max(1, 512 // n)
        offsets = np.arange(count + 1, dtype=np.int64) * n
        qkv = rng.standard_normal((count * n, 3 * h)).astype(np.float32)
        ctx = np.empty((count * n, h), dtype=np.float32)
        runs = {name: (lambda s=encoder.Sequences.from_offsets(offsets, *route(n)):
                       encoder.self_attention(cfg, qkv, bias, s, ctx)) for name, route in paths.items()}
        times = best_times(runs, 3, deadline)
        if times[long] >= times[short]:  # where the measuring stops the threshold is settled: first, timed again
            again = best_times(runs, 3, deadline, warm_up=False)
            times = {name: min(t, again[name]) for name, t in times.items()}
        out[n] = times
        if times[long] >= times[short]:
            break
    return out


def _threshold(times: dict[int, dict[str, float]], short: str = "fused", long: str = "blas",
               settled: int | None = 256) -> int:
    """The shortest measured length from which the `long` path is faster than the `short` one at every longer
    measured length. Where it lost at the longest length measured: NEVER (the `short` path at every length) if
    that length is `settled` or more (attention's BLAS path: both costs grow as the square of the length from 256
    on, Zen 5's fused kernel 1.9x BLAS's rate at 512), else twice that length (the eight-row blocks, whose lead
    grows with the length, settled=None: Zen 5, 1.42x the rows' rate at 48). A threshold takes no margin against
    the built-in value: the candidates differ in summation order only, and either side of it is within a few
    percent of the other."""
    longest = max(times)
    threshold = NEVER if settled is not None and longest >= settled else 2 * longest
    for n in sorted(times, reverse=True):
        if times[n][long] >= times[n][short]:
            break
        threshold = n
    return threshold


def _time_batch_tokens(cfg, weights, plan: Plan, rng, deadline: float) -> dict[str, float]:
    # seconds per 1024 tokens of one encoder layer (the plan's choices so far) over 64-token sequences,
    # the pass holding 512, 1024 or 2048 tokens
    first = weights.layers[0]
    layer = replace(first, **{name: _probe(getattr(first, name), plan.linear_choices(getattr(first, name).shape))
                              for name in first.LINEARS})
    ws = encoder.Workspace.allocate(cfg, max(BATCH_TOKENS))
    ws.x[:] = rng.standard_normal(ws.x.shape).astype(np.float32)
    candidates = {}
    for tokens in BATCH_TOKENS:
        offsets = np.arange(tokens // 64 + 1, dtype=np.int64) * 64
        seqs = encoder.Sequences.from_offsets(offsets, plan.long_sequence, plan.blocks_from)
        view = ws.views(tokens)
        candidates[str(tokens)] = lambda v=view, s=seqs: encoder.encoder_layer(cfg, layer, s, v)
    times = best_times(candidates, 2, deadline, warm_up=False)  # every kernel ran already; the buffers are touched
    return {k: t * 1024 / int(k) for k, t in times.items()}


def _query_products(weights, parts: int, rng):
    # the 48 linear products of an 8-token query, with weights streamed from memory as in a real pass
    x = {}
    outs = {}

    def run():
        for layer in weights.layers:
            for lin in layer.linears():
                k, n = lin.shape
                if k not in x:
                    x[k] = rng.standard_normal((8, k)).astype(np.float32)
                if n not in outs:
                    outs[n] = np.empty((8, n), dtype=np.float32)
                lin(x[k], outs[n], parts)

    return run


def known_plan(cfg, threads: int, requested=None, precision: str = "fp32") -> Plan | None:
    """The plan a model loads with if it needs no measuring: `requested` (a Plan, or a spec as in BGESMALL_PLAN),
    else $BGESMALL_PLAN, else the kept plan for this machine; None if it must be measured (on the weights)."""
    if isinstance(requested, Plan):
        requested.check()
        return requested
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"plan must be a bgesmall.plan.Plan or a string such as 'linear=blas', got {type(requested).__name__}")
    spec = requested if requested is not None else os.environ.get(ENV_PLAN)
    if spec:
        return parse_forced(spec, cfg)
    return read_plan(fingerprint(cfg, threads, precision))


def plan_for(cfg, weights, threads: int, requested=None, *, remeasure: bool = False) -> Plan:
    """known_plan's answer, else one measured now (and kept). remeasure: measure even if one is kept or forced."""
    if not remeasure:
        known = known_plan(cfg, threads, requested, weights.precision)
        if known is not None:
            return known
    fp = fingerprint(cfg, threads, weights.precision)
    try:
        plan = measure(cfg, weights, threads)
    except Exception as e:  # noqa: BLE001 - a failed measurement must not cost the user their model
        print(f"bgesmall: measuring the plan failed ({type(e).__name__}: {e}); using the built-in plan", file=sys.stderr)
        return replace(default_plan(cfg), source=f"default (measuring failed: {type(e).__name__})")
    write_plan(fp, plan)
    return plan
