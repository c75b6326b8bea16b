"""The fuzz harnesses (tests/fuzz/) in the normal test run: every input that ever failed, kept under
tests/fuzz/corpus/<harness>/, is replayed through the harness's own check; and each harness runs under atheris
for a short fixed time (BGESMALL_FUZZ_SECONDS, default 5), which the long recorded runs extend
(tests/fuzz/README.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
sys.path.insert(0, str(FUZZ))
HARNESSES = ["fuzz_text", "fuzz_server", "fuzz_load"]
SECONDS = int(os.environ.get("BGESMALL_FUZZ_SECONDS", "5"))


def corpus(harness: str) -> list[Path]:
    return sorted((FUZZ / "corpus" / harness).glob("*"))


@pytest.mark.parametrize("harness", HARNESSES)
def test_regression_corpus_replays_clean(harness):
    if harness == "fuzz_server":
        import fastapi  # noqa: F401  (the test extra installs it: missing, this fails rather than skips)
    module = __import__(harness)
    inputs = corpus(harness)
    assert inputs, f"tests/fuzz/corpus/{harness}/ is empty"
    for path in inputs:
        module.one_input(path.read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_under_atheris(harness, tmp_path):
    import atheris  # noqa: F401  (the test extra installs it: missing, this fails rather than skips)
    if harness == "fuzz_server":
        import fastapi  # noqa: F401  (the test extra installs it: missing, this fails rather than skips)
    work = tmp_path / "corpus"
    work.mkdir()
    for path in corpus(harness):  # start from the regression corpus; new inputs go to the temp copy
        (work / path.name).write_bytes(path.read_bytes())
    proc = subprocess.run([sys.executable, str(FUZZ / f"{harness}.py"), f"-max_total_time={SECONDS}", "-timeout=60",
                           "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/", str(work)],
                          capture_output=True, text=True, timeout=SECONDS + 300, cwd=tmp_path)
    found = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(p.name for p in tmp_path.glob("timeout-*"))
    assert proc.returncode == 0 and not found, (found, proc.stderr[-4000:])
    runs = re.findall(r"Done (\d+) runs", proc.stderr)
    assert runs and int(runs[-1]) > 0, proc.stderr[-2000:]
    print(f"{harness}: {runs[-1]} executions in {SECONDS} s, no crash")


def test_regression_corpus_reaches_every_entry_point():
    # fuzz_text and fuzz_load send each input to one entry point (or one replaced file), chosen by its first byte:
    # the regression corpus holds at least one input for each
    import fuzz_load
    import fuzz_text

    text = {fuzz_text.op_of(p.read_bytes()[0]) for p in corpus("fuzz_text") if p.read_bytes()}
    assert text == set(fuzz_text.OPS), sorted(set(fuzz_text.OPS) - text)
    load = {fuzz_load.TARGETS[p.read_bytes()[0] % len(fuzz_load.TARGETS)] for p in corpus("fuzz_load") if p.read_bytes()}
    assert load == set(fuzz_load.TARGETS), sorted(set(fuzz_load.TARGETS) - load)
