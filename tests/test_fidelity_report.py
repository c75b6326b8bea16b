"""benchmarks/fidelity.py, the bf16 fidelity report: its measures, its table, and its refusal where bf16 cannot run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    import fidelity
finally:
    sys.path.pop(0)


def test_ranks_average_ties_as_scipy_does():
    v = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    assert np.array_equal(fidelity.ranks(v), [4.5, 1.5, 6, 1.5, 8, 11, 3, 10, 8, 4.5, 8])
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(0).integers(0, 20, 300).astype(float)  # many ties
    y = x + np.random.default_rng(1).normal(0, 5, 300)
    assert fidelity.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_neighbour_agreement_counts_shared_neighbours():
    v = np.random.default_rng(0).normal(size=(40, 8))
    assert fidelity.neighbour_agreement(v, v) == 1.0
    other = np.random.default_rng(1).normal(size=(40, 8))
    assert fidelity.neighbour_agreement(v, other) < 0.6  # unrelated vectors share few neighbours
    assert 1 not in fidelity.nearest(v)[1]  # a row is never its own neighbour


def test_table_marks_each_target():
    rows = [fidelity.TextsFidelity("corpus", 500, 0.9999, 0.99995, 1e-3), fidelity.TextsFidelity("sts", 3000, 0.9990,
                                                                                                   0.9999, 2e-3)]
    res = fidelity.ModelFidelity("minilm", "/x", {"fp32": "fp32", "bf16": "bf16"}, rows,
                                 {"fp32": 0.81030, "bf16": 0.80900}, 0.99)
    cpu = {"cpu": "Test CPU", "cpu_number": "family 0", "cores": 2, "isa": ["avx512_bf16"], "isa_absent": []}
    text = fidelity.render([res], cpu, [])
    assert "| min cosine to exact >= 0.9995, all texts | 0.999000 **no** |" in text
    assert "| STS-B Spearman within 0.002 of exact | 0.00130 yes |" in text
    assert "| agreement@10 >= 0.98 | 0.9900 yes |" in text
    assert "0.81030 / 0.80900 (-0.00130)" in text and "Test CPU" in text


def test_refuses_to_report_when_bf16_runs_the_exact_tier(monkeypatch, capsys):
    if not fidelity.workloads.default_stsb_path().is_file():
        pytest.skip("STS-B dev is not in the shared data folder (set BGESMALL_SHARED)")
    monkeypatch.setattr("bgesmall.kernels.matmul.HAS_BF16", False)  # as on a CPU without AVX512_BF16
    monkeypatch.setattr("bgesmall.precision._warned", False)  # so that its one warning is given again
    assert fidelity.main(["--models", "minilm"]) == 1
    out = capsys.readouterr()
    assert out.out == ""  # no table of identical numbers
    assert "bf16 did not run on this CPU" in out.err and "Model.precision is 'fp32'" in out.err
