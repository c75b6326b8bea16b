"""The linear layers' matrix product, y = x @ W, over weights packed once at load into column panels.

Layout: W [k, n] is stored as `w` [panels, k, PANEL], panel p holding columns PANEL p .. PANEL (p + 1) - 1 for
every k, so a panel is one contiguous stream (llama2.c streams its weights the same way; this is BLIS's packed
B, done once at load instead of on every call). PANEL is 32 with AVX-512 and 16 without (below). n need not be
a multiple of PANEL: the last panel is padded with zero columns (`pack_columns`), computed and never stored.

With AVX-512 the micro-kernel keeps an 8-row x 32-column tile of y in 16 vector registers (`simd.f32x16`). Per
step t of the k loop it loads the panel's row t (two vectors), broadcasts x[r, t] for the 8 rows, and does 16
FMAs: no accumulator ever goes to memory. Each panel is read once per 8 rows of x, from L2 after the first
time; the tile's output lines are prefetched for writing when it starts (without that, the stores at its end
miss and cost 8% on the wide products). Rows left over take a 4-row or 1-row tile (a short tile repeats its
last row). Every tile keeps its accumulators in named locals (tuples of vectors), which is what lets LLVM hold
them in registers, and all sum in the same order, so a row's result never depends on which tile computed it,
on the rows around it, or on the panel width.

Without AVX-512 (16 registers of 8 lanes) a 6-row x 16-column tile takes its place (`_tile6`, WIDE_REGISTERS
below) over 16-wide panels, and the 1-3 rows left over cross four panels side by side (`_row_across`), so that
a lone row still keeps eight chains of FMAs going; a panel's first tile prefetches 4 KB ahead along the stream
(`_tile6`). Against the earlier layout (32-wide panels read in 16-column halves, a 2-row tile for leftovers, no
prefetch; bit-identical results), on an AMD EPYC (Zen 3, AVX2), the two kernels alternating in one process over
the 48 products of bge-small (distinct weights, streamed from memory), new faster 5 of 5 times at each size:
split over two cores, 1.18-1.40x at 1-13 rows (7 rows: median 7.4 -> 5.9 ms); one core, 1.2-1.5x at 1-13 rows
and the same within noise at 64-1024. A whole 7-token query's p50, process against process: 9.6-11.3 ms ->
6.7-8.9 ms.

Measured on one core (AMD EPYC Zen 4, AVX-512) over the 48 products of bge-small (distinct weights, streamed
from memory) against numpy's OpenBLAS sgemm on [in, out] weights, `python benchmarks/matmul.py`: 2-3.5x faster
at 2-12 rows (a query), 1.8-2x at 13-18, 1.25x at 64, 1.05x at 256 (OpenBLAS re-packs the weights on every call,
which is most of its time when few rows share them). Summation runs in order along k, one rounding per FMA.
"""

import numba
import numpy as np

from .jit import first_call_kernel, helper, kernel, parallel_kernel
from .simd import has_avx512, has_avx512_bf16, fma16, lane, load16, prefetch_read, prefetch_write, splat16, store16, zeros16

# The 8 x 32 tile needs 16 accumulator registers of 16 lanes: AVX-512 has 32. With AVX2 (16 registers of 8 lanes)
# the same tile would spill to the stack at every step (measured: half OpenBLAS's rate), so there a 6 x 16 tile
# runs instead, over panels 16 columns wide: each is one contiguous stream that a tile reads once, where a 16-column
# half of a 32-wide panel is every other cache line. Frozen into the compiled kernels (and the packed layout);
# numba's cache is keyed by the CPU, so a cache never crosses, and the kept weights file records PANEL.
WIDE_REGISTERS = has_avx512()
PANEL = 32 if WIDE_REGISTERS else 16  # columns per panel: two 16-lane vectors, or one (two 8-lane halves)
GROUP = 4  # AVX2: panels a leftover row reads side by side (4 x 16 columns: 8 independent chains of FMAs)
WIDE_AHEAD = 32 * 32  # AVX-512: elements ahead of its reads that a tile prefetches (32 steps of k, 4 KB)
AHEAD = 64 * 16  # AVX2: floats ahead of its reads that a panel's first tile prefetches (64 steps of k, 4 KB)


