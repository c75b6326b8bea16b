"""Threads: one pool, owned by bgesmall, never two fighting over the cores.

The engine runs data-parallel: each worker thread takes whole batches and runs them single-threaded (BLAS
at one thread, numba kernels serial, the GIL released in both). Nothing waits at a barrier after every
layer, so no thread spins while another is descheduled: on a busy or small machine a fork-join design
(multi-threaded BLAS followed by a parallel numba region, 8 times per layer) loses most of its time there.
The one exception is a pass that is a single batch (a query) while nothing else runs: see the end of this file.
For that, BLAS must run at one thread while bgesmall works; `single_threaded_blas` arranges it with
numpy's own OpenBLAS (through threadpoolctl when it is installed, else its C entry point) and restores the
previous setting afterwards. Where the BLAS cannot be controlled, bgesmall uses one worker.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ENV_THREADS = "BGESMALL_NUM_THREADS"


def default_workers() -> int:
    env = os.environ.get(ENV_THREADS)
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"{ENV_THREADS}={env!r} is not a whole number of threads: unset it or set e.g. 2") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def usable_workers(threads: int) -> int:
    """The worker threads a model can use: data-parallel workers need BLAS held at one thread, so where it
    cannot be controlled, one worker."""
    return threads if blas().controllable else 1


class _OpenBLAS:
    """set/get_num_threads of the OpenBLAS that numpy loaded, or None when there is none to find."""

    SYMBOLS = [
        ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
        ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
        ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
        ("openblas_set_num_threads", "openblas_get_num_threads"),
    ]

    def __init__(self):
        self.set = self.get = None
        numpy_dir = Path(np.__file__).parent
        candidates = glob.glob(str(numpy_dir / ".." / "numpy.libs" / "*openblas*")) + glob.glob(
            str(numpy_dir / ".dylibs" / "*openblas*")
        )
        for path in candidates:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for set_name, get_name in self.SYMBOLS:
                if hasattr(lib, set_name) and hasattr(lib, get_name):
                    self.set, self.get = getattr(lib, set_name), getattr(lib, get_name)
                    self.set.argtypes, self.get.restype = [ctypes.c_int], ctypes.c_int
                    return


class BlasThreads:
    """Holds numpy's BLAS at one thread while any bgesmall forward pass runs (nesting-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None
        self._limiter = None
        self._ctl = None
        try:
            import threadpoolctl  # optional: it knows every BLAS numpy may be built with

            self._ctl = threadpoolctl.ThreadpoolController()
            self.controllable = bool(self._ctl.select(user_api="blas").lib_controllers)
        except ImportError:
            self._blas = _OpenBLAS()
            self.controllable = self._blas.set is not None

    def acquire(self):
        with self._lock:
            self._users += 1
            if self._users == 1 and self.controllable:
                if self._ctl is not None:
                    self._limiter = self._ctl.limit(limits=1, user_api="blas")
                else:
                    self._saved = self._blas.get()
                    self._blas.set(1)

    def release(self):
        with self._lock:
            self._users -= 1
            if self._users == 0 and self.controllable:
                if self._limiter is not None:
                    self._limiter.restore_original_limits()
                    self._limiter = None
                elif self._saved is not None:
                    self._blas.set(self._saved)


_blas = None
_blas_lock = threading.Lock()


def blas() -> BlasThreads:
    global _blas
    with _blas_lock:
        if _blas is None:
            _blas = BlasThreads()
        return _blas


@contextmanager
def single_threaded_blas():
    b = blas()
    b.acquire()
    try:
        yield
    finally:
        b.release()


