"""The numeric tier a model runs: `load(precision=...)`, `--precision`, `$BGESMALL_PRECISION`.

    fp32   the exact tier (the default): float32 throughout, the reference's vectors to 1e-5
    bf16   the linear layers' weights and inputs rounded to bfloat16, their products summed in float32;
           everything else (embeddings, LayerNorm, GELU, attention, pooling) float32. Needs AVX512_BF16
           (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later); its fidelity to the exact tier
           is measured and tested (README, "Tiers")

Where the CPU has no AVX512_BF16, asking for bf16 runs the exact tier and says so once: a slow emulation of
bf16 would be worse than the exact engine on every count. `Model.precision` is what runs.
"""

from __future__ import annotations

import os
import warnings

PRECISIONS = ("fp32", "bf16")
DEFAULT = "fp32"
ENV = "BGESMALL_PRECISION"


def check_precision(precision) -> str:
    """The tier's canonical name ("BF16" -> "bf16"); a ValueError naming the valid values otherwise."""
    if isinstance(precision, str) and precision.strip().lower() in PRECISIONS:
        return precision.strip().lower()
    valid = ", ".join(repr(p) for p in PRECISIONS)
    raise ValueError(f"precision {precision!r} is not a tier of bgesmall: valid values are {valid} (any case)")


def requested(precision=None) -> str:
    """The tier asked for: `precision` if given, else $BGESMALL_PRECISION, else fp32; checked."""
    if precision is None:
        env = os.environ.get(ENV, "").strip()
        if not env:
            return DEFAULT
        try:
            return check_precision(env)
        except ValueError as e:
            raise ValueError(f"{ENV}={env!r}: {e}") from None
    return check_precision(precision)


def runnable(precision: str) -> str:
    """The tier that runs for a checked request on this CPU: bf16 needs AVX512_BF16, else fp32 with a warning."""
    from .kernels.matmul import HAS_BF16

    if precision == "bf16" and not HAS_BF16:
        _warn_once()
        return "fp32"
    return precision


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("bgesmall: precision 'bf16' needs a CPU with AVX512_BF16, which this one lacks; running the "
                      "exact fp32 tier instead (Model.precision says 'fp32')", RuntimeWarning, stacklevel=3)
