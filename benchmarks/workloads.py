"""The three workloads every engine runs: the same texts, in the same order.

corpus   500 paragraphs of CPython's language reference (pydoc_data.topics). Rule: every topic in sorted
         order, split on blank lines, stripped, keep the paragraphs of >= 4 whitespace-separated words,
         then random.Random(0).sample(500) kept in document order. On CPython 3.11 with the BGE vocab this
         gives mean 52.7 tokens, median 39, p90 98, max 512 (truncated); the issue's corpus was mean 52,
         median 38, p90 102, max 512. Other CPython versions ship other text: the stats are printed each run.
sts      the 3,000 sentences of STS-B dev (shared/data/stsb-dev.tsv, columns 8 and 9), mean ~14.5 tokens.
query    one short query of 7 tokens incl. [CLS] and [SEP], embedded alone, many times (latency).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from checkpoint import BENCH_DIR

QUERY = "how do python generators work"  # [CLS] how do python generators work [SEP] -> 7 tokens (BGE vocab)
CORPUS_SIZE = 500
MIN_WORDS = 4
SEED = 0


@dataclass(frozen=True)
class Workload:
    name: str
    texts: list[str]
    what: str  # one line for the table heading


def corpus_paragraphs(n: int = CORPUS_SIZE) -> list[str]:
    from pydoc_data.topics import topics

    paras = [
        p.strip()
        for key in sorted(topics)
        for p in re.split(r"\n\s*\n", topics[key])
        if len(p.split()) >= MIN_WORDS
    ]
    keep = sorted(random.Random(SEED).sample(range(len(paras)), min(n, len(paras))))
    return [paras[i] for i in keep]


def default_stsb_path() -> Path:
    """$BGESMALL_SHARED or --shared; else /work/shared, else ../shared beside the repo (CI clones)."""
    env = os.environ.get("BGESMALL_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [BENCH_DIR.parent.parent / "shared", Path("/work/shared")]
    for c in candidates:
        if (c / "data" / "stsb-dev.tsv").is_file():
            return c / "data" / "stsb-dev.tsv"
    return candidates[0] / "data" / "stsb-dev.tsv"


def stsb_rows(path: Path) -> list[list[str]]:
    """STS-B dev's rows, split on tabs: sentence 1, sentence 2 and the human score are columns 8, 9 and 10."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --shared DIR (the folder holding data/stsb-dev.tsv) "
                                "or set BGESMALL_SHARED")
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def stsb_sentences(path: Path) -> list[str]:  # [s1 of pair 0, s2 of pair 0, s1 of pair 1, ...]
    return [s for cols in stsb_rows(path) if len(cols) >= 9 for s in cols[7:9]]


def stsb_pairs(path: Path) -> tuple[list[str], list[str], list[float]]:
    """(first sentences, second sentences, human scores 0-5) of the pairs that have a score."""
    rows = [cols for cols in stsb_rows(path) if len(cols) >= 10]
    return [c[7] for c in rows], [c[8] for c in rows], [float(c[9]) for c in rows]


def build(quick: bool, stsb: Path) -> dict[str, Workload]:
    corpus = corpus_paragraphs()
    sts = stsb_sentences(stsb)
    if quick:  # every 5th corpus paragraph (keeps the length mix, incl. the longest one) and every 5th sentence
        longest = max(range(len(corpus)), key=lambda i: len(corpus[i]))
        corpus = [t for i, t in enumerate(corpus) if i % 5 == 0 or i == longest]
        sts = sts[::5]
    return {
        "corpus": Workload("corpus", corpus, f"{len(corpus)} paragraphs of the CPython language reference"),
        "sts": Workload("sts", sts, f"{len(sts)} short sentences of STS-B dev"),
        "query": Workload("query", [QUERY], f"one {QUERY!r} query, embedded alone"),
    }