# -- one small pass (a query) split over the cores ---------------------------------------------------------
#
# A query has one batch, so the data-parallel workers leave every core but one idle, and its matrix products
# are streams of the whole weight matrix (85 MB for bge-small) that one core cannot read fast enough. For it
# alone, each product's column panels are dealt to the cores inside one numba parallel region (kernels/matmul.py,
# linear_split). The rules, each from a measurement or a failure:
# - Only when no other bgesmall pass is running: beside a running batch, a split query waited for the busy core
#   at every product (7.2 ms against 4.8 ms unsplit).
# - Only on numba's OpenMP or TBB layer, which wake their threads in microseconds (a region costs 1.9 us here).
#   numba's built-in `workqueue` costs more per region than the split saves (7.3 against 5.0 ms for a query's
#   48 products) and may not be entered from two threads at once.
# - Always from one thread, owned here: OpenMP keeps a team of threads per calling thread, so splitting from
#   whatever thread called embed() would leave a team behind for each of them.
# - Never in a child forked after the threading layer started (GNU OpenMP kills such a child on its first
#   region). The layer starts at the first split, not at import: linear_split compiles on first use.

_split_state = {"usable": None, "executor": None}  # usable None: not probed yet in this process
_split_init = threading.Lock()
_passes = 0  # bgesmall forward passes running now, in any thread
_passes_lock = threading.Lock()


@contextmanager
def engine_pass():
    """Marks a forward pass as running; yields whether no other was (only then may a query split)."""
    global _passes
    with _passes_lock:
        alone = _passes == 0
        _passes += 1
    try:
        yield alone
    finally:
        with _passes_lock:
            _passes -= 1


# `parts` for a pass that would split but runs on one thread (SplitGuard below): the split's own tiles there
# (bit-identical to it, panel by panel; bgesmall/linear.py), not the plan's choice for its rows, so that whether
# a query split never changes a single number (a resumed job equals an uninterrupted one bit for bit)
ONE_CORE_SPLIT = 0


