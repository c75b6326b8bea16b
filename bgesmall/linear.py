"""A linear layer's weight in the formats its kernels read, and the one call that runs it: out = x @ W.

Every linear layer of the encoder goes through `Linear.__call__`. Which implementation runs for a given number
of rows is the plan's choice (bgesmall/plan.py), fixed when the model is loaded (`Linear.prepare`):

    tiles       bgesmall's register-tiled kernel over the packed panels, all rows through each panel in turn
    tiles/48    the same kernel, rows in blocks of 48, each block through every panel (bit-identical to tiles)
    blas        numpy's sgemm (OpenBLAS) on the plain [in, out] matrix, which is kept only where it is chosen
                (the exact tier only)

The weight format is the tier's (bgesmall/precision.py): float32 panels for fp32, pairs of bfloat16 for bf16
(kernels/matmul.py, `pack_pairs`); `tiles` and `tiles/48` run the kernel of the format the panels are in.
A query split over the cores (parts > 1) always takes the tiles, each thread filling its own run of panels; so
does a query that would split but is kept on one thread (parts = ONE_CORE_SPLIT).
A new weight format (AMX tiles) is one more panel dtype here and one more entry in IMPLEMENTATIONS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from .kernels.matmul import linear, linear_bf16, linear_bf16_split, linear_split, pack_columns, pack_pairs, unpack_rows
from .threads import ONE_CORE_SPLIT

class Format(NamedTuple):
    """A tier's weight format: how W is packed and the kernels that read it."""

    pack: Callable  # W [in, out] float32 -> panels
    run: Callable  # (x, panels, out, block): all rows on this thread
    split: Callable  # (x, panels, out, parts): the panels shared by `parts` threads


# the panels' dtype says which tier a Linear is (float32, or uint32 pairs of bf16: `Linear.precision`)
FORMATS = {"fp32": Format(pack_columns, linear, linear_split), "bf16": Format(pack_pairs, linear_bf16, linear_bf16_split)}


def _tiles(lin: "Linear", x: np.ndarray, out: np.ndarray) -> None:
    FORMATS[lin.precision].run(x, lin.panels, out, 0)


def _tiles_blocked(lin: "Linear", x: np.ndarray, out: np.ndarray) -> None:
    FORMATS[lin.precision].run(x, lin.panels, out, 48)


def _blas(lin: "Linear", x: np.ndarray, out: np.ndarray) -> None:
    np.matmul(x, lin.dense, out=out)


# name -> fn(linear, x [rows, in], out [rows, out]); looked up at each call, so a test may replace one
IMPLEMENTATIONS = {"tiles": _tiles, "tiles/48": _tiles_blocked, "blas": _blas}


@dataclass
class Linear:
    """W [in, out] (PyTorch stores [out, in]) in the formats the plan's implementations read."""

    # fp32: [ceil(out / PANEL), in, PANEL] float32, W's columns, PANEL 32 or 16 (kernels/matmul.py);
    # bf16: [ceil(out / PANEL), ceil(in / 2), PANEL] uint32, W's columns as pairs of bfloat16 along in
    panels: np.ndarray
    out_features: int
    dense: np.ndarray | None = None  # [in, out] float32 (C- or Fortran-ordered), kept only where the plan runs BLAS
    choices: tuple[tuple[int, str], ...] = ((1, "tiles"),)  # (from this many rows on, implementation), ascending
    in_features: int = 0  # 0: the panels' k (fp32); bf16 panels hold ceil(in / 2) pairs and need it said

    def __post_init__(self):
        if not self.in_features:
            self.in_features = self.panels.shape[1] * (2 if self.precision == "bf16" else 1)

    @classmethod
    def from_torch(cls, w: np.ndarray, choices: tuple[tuple[int, str], ...] | None = None,
                   precision: str = "fp32") -> "Linear":
        # [out, in] -> Linear; with the plan's choices known, BLAS reads w itself (as w.T, [in, out]): no copy
        lin = cls(FORMATS[precision].pack(w.T), w.shape[0], in_features=w.shape[1])
        if choices is not None:
            lin.prepare(choices, source=w)
        return lin

    @property
    def precision(self) -> str:
        return "bf16" if self.panels.dtype == np.uint32 else "fp32"

    @property
    def shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features  # (in, out)

    def prepare(self, choices: tuple[tuple[int, str], ...], source: np.ndarray | None = None) -> None:
        """Use these (from rows, implementation) choices; keep the plain matrix only if one of them is BLAS.
        source: the [out, in] weight the panels were packed from, whose transpose BLAS can read as it is."""
        unknown = [name for _, name in choices if name not in IMPLEMENTATIONS]
        if unknown:
            raise ValueError(f"unknown linear implementation {unknown[0]!r}; valid: {', '.join(IMPLEMENTATIONS)}")
        if self.precision != "fp32" and any(name == "blas" for _, name in choices):
            raise ValueError(f"linear implementation 'blas' runs the exact fp32 tier only; for {self.precision}: "
                             f"{', '.join(n for n in IMPLEMENTATIONS if n != 'blas')} (a BGESMALL_PLAN set for "
                             f"the exact tier: unset it, or force linear=tiles)")
        self.choices = tuple(sorted(choices))
        if any(name == "blas" for _, name in self.choices):
            if self.dense is None and source is None:  # rebuilt from the panels: [out, in], as a file holds it
                source = unpack_rows(self.panels, self.out_features)
            if self.dense is None:
                # [in, out], Fortran-ordered: sgemm reads the [out, in] matrix transposed, nothing copied. Always this
                # layout, however the matrix came: OpenBLAS's one-row product gives other last bits for C order.
                self.dense = source.T
        else:
            self.dense = None

    def implementation(self, rows: int) -> str:
        name = self.choices[0][1]
        for lo, how in self.choices:
            if rows >= lo:
                name = how
        return name

    def __call__(self, x: np.ndarray, out: np.ndarray, parts: int = 1) -> None:
        # x [rows, in] @ W [in, out] -> out [rows, out]; parts > 1: W's panels shared by that many threads;
        # 1: the plan's choice for this many rows; ONE_CORE_SPLIT: the split's tiles on this thread alone
        if parts > 1:
            FORMATS[self.precision].split(x, self.panels, out, parts)
        elif parts == ONE_CORE_SPLIT:
            FORMATS[self.precision].run(x, self.panels, out, 0)
        else:
            IMPLEMENTATIONS[self.implementation(x.shape[0])](self, x, out)
