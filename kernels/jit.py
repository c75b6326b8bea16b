"""The one decorator policy for every kernel in this package (see `__init__.py`)."""

import numba

# Pure arithmetic leaves may reassociate and contract (FMA); nothing here assumes no NaN or no inf.
ARITH_FLAGS = {"contract", "reassoc", "arcp", "afn"}


def kernel(signature, *, parallel=False, fastmath=False):
    return numba.njit(signature, cache=True, nogil=True, parallel=parallel, fastmath=fastmath)


def leaf(signature):
    """A scalar helper inlined into kernels: pure arithmetic, so fastmath is safe."""
    return numba.njit(signature, cache=True, nogil=True, inline="always", fastmath=ARITH_FLAGS)
