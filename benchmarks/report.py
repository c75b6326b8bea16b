"""Markdown tables from the workers' results: one per workload, start-up, the targets (issues 9, 10), the profile."""
from __future__ import annotations

import shlex
import time
from pathlib import Path

import numpy as np
from checkpoint import Checkpoint

# The exact reference each engine's vectors are compared to: the first of these that ran. sentence-transformers is
# the reference implementation; bgesmall's exact tier matches it to 1e-5 (tested on every commit).
REFERENCE_ORDER = ("sentence-transformers", "bgesmall", "ort-fp32")
PROFILED = ("bgesmall", "bgesmall-bf16", "ort-fp32")  # the engines --profile times batch by batch


def token_lengths(ckpt: Checkpoint, texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(ckpt.max_tokens)
    return np.array([len(e.ids) for e in tok.encode_batch(texts)])


def token_stats(ckpt: Checkpoint, wl: dict) -> dict:
    out = {}
    for name, w in wl.items():
        lens = token_lengths(ckpt, w.texts)
        out[name] = {"n": len(lens), "tokens": int(lens.sum()), "mean": float(lens.mean()),
                     "median": float(np.median(lens)), "p90": float(np.percentile(lens, 90)), "max": int(lens.max()),
                     "flops": float(sum(ckpt.flops_per_text(int(n)) for n in lens))}
    return out


def accuracy(run_dir: Path, engines: list[str], workloads: list[str]) -> dict:
    """workload -> engine -> (min cosine, mean cosine, max abs diff) against the reference engine's embeddings."""
    out = {}
    for w in ("corpus", "sts", "query"):
        if w not in workloads:
            continue
        embs = {e: np.load(run_dir / f"{e}-{w}.npy") for e in engines if (run_dir / f"{e}-{w}.npy").is_file()}
        ref = next((e for e in REFERENCE_ORDER if e in embs), None)
        if ref is None:
            continue
        r = embs[ref] / np.linalg.norm(embs[ref], axis=1, keepdims=True)
        out[w] = {"reference": ref}
        for e, x in embs.items():
            if x.shape != r.shape:
                out[w][e] = None
                continue
            xn = x / np.linalg.norm(x, axis=1, keepdims=True)
            cos = np.sum(xn.astype(np.float64) * r, axis=1)  # [n]
            out[w][e] = (float(cos.min()), float(cos.mean()), float(np.max(np.abs(x - embs[ref]))))
    return out


def _f(x, fmt="{:.1f}"):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def render(args, argv, ckpt, info, roof, stats, results, acc, skipped, wanted) -> str:
    L = []
    add = L.append
    add(f"## bgesmall benchmark, {time.strftime('%Y-%m-%d %H:%M')}{' (--quick: development run)' if args.quick else ''}")
    add("")
    add(f"- command: `python benchmarks/bench.py {shlex.join(argv)}`".replace(" `", " `", 1))
    kind = "random bge-small-shaped weights (same compute as the trained model)" if ckpt.synthetic else "trained weights"
    add(f"- model: `{ckpt.path.name}`, {kind}; {ckpt.num_hidden_layers} layers, hidden {ckpt.hidden_size}, "
        f"FFN {ckpt.intermediate_size}, {ckpt.pooling} pooling, truncation at {ckpt.max_tokens} tokens")
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items()) or "OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE not set"
    absent = ", ".join(info.get("isa_absent", ())) or "none"
    add(f"- machine: {info['cpu']} ({info.get('cpu_number', '?')}), {info['cores']} cores; has "
        f"{', '.join(info['isa'])}; lacks {absent}; {info['threads']} threads for "
        f"every engine; Python {info['python']}, numpy {info['numpy']} with {'; '.join(info['numpy_blas'])}; {env}")
    add(f"- bgesmall at commit {info['commit']}" + (f"; {info['bytecode']}, as pip install does" if "bytecode" in info else ""))
    add(f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in info['loadavg'])}, at the end: "
        f"{', '.join(f'{x:.2f}' for x in info.get('loadavg_end', ()))} (2 cores shared with other work: compare "
        "ratios within one run, not figures across runs)")
    runs = [g for _, g in roof.runs]
    spread = (f"; measured {len(runs)} times between the engines' turns ({', '.join(f'{w}: {g:.0f}' for w, g in roof.runs)}"
              f", spread {min(runs):.0f}-{max(runs):.0f})" if runs else "")
    add(f"- float32 roofline: numpy sgemm on one layer's four linear GEMMs, {roof.threads} threads, the best "
        f"measurement: **{roof.gflops:.0f} GFLOP/s** ({', '.join(f'{t} tokens: {g:.0f}' for t, g in roof.by_tokens.items())})"
        f"{spread}; ceiling texts/s = that rate / real FLOPs per text (linear + attention matmuls, no padding)")
    for e, why in skipped.items():
        add(f"- skipped {e}: {why}")
    descr = {e: next((r[w]["describe"] for w in r if isinstance(r[w], dict) and r[w].get("describe")), "")
             for e, r in results.items()}
    for e, d in descr.items():
        add(f"- {e}: {d}")
    add("")

    def rate(e, w):
        r = results.get(e, {}).get(w, {})
        return r["n"] / r["median_s"] if r.get("median_s") else None

    for w in ("corpus", "sts"):
        if w not in wanted:
            continue
        s = stats[w]
        add(f"### {w}: {s['n']} texts, tokens mean {s['mean']:.1f}, median {s['median']:.0f}, p90 {s['p90']:.0f}, "
            f"max {s['max']} ({s['tokens']} in all)")
        add("")
        ref = acc.get(w, {}).get("reference", "-")
        add(f"| engine | precision | texts/s | tokens/s | useful GFLOP/s | % of roofline | texts/s peer / bgesmall "
            f"| peak RSS MB | min cos vs {ref} | mean cos | max abs diff | runs |")
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ceiling = roof.gflops * 1e9 / (s["flops"] / s["n"])
        base = rate("bgesmall", w)
        for e, r in results.items():
            x = r.get(w, {})
            if "error" in x:
                add(f"| {e} | error: {x['error'].splitlines()[-1][:120]} ||||||||||")
                continue
            t = rate(e, w)
            if t is None:
                continue
            cos = acc.get(w, {}).get(e) or (None, None, None)
            add(f"| {e} | {x.get('precision') or '?'} | {t:.1f} | {t * s['tokens'] / s['n']:.0f} | "
                f"{t * s['flops'] / s['n'] / 1e9:.0f} | {100 * t / ceiling:.0f}% | "
                f"{_f(t / base if base else None, '{:.2f}x')} | {x['rss_mb']:.0f} | {_f(cos[0], '{:.5f}')} | "
                f"{_f(cos[1], '{:.5f}')} | {_f(cos[2], '{:.1e}')} | {len(x['times_s'])} |")
        add(f"| *sgemm roofline* | | *{ceiling:.1f}* | *{ceiling * s['tokens'] / s['n']:.0f}* | *{roof.gflops:.0f}* "
            f"| *100%* | | | | | | |")
        add("")
        add("precision: what each engine reports it ran (bgesmall: Model.precision; OpenVINO: the compiled model's "
            "inference precision). useful GFLOP/s: the matmul FLOPs of the texts' real tokens per second (padding is "
            "not useful work). int8 and bf16 engines are not bound by the float32 roofline. cos: of each text's vector "
            f"to {ref}'s, over all {s['n']} texts.")
        add("")

    if "query" in wanted:
        add(f"### query: {workloads_query()!r} (7 tokens), one text per call")
        add("")
        floor = query_floor_s(ckpt, roof)
        ref = acc.get("query", {}).get("reference", "-")
        add("| engine | precision | p50 ms | p99 ms | queries/s | p50 peer / bgesmall | p50 / memory floor "
            f"| peak RSS MB | cos vs {ref} | calls |")
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        b = results.get("bgesmall", {}).get("query", {}).get("p50_s")
        for e, r in results.items():
            x = r.get("query", {})
            if "error" in x:
                add(f"| {e} | error: {x['error'].splitlines()[-1][:120]} |||||||||")
            elif "p50_s" in x:
                cos = acc.get("query", {}).get(e) or (None,)
                add(f"| {e} | {x.get('precision') or '?'} | {x['p50_s'] * 1e3:.2f} | {x['p99_s'] * 1e3:.2f} | "
                    f"{1 / x['mean_s']:.0f} | {_f(x['p50_s'] / b if b else None, '{:.2f}x')} | "
                    f"{_f(x['p50_s'] / floor if floor else None, '{:.2f}x')} | {x['rss_mb']:.0f} | "
                    f"{_f(cos[0], '{:.5f}')} | {x['n']} |")
        add("")
        if floor:
            add(f"Memory floor: a query reads every linear weight once, {ckpt.linear_weight_bytes / 1e6:.0f} MB of float32, "
                f"at best {roof.read_gbs:.1f} GB/s on this machine (numpy sgemv over that many bytes, {roof.threads} threads, "
                f"best of {len(roof.read_runs)} measurements: {', '.join(f'{g:.1f}' for _, g in roof.read_runs)}): "
                f"**{floor * 1e3:.2f} ms**. No float32 engine's p50 can go much below it; bf16 engines read half "
                "the bytes, ort-int8 a quarter.")
            add("")

    add("### start: import + load + first embedding, in a fresh process")
    add("")
    add("| engine | cold s | warm s | load s (warm) | first embedding s (warm) | RSS after first embedding MB |")
    add("|---|---:|---:|---:|---:|---:|")
    for e, r in results.items():
        c, wm = r.get("start_cold", {}), r.get("start_warm", {})
        if "error" in c or "error" in wm:
            add(f"| {e} | error: {(c.get('error') or wm.get('error')).splitlines()[-1][:120]} |||||")
            continue
        add(f"| {e} | {_start(c)} | {_start(wm)} | {wm['load_s']:.2f} | {wm['first_embed_s']:.3f} | "
            f"{wm['rss_mb']:.0f} |")
    add("")
    add("Cold: the first starts of this run (for bgesmall each with an empty NUMBA_CACHE_DIR, so every kernel "
        "compiles and the plan is measured); warm: as many processes right after (numba cache filled). Each: the "
        "median, with the range of the runs in brackets; the load, first-embedding and RSS columns are the median "
        "warm run's. The OS file cache is warm for both.")
    add("")
    add(targets(results, stats, roof, rate, ckpt))
    if "bgesmall-bf16" in results:
        add(bf16_targets(results, acc, rate))
    prof = profile_table(results, ckpt)
    if prof:
        add(prof)
    return "\n".join(L)


