"""Numba kernels for every step of the encoder (`bgesmall.kernels`).

The linear layers' products run on weights packed at load (`matmul.py`, register tiles through the vector type
of `simd.py`); everything between them is fused, one pass over memory each. Only the attention products of
long sequences go to numpy's BLAS (bgesmall/encoder.py, `self_attention`).

Decorator policy, written down once (see `jit.py`):
- every kernel is `njit(signature, cache=True, nogil=True)`: the explicit float32, C-contiguous signature
  makes a float64 or strided input an error instead of a silent slow recompile; the on-disk cache makes the
  second start fast; releasing the GIL is what lets bgesmall's worker threads run batches side by side;
- kernels are serial: parallelism is across batches, one worker thread per core (see bgesmall/threads.py),
  so no kernel ends in a barrier that every core must reach. The one exception is `linear_split`, for a
  single small pass (a query) that has no second batch to give the other core;
- `fastmath` only on pure arithmetic leaves (the erf and exp polynomials), never on code where a sum is
  divided or `-inf` could appear.
"""

from . import compile_ahead

# With numba's cache empty, a child process compiles about half of the kernels while this one compiles the rest
# (compile_ahead.py); this process loads the child's share from the cache at their first call.
compile_ahead.begin()
from .activations import bias_gelu, erf, exp_nonpositive, gelu  # noqa: E402
from .attention import attention, softmax_rows  # noqa: E402
from .layernorm import embed_layernorm, residual_layernorm  # noqa: E402
from .matmul import linear, linear_split, pack_columns, unpack_columns, unpack_rows  # noqa: E402

__all__ = [
    "attention",
    "bias_gelu",
    "embed_layernorm",
    "erf",
    "exp_nonpositive",
    "gelu",
    "linear",
    "linear_split",
    "pack_columns",
    "residual_layernorm",
    "softmax_rows",
    "unpack_columns",
    "unpack_rows",
]