class SplitGuard:
    """Whether a small pass should split now, from how the last passes of its size went.

    A split pass waits for every thread of its team at each of its 48 products, so when another process holds
    a core, it waits for that core each time: measured on a 2-core AMD EPYC (Zen 3) beside two niced background
    jobs, a 7-token query took 138-242 ms at the median split against 26 ms on one thread (11-14 ms quiet).
    So, per size (tokens, in powers of two): the fastest split pass seen is the quiet estimate. A split pass
    SUSPECT times slower than it has the next pass run on one thread, for comparison, unless one ran in the
    last FRESH passes. A split pass MARGIN times slower than those recent one-thread passes (or, with none that
    recent, SLOW times the estimate) is a strike; after STRIKES in a row, the passes of that size run on one
    thread for the next REST passes, then a split is tried again. Quiet, every pass splits; the results are the
    same either way (the same tiles, panel by panel). The margin and the three strikes keep a quiet machine's
    noise from sending queries to one core: on a 2-core AMD EPYC Zen 5, 7-token queries, split p50 2.5-2.9 ms and
    one thread 3.3-3.5 ms, 6-12% of split passes are slower than the one-thread median (2% than 1.25x it); with
    no margin and two strikes, 10-40% of the passes of a 300-query run went to one core (replaying measured
    times: 3-5% with these)."""

    SUSPECT = 1.5
    MARGIN = 1.25
    FRESH = 16
    SLOW = 2.5
    STRIKES = 3
    REST = 64

    @dataclass
    class _Size:
        fastest_split: float = float("inf")
        strikes: int = 0
        rest: int = 0  # passes left to run on one thread
        compare: bool = False  # the next pass runs on one thread, to compare
        single: list = field(default_factory=list)  # the last few one-thread times
        since_single: int = 0  # split passes since the last one-thread pass

    def __init__(self):
        self._lock = threading.Lock()
        self._sizes: dict[int, SplitGuard._Size] = {}

    def _size(self, tokens: int) -> "SplitGuard._Size":
        return self._sizes.setdefault(max(int(tokens), 1).bit_length(), SplitGuard._Size())

    def split_now(self, tokens: int) -> bool:
        with self._lock:
            size = self._size(tokens)
            if size.rest > 0:
                size.rest -= 1
                return False
            if size.compare:
                size.compare = False
                return False
            return True

    def record(self, tokens: int, seconds: float, split: bool = True) -> None:
        """The time of a pass of this many tokens, split or on one thread."""
        with self._lock:
            size = self._size(tokens)
            if not split:
                size.single, size.since_single = (size.single + [seconds])[-5:], 0
                return
            size.since_single += 1
            fresh = bool(size.single) and size.since_single < self.FRESH
            if fresh:
                slow = seconds > self.MARGIN * sorted(size.single)[len(size.single) // 2]
            else:
                slow = seconds > self.SLOW * size.fastest_split
            size.compare = not fresh and seconds > self.SUSPECT * size.fastest_split
            size.strikes = size.strikes + 1 if slow else 0
            if size.strikes >= self.STRIKES:
                size.strikes, size.rest, size.compare = 0, self.REST, False
            size.fastest_split = min(size.fastest_split, seconds)


def run_small_pass(threads: int, forward, tokens: int = 0, guard: SplitGuard | None = None):
    """forward(parts) for a pass that is a single batch of `tokens` tokens: on the split thread with its products
    shared by up to `threads` threads when the rules above allow; where a split could run but another pass is
    running or `guard` keeps it on one thread, forward(ONE_CORE_SPLIT) in the calling thread (the same numbers
    as the split); where none can run (one thread, no usable threading layer), forward(1) there."""
    with engine_pass() as alone:
        executor = _split_executor() if threads > 1 else None
        if executor is None:
            return forward(1)
        if not alone:  # beside a running batch: on this thread, with the split's kernels (the same numbers)
            return forward(ONE_CORE_SPLIT)
        split = guard is None or guard.split_now(tokens)
        start = time.perf_counter()
        result = executor.submit(_split_forward, forward, threads).result() if split else forward(ONE_CORE_SPLIT)
        if guard is not None:
            guard.record(tokens, time.perf_counter() - start, split)
        return result


def on_split_thread(fn, threads: int):
    """fn(parts) on the split thread, its team sized as for a query (for the planner, bgesmall/tune.py); None
    where queries cannot split (one thread, or no usable threading layer)."""
    executor = _split_executor() if threads > 1 else None
    if executor is None:
        return None
    return executor.submit(_split_forward, fn, threads).result()


def _split_forward(forward, threads: int):
    import numba

    parts = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(parts)  # the team for this thread's regions: `parts` threads, not every core
    return forward(parts)


def _split_executor():
    with _split_init:
        if _split_state["usable"] is None:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(1, thread_name_prefix="bgesmall-split")
            usable = executor.submit(_probe_split).result()
            _split_state.update(usable=usable, executor=executor if usable else None)
            if not usable:
                executor.shutdown(wait=False)
        return _split_state["executor"]


def _probe_split() -> bool:
    import numba

    from .kernels import linear_split, pack_columns

    if numba.config.NUMBA_NUM_THREADS < 2:
        return False
    x = np.zeros((1, 1), dtype=np.float32)
    try:  # e.g. NUMBA_THREADING_LAYER names a layer that is not installed: numba raises at the first region
        linear_split(x, pack_columns(np.zeros((1, 64), dtype=np.float32)), np.empty((1, 64), dtype=np.float32), 2)
    except Exception as e:  # noqa: BLE001 - a query must still be answered, on one thread
        warnings.warn(f"bgesmall: queries will run on one thread: numba's threading layer failed ({str(e).splitlines()[0]})", stacklevel=2)
        return False
    return numba.threading_layer() in ("omp", "tbb")


def _after_fork_in_child():
    global _passes
    _passes = 0  # the parent's running passes are not this process's
    try:
        from numba.np.ufunc import parallel

        started = parallel._is_initialized
    except (ImportError, AttributeError):  # cannot tell: assume it started
        started = True
    if started or _split_state["executor"] is not None:
        _split_state.update(usable=False, executor=None)  # the split thread did not survive the fork anyway


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
