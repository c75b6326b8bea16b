"""The one decorator policy for every kernel in this package (see `__init__.py`)."""

import warnings

import numba
from numba.core import typeinfer
from numba.core.caching import FunctionCache, NullCache

# Pure arithmetic leaves may reassociate and contract (FMA); nothing here assumes no NaN or no inf.
ARITH_FLAGS = {"contract", "reassoc", "arcp", "afn"}


def kernel(signature, *, fastmath=False):
    # error_model="numpy": a float division by zero gives inf as in C, instead of Python's ZeroDivisionError,
    # whose check on every division keeps LLVM from vectorizing a loop that divides.
    return _cached_njit(signature, nogil=True, fastmath=fastmath, error_model="numpy")


def leaf(signature):
    """A small pure-arithmetic helper (a polynomial, a dot product) called from kernels, where fastmath is safe.

    Its flags travel with its instructions when LLVM inlines it; a numba-level inline would drop them."""
    return _cached_njit(signature, nogil=True, fastmath=ARITH_FLAGS, error_model="numpy")


def helper():
    """A function called only from kernels, compiled for the types its caller passes (vector values among them).

    No signature and no cache of its own: its code is compiled into each calling kernel, whose cache holds it."""
    return numba.njit(nogil=True, error_model="numpy")


def parallel_kernel():
    """The one kernel that forks and joins threads (numba's threading layer): see bgesmall/threads.py, split_pass.

    No signature: compiled (or loaded from the cache) at its first call, not at import, because loading a parallel
    kernel starts the threading layer (GNU OpenMP), and a process that forks must not have it running. Its only
    caller (the encoder) passes float32 C-contiguous arrays, so it compiles for those types alone."""
    return _cached_njit(None, nogil=True, parallel=True, error_model="numpy")


def _cached_njit(signature, **options):
    """numba.njit(signature, cache=True, **options), except that the on-disk cache can only speed a start up:
    a cache that cannot be found, read or written (read-only install and home, an unwritable NUMBA_CACHE_DIR,
    a full disk, a corrupt or truncated file) means compiling in memory, with one warning per process."""

    def decorate(fn):
        disp = numba.njit(**options)(fn)  # no signature yet: nothing is compiled before the cache is in place
        if not isinstance(disp, numba.core.dispatcher.Dispatcher):  # NUMBA_DISABLE_JIT: the plain function
            return disp
        disp._cache = _GuardedCache.for_function(fn)  # what Dispatcher.enable_caching() sets, made safe
        if signature is not None:  # as numba.njit(signature) does: compile now, then refuse other types
            with typeinfer.register_dispatcher(disp):
                disp.compile(signature)
            disp.disable_compile()
        return disp

    return decorate


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
