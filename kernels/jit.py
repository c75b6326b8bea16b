"""The one decorator policy for every kernel in this package (see `__init__.py`)."""

import numba

# Pure arithmetic leaves may reassociate and contract (FMA); nothing here assumes no NaN or no inf.
ARITH_FLAGS = {"contract", "reassoc", "arcp", "afn"}


def kernel(signature, *, fastmath=False):
    # error_model="numpy": a float division by zero gives inf as in C, instead of Python's ZeroDivisionError,
    # whose check on every division keeps LLVM from vectorizing a loop that divides.
    return numba.njit(signature, cache=True, nogil=True, fastmath=fastmath, error_model="numpy")


def leaf(signature):
    """A small pure-arithmetic helper (a polynomial, a dot product) called from kernels, where fastmath is safe.

    Its flags travel with its instructions when LLVM inlines it; a numba-level inline would drop them."""
    return numba.njit(signature, cache=True, nogil=True, fastmath=ARITH_FLAGS, error_model="numpy")


def helper():
    """A function called only from kernels, compiled for the types its caller passes (vector values among them).

    No signature and no cache of its own: its code is compiled into each calling kernel, whose cache holds it."""
    return numba.njit(nogil=True, error_model="numpy")


def parallel_kernel():
    """The one kernel that forks and joins threads (numba's threading layer): see bgesmall/threads.py, split_pass.

    No signature: compiled (or loaded from the cache) at its first call, not at import, because loading a parallel
    kernel starts the threading layer (GNU OpenMP), and a process that forks must not have it running. Its only
    caller (the encoder) passes float32 C-contiguous arrays, so it compiles for those types alone."""
    return numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