def pack_columns(w: np.ndarray) -> np.ndarray:
    """[k, n] -> [ceil(n / PANEL), k, PANEL], C-contiguous; columns past n are zero.

    Works from w's transpose [n, k], which is how PyTorch stores a linear weight ([out, in]): for the loader's
    `pack_columns(weight.T)` that is the file's own layout, and each panel is one transposed block of PANEL rows
    (5x faster than transposing the whole matrix first)."""
    k, n = w.shape
    panels = -(-n // PANEL)
    rows = np.ascontiguousarray(w.T, dtype=np.float32)  # [n, k]
    if n % PANEL:
        rows = np.concatenate([rows, np.zeros((panels * PANEL - n, k), dtype=np.float32)])
    return np.ascontiguousarray(rows.reshape(panels, PANEL, k).transpose(0, 2, 1))


def unpack_columns(w: np.ndarray, n: int) -> np.ndarray:
    """[panels, k, PANEL] -> [k, n], the inverse of `pack_columns` (for tests and tools)."""
    return np.ascontiguousarray(w.transpose(1, 0, 2).reshape(w.shape[1], -1)[:, :n])


def unpack_rows(w: np.ndarray, n: int) -> np.ndarray:
    """[panels, k, PANEL] -> [n, k], C-contiguous: W's transpose, as PyTorch stores a linear weight ([out, in])."""
    return np.ascontiguousarray(w.transpose(0, 2, 1).reshape(-1, w.shape[1])[:n])


@helper()
def _store_vector(out, r, c0, count, v):
    # out[r, c0:c0 + count] = v[:count] (count may be 16 or more: all of v; 0 or less: nothing)
    if count >= 16:
        store16(out, r * out.shape[1] + c0, v)
    else:  # the last, partial panel
        for c in range(max(count, 0)):
            out[r, c0 + c] = lane(v, c)


@helper()
def _store(out, r, j, cols, lo, hi):
    # out[r, j:j + cols] = (lo | hi)[:cols]
    _store_vector(out, r, j, cols, lo)
    _store_vector(out, r, j + 16, cols - 16, hi)


@helper()
def _prefetch_rows(out, first, last, c0, width):
    # out[first:last + 1, c0:c0 + width], which a tile stores at its end, fetched for writing while it computes
    for r in range(first, last + 1):
        for c in range(c0, c0 + width, 16):
            prefetch_write(out, r * out.shape[1] + c)


@helper()
def _rows4(x, r0, r1, r2, r3, t, lo, hi, acc):
    # one step t of four rows of a tile: acc (a0, b0, .., a3, b3) += x[row, t] * (lo | hi), a: columns 0..15
    a0, b0, a1, b1, a2, b2, a3, b3 = acc
    s0, s1, s2, s3 = splat16(x[r0, t]), splat16(x[r1, t]), splat16(x[r2, t]), splat16(x[r3, t])
    return (fma16(s0, lo, a0), fma16(s0, hi, b0), fma16(s1, lo, a1), fma16(s1, hi, b1),
            fma16(s2, lo, a2), fma16(s2, hi, b2), fma16(s3, lo, a3), fma16(s3, hi, b3))


@helper()
def _store4(out, r0, r1, r2, r3, j, cols, acc):
    _store(out, r0, j, cols, acc[0], acc[1])
    _store(out, r1, j, cols, acc[2], acc[3])
    _store(out, r2, j, cols, acc[4], acc[5])
    _store(out, r3, j, cols, acc[6], acc[7])


@helper()
def _prefetch_ahead(panel, t):
    # AVX-512: the two cache lines of the panel WIDE_AHEAD elements past step t's (on into the next panels: w is
    # one C-contiguous block; past its end, a prefetch neither checks bounds nor faults). Without it a tile down
    # a panel that comes from memory waits for each line in turn: the 48 products of a 7-row query, one thread,
    # AMD EPYC Zen 5, with and without, alternating: 7.1 -> 4.1 ms (fp32), 3.1 -> 1.8 ms (bf16); split over two
    # threads 1.12x / 1.21x; 1.0-1.05x at 512 rows, where the panel is in L2 for all tiles but the first.
    prefetch_read(panel, t * PANEL + WIDE_AHEAD)
    prefetch_read(panel, t * PANEL + WIDE_AHEAD + 16)


@helper()
def _tile8(x, panel, out, i, rows, j, cols):
    # out[i:i + rows, j:j + cols] = x[i:i + rows] @ panel [k, 32]; rows 1..8 (a short tile repeats its last row).
    # Two groups of four rows, 16 accumulators in all: every register of AVX-512 but the panel's two and a broadcast.
    last = i + rows - 1
    r0, r1, r2, r3 = i, min(i + 1, last), min(i + 2, last), min(i + 3, last)
    r4, r5, r6, r7 = min(i + 4, last), min(i + 5, last), min(i + 6, last), min(i + 7, last)
    z = zeros16()
    top = bottom = (z, z, z, z, z, z, z, z)
    _prefetch_rows(out, i, last, j, PANEL)
    for t in range(x.shape[1]):
        _prefetch_ahead(panel, t)
        lo, hi = load16(panel, t * PANEL), load16(panel, t * PANEL + 16)
        top = _rows4(x, r0, r1, r2, r3, t, lo, hi, top)
        bottom = _rows4(x, r4, r5, r6, r7, t, lo, hi, bottom)
    _store4(out, r0, r1, r2, r3, j, cols, top)
    _store4(out, r4, r5, r6, r7, j, cols, bottom)


@helper()
def _tile4(x, panel, out, i, rows, j, cols):
    # as _tile8, for rows 1..4
    last = i + rows - 1
    r0, r1, r2, r3 = i, min(i + 1, last), min(i + 2, last), min(i + 3, last)
    z = zeros16()
    acc = (z, z, z, z, z, z, z, z)
    for t in range(x.shape[1]):
        _prefetch_ahead(panel, t)
        acc = _rows4(x, r0, r1, r2, r3, t, load16(panel, t * PANEL), load16(panel, t * PANEL + 16), acc)
    _store4(out, r0, r1, r2, r3, j, cols, acc)


@helper()
def _tile1(x, panel, out, i, j, cols):
    # one row: out[i, j:j + cols] = x[i] @ panel, summed in the same order as the wider tiles
    k = x.shape[1]
    a0 = b0 = zeros16()
    for t in range(k):
        _prefetch_ahead(panel, t)
        s = splat16(x[i, t])
        a0, b0 = fma16(s, load16(panel, t * PANEL), a0), fma16(s, load16(panel, t * PANEL + 16), b0)
    _store(out, i, j, cols, a0, b0)


@helper()
def _panel_wide(x, panel, out, first, end, j, cols):
    # AVX-512 (32 registers): out[first:end, j:j + cols] = x[first:end] @ panel [k, 32]
    i = first
    while i < end:  # 8 rows at a time; the last 1..7 take the cheapest tile that covers them
        rest = end - i
        if rest >= 5:
            _tile8(x, panel, out, i, min(8, rest), j, cols)
            i += 8
        elif rest >= 2:
            _tile4(x, panel, out, i, rest, j, cols)
            i += 4
        else:
            _tile1(x, panel, out, i, j, cols)
            i += 1


@helper()
def _tile6(x, panel, out, i, rows, j, cols, ahead, limit):
    # For CPUs with 16 vector registers (AVX2), PANEL = 16: out[i:i + rows, j:j + cols] = x[i:i + rows] @ panel
    # [k, 16], rows 1..6 (a short tile repeats its last row): six accumulators of two 8-lane registers each.
    # ahead >= 0 (the first tile down a panel, which reads it from memory): at step t, prefetch AHEAD floats further
    # along the stream of panels (on past this panel's end into the next ones: w is one C-contiguous block), while
    # `ahead` + 16 t, counted from the first panel, stays below `limit` (the end of the panels this call
    # computes). Without it the core computes and reads in turn instead of at once (Zen 3: the 48 products of a
    # 7-row query split over two cores, with and without it taking turns in one process, 9 of 9 times faster:
    # median 7.3-9.0 ms -> 6.4-7.4 ms; bit-identical).
    k = x.shape[1]
    last = i + rows - 1
    r0, r1, r2, r3, r4, r5 = i, min(i + 1, last), min(i + 2, last), min(i + 3, last), min(i + 4, last), min(i + 5, last)
    a0 = a1 = a2 = a3 = a4 = a5 = zeros16()
    _prefetch_rows(out, i, last, j, 16)
    for t in range(k):
        if ahead >= 0 and ahead + t * PANEL < limit:
            prefetch_read(panel, AHEAD + t * PANEL)  # no bounds check, and a prefetch never faults
        v = load16(panel, t * PANEL)
        a0 = fma16(splat16(x[r0, t]), v, a0)
        a1 = fma16(splat16(x[r1, t]), v, a1)
        a2 = fma16(splat16(x[r2, t]), v, a2)
        a3 = fma16(splat16(x[r3, t]), v, a3)
        a4 = fma16(splat16(x[r4, t]), v, a4)
        a5 = fma16(splat16(x[r5, t]), v, a5)
    _store_vector(out, r0, j, cols, a0)
    _store_vector(out, r1, j, cols, a1)
    _store_vector(out, r2, j, cols, a2)
    _store_vector(out, r3, j, cols, a3)
    _store_vector(out, r4, j, cols, a4)
    _store_vector(out, r5, j, cols, a5)


@helper()
def _row_across(x, w, out, i, p0, count):
    # AVX2: out[i, 16 p0:16 (p0 + count)] = x[i] @ panels p0 .. p0 + count - 1 (count 1..4) side by side: one row
    # alone over one panel would be a chain of dependent FMAs; over four it keeps eight going (a missing panel
    # repeats the last, like a short tile's rows, and is not stored)
    n, last = out.shape[1], p0 + count - 1
    pa, pb, pc, pd = w[p0], w[min(p0 + 1, last)], w[min(p0 + 2, last)], w[min(p0 + 3, last)]
    a = b = c = d = zeros16()
    for t in range(x.shape[1]):
        s = splat16(x[i, t])
        a = fma16(s, load16(pa, t * PANEL), a)
        b = fma16(s, load16(pb, t * PANEL), b)
        c = fma16(s, load16(pc, t * PANEL), c)
        d = fma16(s, load16(pd, t * PANEL), d)
    _store_vector(out, i, p0 * PANEL, n - p0 * PANEL, a)
    if count > 1:
        _store_vector(out, i, (p0 + 1) * PANEL, n - (p0 + 1) * PANEL, b)
    if count > 2:
        _store_vector(out, i, (p0 + 2) * PANEL, n - (p0 + 2) * PANEL, c)
    if count > 3:
        _store_vector(out, i, (p0 + 3) * PANEL, n - (p0 + 3) * PANEL, d)


@helper()
def _panels_wide(x, w, out, first, end, start, stop):
    # AVX-512: out[first:end] over panels start..stop - 1, one panel at a time
    n = out.shape[1]
    for p in range(start, stop):
        _panel_wide(x, w[p], out, first, end, p * PANEL, min(PANEL, n - p * PANEL))


@helper()
def _panels_narrow(x, w, out, first, end, start, stop):
    # AVX2: the same in groups of GROUP panels. In each group, 6-row tiles go down each panel in turn (a panel is
    # one stream, read from memory by the first tile and from L1/L2 by the rest); each of a remainder of 1..3 rows
    # then crosses the group's panels side by side (4 or 5 left over: one short 6-row tile instead)
    n, m, k = out.shape[1], end - first, w.shape[1]
    rest = m % 6
    full = end if rest >= 4 else end - rest
    limit = stop * k * PANEL  # the end of these panels, as a float index into w, for the first tile's prefetch
    for g in range(start, stop, GROUP):
        group_end = min(stop, g + GROUP)
        for p in range(g, group_end):
            for i in range(first, full, 6):
                ahead = p * k * PANEL + AHEAD if i == first else -1
                _tile6(x, w[p], out, i, min(6, full - i), p * PANEL, min(PANEL, n - p * PANEL), ahead, limit)
        for i in range(full, end):
            _row_across(x, w, out, i, g, group_end - g)


_panels = _panels_wide if WIDE_REGISTERS else _panels_narrow  # frozen into the kernels below when they compile


@helper()
def _check_shapes(x, w, out, start, stop):
    # the kernels write through raw pointers: a mismatch must be an error, not a write past `out`
    if x.shape[0] != out.shape[0] or x.shape[1] != w.shape[1] or out.shape[1] > w.shape[0] * PANEL:
        raise ValueError("linear: shapes do not match: x [m, k], w [ceil(n / PANEL), k, PANEL], out [m, n]")
    if w.shape[2] != PANEL or not 0 <= start <= stop <= w.shape[0]:
        raise ValueError("linear: w is not [panels, k, PANEL], or the panel range is outside it")


@helper()
def _linear_range(x, w, out, start, stop, block):
    # the body of linear_panels, for float32 x and w or for bf16 pairs (uint32) of both
    _check_shapes(x, w, out, start, stop)
    m = x.shape[0]
    step = block if block > 0 else max(m, 1)
    for first in range(0, m, step):
        _panels(x, w, out, first, min(m, first + step), start, stop)


@kernel("void(f4[:, ::1], f4[:, :, ::1], f4[:, ::1], i8, i8, i8)")
def linear_panels(x, w, out, start, stop, block):
    # x [m, k] @ W [k, n] -> out [m, n] in the columns of panels start..stop - 1 only (32 each; the rest untouched),
    # W packed as w [ceil(n / PANEL), k, PANEL]. Two threads may fill disjoint panel ranges of one output.
    # block > 0: rows in blocks of that many, each block through every panel before the next (its rows stay in
    # L2 while the panels stream by); 0: all rows through each panel in turn (each panel stays in L2 while the
    # rows stream by). The same FMAs in the same order either way: the result is bit-identical.
    _linear_range(x, w, out, start, stop, block)


def linear(x, w, out, block=0):
    """x [m, k] @ W [k, n] -> out [m, n], W packed as w [ceil(n / PANEL), k, PANEL] (see linear_panels for `block`)."""
    linear_panels(x, w, out, 0, w.shape[0], block)


@parallel_kernel("void(f4[:, ::1], f4[:, :, ::1], f4[:, ::1], i8)")
def linear_split(x, w, out, parts):
    # as `linear`, the panels dealt to `parts` threads in contiguous runs: for one small pass (a query), whose
    # product is a stream of the whole weight matrix that one core cannot consume alone
    panels = w.shape[0]
    _check_shapes(x, w, out, np.int64(0), panels)  # int64s, as linear_panels passes: one compiled check for both
    for part in numba.prange(parts):  # the helper, not the kernel linear_panels: each compiles on its own
        _linear_range(x, w, out, part * panels // parts, (part + 1) * panels // parts, np.int64(0))


# -- bf16: the same tiles over pairs of bfloat16 ---------------------------------------------------------------
#
# The bf16 tier's weight format: W [k, n] as `pairs` [ceil(n / PANEL), ceil(k / 2), PANEL] uint32, element
# [p, t, c] holding W[2t, PANEL p + c] in its low 16 bits and W[2t + 1, PANEL p + c] in its high 16, each rounded
# to bfloat16 (to nearest, ties to even); half the bytes of the float32 panels. A product rounds the rows of x to
# bf16 the same way, pairs along k ([m, ceil(k / 2)] uint32: a row's bf16 values in order, read two at a time),
# and runs the tiles above unchanged: over uint32 arrays, `fma16` is AVX512_BF16's vdpbf16ps, which adds the two
# products of a pair (each exact in float32) into a float32 accumulator: 32 multiply-adds per instruction where
# the float32 FMA does 16, from half the bytes of weights. k odd: the last pair's high half is zero. Only CPUs
# with AVX512_BF16 compile these kernels (at their first call): see `HAS_BF16`.

HAS_BF16 = has_avx512_bf16()  # implies AVX-512, so PANEL is 32 and the tiles are the 8 x 32 ones


def round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 array -> its bfloat16 values' bits (uint16), rounded to nearest, ties to even; NaN stays NaN."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def pack_pairs(w: np.ndarray) -> np.ndarray:
    """[k, n] float32 -> [ceil(n / PANEL), ceil(k / 2), PANEL] uint32 pairs of bf16 along k (see above).
    Works from w's transpose [n, k], PyTorch's [out, in], as `pack_columns` does."""
    k, n = w.shape
    panels, k2 = -(-n // PANEL), -(-k // 2)
    rows = np.zeros((panels * PANEL, 2 * k2), dtype=np.uint16)  # [n padded, k padded] bf16 bits
    rows[:n, :k] = round_bf16(w.T)
    # row c's bf16 values in order, read as uint32, are its pairs: [n, k2]; then panels of PANEL rows, transposed
    return np.ascontiguousarray(rows.view(np.uint32).reshape(panels, PANEL, k2).transpose(0, 2, 1))


def unpack_pairs(w: np.ndarray, k: int, n: int) -> np.ndarray:
    """[panels, ceil(k / 2), PANEL] uint32 -> [k, n] float32: the bf16 values `pack_pairs` kept, exactly."""
    rows = np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(-1, w.shape[1])  # [n padded, k2]
    return np.ascontiguousarray(bf16_to_f32(rows.view(np.uint16))[:n, :k].T)


@helper()
def _bf16_bits(u):
    # float32 bits -> bfloat16 bits, to nearest, ties to even (as round_bf16); NaN stays NaN (quieted)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) | 0x40) & 0xFFFF
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


@helper()
def _to_pairs(x):
    # x [m, k] float32 -> [m, ceil(k / 2)] uint32: each row rounded to bf16, in pairs along k (high half of an
    # odd k's last pair zero)
    m, k = x.shape
    bits = x.view(np.uint32)
    half = k // 2
    pairs = np.zeros((m, (k + 1) // 2), dtype=np.uint32)
    for r in range(m):
        for t in range(half):
            pairs[r, t] = np.uint32(_bf16_bits(np.int64(bits[r, 2 * t])) | (_bf16_bits(np.int64(bits[r, 2 * t + 1])) << 16))
        if k % 2:
            pairs[r, half] = np.uint32(_bf16_bits(np.int64(bits[r, k - 1])))
    return pairs


@helper()
def _check_pairs(x, w):
    if (x.shape[1] + 1) // 2 != w.shape[1]:
        raise ValueError("linear_bf16: shapes do not match: x [m, k], w [ceil(n / PANEL), ceil(k / 2), PANEL]")


@first_call_kernel("void(f4[:, ::1], u4[:, :, ::1], f4[:, ::1], i8, i8, i8)")
def linear_bf16_panels(x, w, out, start, stop, block):
    # x [m, k] float32 @ W [k, n] (bf16 pairs, w [ceil(n / PANEL), ceil(k / 2), PANEL] uint32) -> out [m, n] float32,
    # x rounded to bf16 first; otherwise as linear_panels (panels start..stop - 1, rows in blocks of `block`)
    _check_pairs(x, w)
    _linear_range(_to_pairs(x), w, out, start, stop, block)


def linear_bf16(x, w, out, block=0):
    """x [m, k] @ W [k, n] -> out [m, n] in bf16 (products of bf16 values summed in float32), W as `pack_pairs` gives."""
    linear_bf16_panels(x, w, out, 0, w.shape[0], block)


@parallel_kernel("void(f4[:, ::1], u4[:, :, ::1], f4[:, ::1], i8)")
def linear_bf16_split(x, w, out, parts):
    # as linear_split, over bf16 pairs; x is rounded once, before the threads share the panels
    _check_pairs(x, w)
    pairs = _to_pairs(x)
    panels = w.shape[0]
    _check_shapes(pairs, w, out, np.int64(0), panels)
    for part in numba.prange(parts):
        _linear_range(pairs, w, out, part * panels // parts, (part + 1) * panels // parts, np.int64(0))