def workloads_query() -> str:
    import workloads

    return workloads.QUERY


def query_floor_s(ckpt, roof) -> float | None:
    """Seconds to stream the linear weights once at the best read rate measured (see roofline.py)."""
    return ckpt.linear_weight_bytes / (roof.read_gbs * 1e9) if getattr(roof, "read_gbs", 0) else None


def _start(r: dict) -> str:
    # "5.08" for one run, "5.08 (4.61-5.30)" for the median of several
    runs = r.get("start_s_runs") or []
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return f"{r['start_s']:.2f}{spread}"


def targets(results, stats, roof, rate, ckpt) -> str:
    """The exact tier's targets (issue 9: speed on every CPU), measured in this run."""
    L = ["### targets of the exact tier (issue 9), this run", "", "| target | measured | met |", "|---|---:|:---:|"]

    def row(what, value, ok, fmt):
        L.append(f"| {what} | {_f(value, fmt)} | {'n/a' if value is None else ('yes' if ok(value) else 'no')} |")

    b, o = rate("bgesmall", "corpus"), rate("ort-fp32", "corpus")
    row("corpus: bgesmall / ort-fp32 texts/s >= 1.6", b / o if b and o else None, lambda v: v >= 1.6, "{:.2f}x")
    if b and "corpus" in stats:
        ceiling = roof.gflops * 1e9 / (stats["corpus"]["flops"] / stats["corpus"]["n"])
        row("corpus: fraction of the best roofline >= 90%", 100 * b / ceiling, lambda v: v >= 90, "{:.0f}%")
    b, o = rate("bgesmall", "sts"), rate("ort-fp32", "sts")
    row("sts: bgesmall / ort-fp32 texts/s >= 1.25", b / o if b and o else None, lambda v: v >= 1.25, "{:.2f}x")
    bq = results.get("bgesmall", {}).get("query", {}).get("p50_s")
    oq = results.get("ort-fp32", {}).get("query", {}).get("p50_s")
    row("query p50: bgesmall / ort-fp32 <= 0.75", bq / oq if bq and oq else None, lambda v: v <= 0.75, "{:.2f}x")
    floor = query_floor_s(ckpt, roof)
    if oq and floor:  # whether the target is above this machine's memory floor at all
        L.append(f"| query: the target, 0.75 x ort-fp32's p50, against the memory floor ({floor * 1e3:.2f} ms) | "
                 f"{0.75 * oq / floor:.2f}x the floor | {'reachable' if 0.75 * oq >= floor else 'below the floor'} |")
    ws = results.get("bgesmall", {}).get("start_warm", {}).get("start_s")
    row("warm start (import + load + first embedding, median) <= 0.6 s", ws, lambda v: v <= 0.6, "{:.2f} s")
    cs = results.get("bgesmall", {}).get("start_cold", {}).get("start_s")
    row("cold start, empty numba cache (kernels compile, plan measured; median) <= 5 s", cs, lambda v: v <= 5.0,
        "{:.2f} s")
    rss = results.get("bgesmall", {}).get("corpus", {}).get("rss_mb")
    L.append(f"| corpus peak RSS (reported) | {_f(rss, '{:.0f} MB')} | |")
    L.append("")
    return "\n".join(L)


