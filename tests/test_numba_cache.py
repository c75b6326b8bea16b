"""A corrupt or unwritable numba cache costs a slower start, never a failure: the kernels compile in memory,
the embeddings are the same, and the process says so once.

Each case runs a copy of the package in a subprocess (so that the kernels are compiled there, under that
cache), with the copy's in-tree cache, $HOME and $NUMBA_CACHE_DIR set up for the case. The process runs as
whoever runs the tests, root included, so "unwritable" is made with paths that pass through a regular file,
which no one can create a folder in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bgesmall
import bgesmall.kernels

pytestmark = pytest.mark.slow  # each case compiles every kernel in a fresh process: ~30 s

TEXTS = ["A corrupt cache must not change a single number.", "hello"]
WARNING = "numba's kernel cache cannot be used"

CHILD = """
import json, sys
import bgesmall
import bgesmall.kernels
assert bgesmall.__file__.startswith(sys.argv[1]), bgesmall.__file__
model = bgesmall.load(sys.argv[2])
print(json.dumps(model.embed(json.loads(sys.argv[3])).tolist()))
"""


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    """bgesmall and its kernels laid out as an installed package, with the kernels' in-tree numba cache (if
    the test process made one) copied along, modification times kept so that it stays valid."""
    root = tmp_path_factory.mktemp("pkg")
    src = Path(bgesmall.__file__).parent
    shutil.copytree(src, root / "bgesmall", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(root / "bgesmall" / "kernels", ignore_errors=True)
    shutil.copytree(Path(bgesmall.kernels.__file__).parent, root / "bgesmall" / "kernels",
                    ignore=shutil.ignore_patterns("*.pyc"), copy_function=shutil.copy2)
    return root


def run_child(package: Path, model_dir: Path, env: dict[str, str]) -> tuple[np.ndarray, str]:
    child_env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH", "XDG_CACHE_HOME")}
    child_env.update(env, PYTHONPATH=str(package))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(package), str(model_dir), json.dumps(TEXTS)],
                          capture_output=True, text=True, env=child_env, timeout=600, cwd=package)
    assert proc.returncode == 0, proc.stderr
    return np.array(json.loads(proc.stdout.splitlines()[-1]), dtype=np.float32), proc.stderr


def test_good_then_corrupt_then_unwritable_cache(package_copy, minilm, minilm_dir, tmp_path):
    expected = minilm.embed(TEXTS)
    cache = package_copy / "bgesmall" / "kernels" / "__pycache__"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")

    # 1. A good cache (copied, or written now by the child): no warning.
    vectors, stderr = run_child(package_copy, minilm_dir, {"HOME": str(tmp_path)})
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert WARNING not in stderr, stderr
    cached = sorted(cache.glob("*.nb[ic]"))
    assert cached, "the child wrote no in-tree cache"

    # 2. Every index and data file overwritten with garbage (as a crash mid-write or a bad disk leaves them).
    for f in cached:
        f.write_bytes(b"\x80\x04garbage, not a pickle" * 3)
    vectors, stderr = run_child(package_copy, minilm_dir, {"HOME": str(tmp_path)})
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert stderr.count(WARNING) == 1, stderr

    # 3. No writable cache anywhere: the in-tree folder, $HOME/.cache and NUMBA_CACHE_DIR all pass through a file.
    shutil.rmtree(cache)
    cache.write_text("a file where numba wants its folder\n")
    vectors, stderr = run_child(package_copy, minilm_dir,
                                {"HOME": str(blocker), "NUMBA_CACHE_DIR": str(blocker / "numba")})
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert stderr.count(WARNING) == 1, stderr


def _indexes(cache: Path, module: str) -> list[str]:
    return sorted(p.name for p in cache.glob(f"{module}.*.nbi"))


def test_a_cold_start_compiles_the_linear_kernels_in_a_second_process(package_copy, minilm, minilm_dir, tmp_path):
    # kernels/compile_ahead.py: with an empty cache, a child compiles its share of the kernels (the linear layers',
    # linear_split included, which the parent itself only compiles at a query's first split), while the parent
    # compiles the rest; the parent joins it at the first call of a kernel of its share
    cache = tmp_path / "numba-cache"
    code = ("import bgesmall.kernels as k, glob, sys; assert type(k.residual_layernorm).__name__ == '_FirstCallKernel'; "
            "k.compile_ahead.join(); "
            "print(len(glob.glob(sys.argv[1] + '/**/matmul.linear_split-*.nbi', recursive=True)))")
    child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BGESMALL_COMPILE_AHEAD")}
    child_env.update(PYTHONPATH=str(package_copy), NUMBA_CACHE_DIR=str(cache), BGESMALL_COMPILE_AHEAD="1")  # whatever the load
    proc = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True, env=child_env,
                          timeout=600, cwd=package_copy)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1"], proc.stdout + proc.stderr
    # and the kernels it left are the ones that run: same vectors from a process that loads them all
    vectors, stderr = run_child(package_copy, minilm_dir, {"NUMBA_CACHE_DIR": str(cache)})
    np.testing.assert_allclose(vectors, minilm.embed(TEXTS), atol=1e-6)
    assert WARNING not in stderr, stderr


def test_the_compile_ahead_child_compiles_only_its_share(package_copy, tmp_path):
    cache = tmp_path / "numba-cache"
    from bgesmall.kernels import compile_ahead

    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.update({"PYTHONPATH": str(package_copy), "NUMBA_CACHE_DIR": str(cache),
                      compile_ahead.CHILD_ENV: ",".join(compile_ahead.CHILD_KERNELS)})
    code = compile_ahead.CHILD_COMPILE + ("\nimport bgesmall.kernels as k; print(type(k.softmax_rows).__name__)"
                                       "\nprint(any(m.startswith('scipy.') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # softmax_rows is not in the child's share: not compiled there; nor did numba's look for BLAS import scipy
    assert proc.stdout.split() == ["_FirstCallKernel", "False"]
    written = {p.name.split("-")[0] for p in cache.rglob("*.nbi")}
    assert written == set(compile_ahead.CHILD_KERNELS), written
    # the child as begin() starts it ends with os._exit: still a clean exit, here from the cache just written
    proc = subprocess.run([sys.executable, "-c", compile_ahead.CHILD_CODE], capture_output=True, text=True,
                          env=child_env, timeout=600)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


def test_no_compile_ahead_child_when_the_cache_is_warm_or_it_is_switched_off(monkeypatch):
    from bgesmall.kernels import compile_ahead

    compile_ahead.join()  # a child this process started (its cache was cold) has written its share
    assert compile_ahead.start() is None  # this process imported the kernels: the child's share is in the cache
    monkeypatch.setattr(compile_ahead, "_cached", lambda cache_dir: False)  # as if the cache were empty
    monkeypatch.setattr(compile_ahead, "busy_cores", lambda cores, **kw: float(cores))  # every core busy
    assert compile_ahead.start() is None
    monkeypatch.setattr(compile_ahead, "busy_cores", lambda cores, **kw: 0.0)
    monkeypatch.setenv(compile_ahead.SWITCH_ENV, "0")
    assert compile_ahead.start() is None


def test_busy_cores_sees_a_spinning_process_at_once():
    # /proc/stat over a tenth of a second, not the load average, which would still be near 0 a moment after this
    # starts (and, after a heavy job ends, stays high for a minute)
    from bgesmall.kernels import compile_ahead

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this system: busy_cores falls back to the load average")
    try:
        quota = Path("/sys/fs/cgroup/cpu.max").read_text().split()[0]
    except OSError:
        quota = "max"
    if quota != "max":
        pytest.skip(f"a CPU quota ({quota}) applies: spinning processes may not fill the CPUs measured")
    cores = len(os.sched_getaffinity(0))
    before = compile_ahead.busy_cores(cores)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        during = compile_ahead.busy_cores(cores, window_s=0.3)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert during > cores - 0.5, (before, during)
    assert 0.0 <= before <= cores


def test_busy_cores_since_a_snapshot_leaves_out_this_process_own_work():
    # start() measures over its own import of numba instead of sleeping: that import must not count as load
    from bgesmall.kernels import compile_ahead

    if compile_ahead.cpu_snapshot() is None:
        pytest.skip("no /proc/stat on this system: busy_cores falls back to the load average")
    cores = len(os.sched_getaffinity(0))
    first = compile_ahead.cpu_snapshot()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.3:  # this process: one core busy
        pass
    working = compile_ahead.busy_cores(cores, since=first)
    idle = compile_ahead.busy_cores(cores, window_s=0.3)  # nothing of this process runs
    assert working < idle + 0.6, (working, idle)  # counted, its own spin would add a whole core


def test_a_compile_ahead_child_that_hangs_is_stopped_and_one_that_fails_is_ignored(monkeypatch):
    import time

    from bgesmall.kernels import compile_ahead

    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    hung.started = time.monotonic() - 4  # this process spent 4 s on its own share: it waits 2 s + 1 s more
    started = time.monotonic()
    compile_ahead.wait(hung)
    assert 2 < time.monotonic() - started < 10 and hung.poll() is not None
    monkeypatch.setattr(compile_ahead, "TIMEOUT_S", 0.5)  # and never longer than TIMEOUT_S
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    hung.started = time.monotonic() - 100
    started = time.monotonic()
    compile_ahead.wait(hung)
    assert time.monotonic() - started < 5 and hung.poll() is not None
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    compile_ahead.wait(failed)  # returns: this process compiles what the child did not
    assert failed.returncode == 3


def test_a_kernel_deferred_in_the_compile_ahead_child_still_runs_when_called(package_copy, tmp_path):
    # in the child, other modules' kernels are deferred; one called there compiles and runs (it used to recurse)
    from bgesmall.kernels import compile_ahead

    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.update({"PYTHONPATH": str(package_copy), "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),
                      compile_ahead.CHILD_ENV: ",".join(compile_ahead.CHILD_KERNELS)})
    code = ("import numpy as np, bgesmall.kernels as k; x = np.zeros((1, 1, 4), np.float32); "
            "k.softmax_rows(x, np.float32(1.0)); print(type(k.softmax_rows).__name__, float(x[0, 0, 0]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=600,
                          cwd=package_copy)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["_FirstCallKernel", "0.25"]  # softmax of four equal scores


@pytest.mark.slow
def test_a_change_to_any_kernel_source_invalidates_every_cached_kernel(package_copy, minilm_dir, tmp_path):
    # matmul.py's kernels are built from simd.py's vector operations: a change there alone must recompile them
    # (numba's own stamp is a hash of the kernel's own file only)
    from bgesmall.kernels.compile_ahead import _index_stamp

    package = tmp_path / "pkg"
    shutil.copytree(package_copy, package, copy_function=shutil.copy2)
    shutil.rmtree(package / "bgesmall" / "kernels" / "__pycache__", ignore_errors=True)
    cache = tmp_path / "cache"
    env = {"NUMBA_CACHE_DIR": str(cache), "BGESMALL_COMPILE_AHEAD": "0", "BGESMALL_PLAN": "default"}
    first, _ = run_child(package, minilm_dir, env)
    [index] = cache.rglob("matmul.linear_panels-*.nbi")
    before = _index_stamp(str(index))
    simd = package / "bgesmall" / "kernels" / "simd.py"
    simd.write_text(simd.read_text() + "\n# a changed helper file\n")
    again, _ = run_child(package, minilm_dir, env)
    assert _index_stamp(str(index)) not in (None, before)  # recompiled, and stamped anew
    np.testing.assert_array_equal(again, first)


def test_a_helper_compiles_to_ir_its_kernels_link_in_and_no_machine_code_of_its_own():
    # kernels/jit.py, _LinkOnlyLibrary: the helpers' own module optimization and machine code were 0.8-0.9 s of a
    # cold start; a numba whose internals moved falls back to its own pipeline, which this test would report
    import numba

    from bgesmall.kernels import jit

    assert jit._helper_pipeline() is jit._HelperCompiler, "numba's internals moved: helpers get machine code again"

    @jit.helper()
    def scaled(x, k):
        if x > 100.0:
            raise ValueError("too big", x)  # a value known at run time: the helper's environment pointer is read
        return x * k

    scaled.compile("f8(f8, f8)")  # as a kernel's typing of a call compiles it
    (library,) = [cres.library for cres in scaled.overloads.values()]
    assert isinstance(library, jit._LinkOnlyLibrary)
    names = [fn.name for fn in library.get_defined_functions()]
    assert names and not any(library._codegen._engine.is_symbol_defined(n) for n in names)  # never given to the JIT

    @numba.njit(nogil=True, pipeline_class=jit._KernelCompiler)  # as jit.kernel compiles, without the disk cache
    def total(a):
        s = 0.0
        for i in range(a.size):
            s += scaled(a[i], 3.0)
        return s

    assert total(np.arange(5, dtype=np.float64)) == 30.0  # the kernel runs the helper's linked-in copy
    with pytest.raises(ValueError, match="too big"):  # not "missing Environment": the kernel filled the helper's
        total(np.array([1.0, 101.0]))
    assert scaled(2.0, 4.0) == 8.0  # a Python call: the twin, which has machine code and a wrapper
    with pytest.raises(ValueError, match="too big"):
        scaled(200.0, 1.0)
    assert len(scaled.overloads) == 1  # the kernel used the overload compiled above
