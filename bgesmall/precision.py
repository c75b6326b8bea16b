"""The numeric tier a job asks for: `--precision`, `embed_dataset(precision=...)`, `Embedder(precision=...)`.

This build has one tier, the exact float32 engine ("fp32"). A bf16 tier (issue 10) needs a CPU with AVX512_BF16
and is not built, so any other value is refused with the valid one named, never silently run as fp32.
"""

from __future__ import annotations

PRECISIONS = ("fp32",)
DEFAULT = "fp32"


def check_precision(precision) -> str:
    """`precision` if this build has that tier; else a ValueError naming the valid value(s) and why."""
    if precision in PRECISIONS:
        return precision
    valid = ", ".join(repr(p) for p in PRECISIONS)
    raise ValueError(f"precision {precision!r} is not available: this build of bgesmall has only the exact float32 "
                     f"tier ({valid}); a bf16 tier needs a CPU with AVX512_BF16 and is not built")