def bf16_targets(results, acc, rate) -> str:
    """The bf16 tier's targets (issue 10), measured in this run; its speed targets are stated for a CPU with
    AVX512_BF16 and no AMX."""
    L = ["### targets of the bf16 tier (issue 10), this run", "", "| target | measured | met |", "|---|---:|:---:|"]

    def row(what, value, ok, fmt):
        L.append(f"| {what} | {_f(value, fmt)} | {'n/a' if value is None else ('yes' if ok(value) else 'no')} |")

    ran = next((r.get("precision") for r in results["bgesmall-bf16"].values() if isinstance(r, dict)
                and r.get("precision")), None)
    L.append(f"| bgesmall-bf16 runs bf16 (Model.precision) | {ran or '?'} | {'yes' if ran == 'bf16' else 'no'} |")
    for w in ("corpus", "sts"):
        b, q = rate("bgesmall-bf16", w), rate("ort-int8", w)
        want = 1.5 if w == "corpus" else 1.0
        row(f"{w}: bgesmall-bf16 / ort-int8 texts/s >= {want}", b / q if b and q else None, lambda v, t=want: v >= t,
            "{:.2f}x")
    bq = results["bgesmall-bf16"].get("query", {}).get("p50_s")
    oq = results.get("ort-fp32", {}).get("query", {}).get("p50_s")
    row("query p50: bgesmall-bf16 / ort-fp32 <= 0.5", bq / oq if bq and oq else None, lambda v: v <= 0.5, "{:.2f}x")
    rss = results["bgesmall-bf16"].get("corpus", {}).get("rss_mb")
    row("corpus peak RSS <= 300 MB", rss, lambda v: v <= 300, "{:.0f} MB")
    for w in ("corpus", "sts"):
        cos = acc.get(w, {}).get("bgesmall-bf16")
        ref = acc.get(w, {}).get("reference", "the reference")
        row(f"{w}: min cosine to {ref} >= 0.9995", cos[0] if cos else None, lambda v: v >= 0.9995, "{:.5f}")
    L += ["", "Fidelity on both test models (STS-B Spearman, nearest neighbours): `python benchmarks/fidelity.py`.", ""]
    return "\n".join(L)


