"""Threads: one pool, owned by bgesmall, never two fighting over the cores.

The engine runs data-parallel: each worker thread takes whole batches and runs them single-threaded (BLAS
at one thread, numba kernels serial, the GIL released in both). Nothing waits at a barrier after every
layer, so no thread spins while another is descheduled: on a busy or small machine a fork-join design
(multi-threaded BLAS followed by a parallel numba region, 8 times per layer) loses most of its time there.
For that, BLAS must run at one thread while bgesmall works; `single_threaded_blas` arranges it with
numpy's own OpenBLAS (through threadpoolctl when it is installed, else its C entry point) and restores the
previous setting afterwards. Where the BLAS cannot be controlled, bgesmall uses one worker.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from contextlib import contextmanager
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
# alone, each product's column panels are dealt to `threads` threads inside one numba parallel region
# (kernels/matmul.py, linear_split). That needs a threading layer that wakes its threads in microseconds and
# may be entered from any thread: OpenMP or TBB. numba falls back to its own `workqueue` where neither is
# installed; that one costs more per region than the split saves (measured: 48 products of a 7-token query
# in 7.3 ms split against 5.0 ms on one thread) and must not be entered from two threads at once, so there a
# query stays on one thread. One split pass at a time: a second concurrent query runs on its own thread
# rather than oversubscribe the cores. A child forked after the layer started never uses it (GNU OpenMP is
# not fork-safe).

_split_state = {"usable": None}  # None: not probed yet in this process
_split_lock = threading.Lock()


def _probe_split() -> bool:
    import numba

    from .kernels import linear_split, pack_columns

    x = np.zeros((1, 1), dtype=np.float32)
    linear_split(x, pack_columns(np.zeros((1, 64), dtype=np.float32)), np.empty((1, 64), dtype=np.float32), 2)
    return numba.threading_layer() in ("omp", "tbb") and numba.get_num_threads() > 1


def _forget_split_in_child():
    if _split_state["usable"]:
        _split_state["usable"] = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_split_in_child)


@contextmanager
def split_pass(threads: int):
    """Yields how many threads this pass's matrix products may share: `threads` when splitting is on, else 1."""
    if threads > 1 and _split_lock.acquire(blocking=False):
        try:
            if _split_state["usable"] is None:
                _split_state["usable"] = _probe_split()
            if _split_state["usable"]:
                import numba

                yield min(threads, numba.get_num_threads())
                return
        finally:
            _split_lock.release()
    yield 1
