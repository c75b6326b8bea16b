"""The one decorator policy for every kernel in this package (see `__init__.py`)."""

import threading
import warnings

import numba
from numba.core.caching import FunctionCache, NullCache

# Pure arithmetic leaves may reassociate and contract (FMA); nothing here assumes no NaN or no inf.
ARITH_FLAGS = {"contract", "reassoc", "arcp", "afn"}


def kernel(signature, *, fastmath=False):
    # error_model="numpy": a float division by zero gives inf as in C, instead of Python's ZeroDivisionError,
    # whose check on every division keeps LLVM from vectorizing a loop that divides.
    def decorate(fn):
        disp = cached_njit(fn, nogil=True, fastmath=fastmath, error_model="numpy")
        compile_from_cache(disp, signature)
        return disp

    return decorate


def compile_from_cache(disp, signature) -> None:
    """disp.compile(signature) and no other signature after it, as numba.njit(signature) does, except that a
    kernel found in numba's cache is loaded without first "refreshing" numba's target context.

    That refresh imports every typing and lowering registry numba has (its random, datetime and cffi support
    among them): 0.3-0.6 s, most of a warm start, and nothing a cached kernel needs, since its machine code is
    complete. On a cache miss the compiler refreshes by itself (numba/core/compiler.py). Where numba's cache
    internals are not as expected, this is plain numba.njit(signature)."""
    from numba.core import typeinfer

    cache = getattr(disp, "_cache", None)
    load = getattr(cache, "_load_overload", None)
    guard = getattr(cache, "_guard_against_spurious_io_errors", None)
    if load is not None and guard is not None and callable(getattr(cache, "load_overload", None)):
        def load_overload(sig, target_context):
            from numba.core.runtime import rtsys

            rtsys.initialize(target_context)  # the one part of the refresh that loaded code needs: NRT's symbols
            try:
                with guard():
                    return load(sig, target_context)
            except Exception as exc:  # a corrupt or unreadable cache file: compile instead (see _GuardedCache)
                _warn_once(exc)
            return None  # the guard swallowed an I/O error: compile instead

        cache.load_overload = load_overload  # this dispatcher's cache only; removed again below
    try:
        with typeinfer.register_dispatcher(disp):
            disp.compile(signature)
    finally:
        cache.__dict__.pop("load_overload", None)
    disp.disable_compile()


def inner(*, fastmath=False):
    """A function called only from kernels (a polynomial, one row's LayerNorm, a tile), compiled into each kernel
    that calls it for the types it passes, vector values among them.

    No signature and no cache of its own: its code is in each calling kernel's cache, so nothing is loaded for it
    when bgesmall starts (each cached function costs a start about 10 ms). Called from Python, as the tests do,
    it compiles for the arguments given. Its fastmath flags travel with its instructions when LLVM inlines it."""
    return numba.njit(nogil=True, fastmath=fastmath, error_model="numpy")


def leaf():
    """A small pure-arithmetic helper (a polynomial), where fastmath is safe: `inner` with ARITH_FLAGS."""
    return inner(fastmath=ARITH_FLAGS)


def helper():
    """`inner` without fastmath: the matmul tiles, whose sums must run in order."""
    return inner()


def parallel_kernel(signature):
    """The one kernel that forks and joins threads (numba's threading layer): see bgesmall/threads.py, split_pass.

    Compiled (or loaded from the cache) at its first call, not at import, because loading a parallel kernel
    starts the threading layer (GNU OpenMP), and a process that forks must not have it running."""

    def decorate(fn):
        return _FirstCallKernel(fn, signature)

    return decorate


class _FirstCallKernel:
    def __init__(self, fn, signature):
        self.py_func, self.signature = fn, signature
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__
        self._disp = None
        self._lock = threading.Lock()

    def __call__(self, *args):
        disp = self._disp
        if disp is None:
            with self._lock:
                if self._disp is None:
                    d = cached_njit(self.py_func, nogil=True, parallel=True, error_model="numpy")
                    compile_from_cache(d, self.signature)
                    self._disp = d
                disp = self._disp
        return disp(*args)


def cached_njit(fn, **options):
    """numba.njit(cache=True, **options)(fn), except that the on-disk cache can only speed a start up: a cache
    that cannot be found, read or written (read-only install and home, an unwritable NUMBA_CACHE_DIR, a full
    disk, a corrupt or truncated file) means compiling in memory, with one warning per process."""
    disp = numba.njit(**options)(fn)
    if isinstance(disp, numba.core.dispatcher.Dispatcher):  # not NUMBA_DISABLE_JIT's plain function
        disp._cache = _GuardedCache.for_function(fn)  # what Dispatcher.enable_caching() sets, made safe
    return disp


class _GuardedCache(FunctionCache):
    """numba's per-function disk cache, whose every failure is a cache miss instead of an exception."""

    @classmethod
    def for_function(cls, fn):
        try:
            return cls(fn)
        except Exception as exc:  # RuntimeError "no locator available": no writable cache folder anywhere
            _warn_once(exc)
            return NullCache()

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as exc:  # a corrupt index or data file fails to unpickle; an unreadable one, OSError
            _warn_once(exc)
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as exc:  # read-only or full disk
            _warn_once(exc)


_warned = False


def _warn_once(exc: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"bgesmall: numba's kernel cache cannot be used ({type(exc).__name__}: {exc}); the kernels are "
            "compiled in memory instead (same results, a slower start). Point NUMBA_CACHE_DIR at a writable "
            "folder to cache them.",
            RuntimeWarning,
            stacklevel=2,
        )