def profile_table(results, ckpt) -> str:
    """Per length-sorted batch of 32 of the corpus: where each engine spends its time."""
    runs = {e: results[e]["profile"]["batches"] for e in PROFILED
            if "batches" in results.get(e, {}).get("profile", {})}
    if not runs:
        return ""
    L = ["### profile: the corpus in length-sorted batches of 32, each timed alone (best of up to 3)", "",
         ("Each batch is one embed() call of 32 texts; ORT pads it to its longest text (padded tokens), "
          "bgesmall packs it as it chooses."), ""]
    names = list(runs)
    L.append("| batch | max len | real tokens | padded tokens | "
             + " | ".join(f"{e} ms | {e} useful GFLOP/s" for e in names) + " |")
    L.append("|---:|---:|---:|---:|" + "---:|---:|" * len(names))
    first = runs[names[0]]
    totals = {e: 0.0 for e in names}
    for i, bt in enumerate(first):
        cells = []
        for e in names:
            x = runs[e][i]
            totals[e] += x["seconds"]
            cells += [f"{x['seconds'] * 1e3:.0f}", f"{x['useful_flops'] / x['seconds'] / 1e9:.0f}"]
        L.append(f"| {i} | {bt['max_len']} | {bt['real_tokens']} | {bt['padded_tokens']} | " + " | ".join(cells) + " |")
    flops = sum(b["useful_flops"] for b in first)
    L.append("| all | | " + f"{sum(b['real_tokens'] for b in first)} | {sum(b['padded_tokens'] for b in first)} | "
             + " | ".join(f"{totals[e] * 1e3:.0f} | {flops / totals[e] / 1e9:.0f}" for e in names) + " |")
    L.append("")
    return "\n".join(L)
