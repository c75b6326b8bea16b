"""Numba kernels for the encoder's elementwise, normalization and attention steps (`bgesmall.kernels`).

Matrix products stay in numpy (BLAS); everything between them is fused here, one pass over memory each.

Decorator policy, written down once (see `jit.py`):
- every kernel is `njit(signature, cache=True, nogil=True)`: the explicit float32, C-contiguous signature
  makes a float64 or strided input an error instead of a silent slow recompile; the on-disk cache makes the
  second start fast; releasing the GIL is what lets bgesmall's worker threads run batches side by side;
- kernels are serial: parallelism is across batches, one worker thread per core (see bgesmall/threads.py),
  so no kernel ends in a barrier that every core must reach;
- `fastmath` only on pure arithmetic leaves (the erf and exp polynomials), never on code where a sum is
  divided or `-inf` could appear.
"""

from .activations import bias_gelu, erf, exp_nonpositive, gelu
from .attention import attention, softmax_rows
from .layernorm import embed_layernorm, residual_layernorm

__all__ = [
    "attention",
    "bias_gelu",
    "embed_layernorm",
    "erf",
    "exp_nonpositive",
    "gelu",
    "residual_layernorm",
    "softmax_rows",
]
