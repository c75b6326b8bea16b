"""Self-attention over packed sequences: scores, softmax and the weighted sum of values, fused.

Sequences are packed back to back without padding, so there is nothing to mask: sequence s owns token rows
starts[s]:starts[s] + lengths[s], and attention never reads outside them. Each (sequence, head) pair is
independent. `attention` runs the fused kernels, best for short sequences; for long ones the encoder runs the two
products as BLAS GEMMs around `softmax_rows` (see bgesmall/encoder.py, `self_attention`).
Mirrors transformers' `BertSelfAttention` (eager path): softmax(q k^T / sqrt(d) + mask) v, with the query,
key and value biases added here rather than in a separate pass.

For heads of 32 dimensions (bge-small's and MiniLM's: 384 / 12) the kernels run in vector registers
(`simd.f32x16`), one head of one sequence at a time. Sequences of `blocks_from` tokens or more (`attention_blocks`):
the head's keys are laid out as [32, keys padded to 16] (bias added), so that 16 scores of a query are 32 FMAs
of its broadcast elements by rows of keys; queries go eight at a time (eight independent chains of FMAs; a short
group repeats its last row, so a row's result never depends on the rows beside it); each row's max and sum are
vector reductions and its exp one vectorized pass over all eight rows; the weighted sum of values is two
16-lane accumulators per query, a row of values read once for all eight. Shorter sequences, and the lone [CLS]
rows of the last layer (`attention_rows`), go a query row at a time: a score is two FMAs over the row's two
vectors and a sum across lanes. Other head sizes take a scalar kernel, compiled at its first call
(`attention_any`), that keeps the keys row-major and scores by dot products along the head dimension. (Slicing
or calling a function inside these loops costs numba a reference-count update each time: the loops index arrays
directly.)
"""

import numpy as np

from .activations import exp_nonpositive
from .jit import first_call_kernel, helper, kernel
from .simd import fma16, hmax16, hsum16, load16, max16, splat16, store16, zeros16

QUERIES = 8  # query rows computed together (eight chains of FMAs in flight)
HEAD = 32  # the head size of the vector kernel
# The built-in `blocks_from` (the plan measures it per machine: bgesmall/tune.py). Sequences shorter than it go a
# query row at a time (attention_rows: a score is two FMAs and a sum across lanes;
# the eight-row blocks pad the keys to 16 and the queries to 8, and pay for a transposed copy). Against the
# blocks, one thread, AMD EPYC Zen 5, ~960 tokens of n-token sequences, best of 15 alternating: n = 12: 0.71x,
# 16: 0.79x, 20: 0.65x, 24: 0.83x, 32: 1.03x, 48: 1.42x; against the scalar kernel (attention_any) that had the
# sequences below 12: n = 4: 0.75x, 7: 0.65x, 9: 0.67x, 11: 0.63x (compiled for Haswell's AVX2, where each vector
# operation is two: 0.76x, 0.63x, 0.59x at 4, 7, 11). first_only's [CLS] rows go a row at a time.
VECTOR_FROM = 28


@helper()
def _head_inputs(seq, qkv_b, n, queries, o, width, scale, kt, q):
    # one head (columns o .. o + 31) of one sequence, seq [n, 3 hidden] its rows of qkv: kt [32, width] <- its keys
    # transposed, bias added, zero past n; q [rows, 32] <- its first `queries` query rows, bias added and scaled,
    # then copies of the last row up to a multiple of QUERIES
    hidden = seq.shape[1] // 3
    for c in range(HEAD):  # written along a row of kt: LLVM gathers the reads (AVX-512)
        b = qkv_b[hidden + o + c]
        for j in range(n):
            kt[c * width + j] = seq[j, hidden + o + c] + b
        for j in range(n, width):
            kt[c * width + j] = 0.0
    for i in range((queries + QUERIES - 1) // QUERIES * QUERIES):
        src = min(i, queries - 1)
        for c in range(HEAD):
            q[i * HEAD + c] = (seq[src, o + c] + qkv_b[o + c]) * scale


@helper()
def _scores8(kt, q, i, width, p):
    # p[i + r, :] <- q[i + r] @ kt [32, width] for r < 8, 16 keys at a time
    for jb in range(0, width, 16):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zeros16()
        for c in range(HEAD):
            keys = load16(kt, c * width + jb)
            a0 = fma16(splat16(q[i * HEAD + c]), keys, a0)
            a1 = fma16(splat16(q[(i + 1) * HEAD + c]), keys, a1)
            a2 = fma16(splat16(q[(i + 2) * HEAD + c]), keys, a2)
            a3 = fma16(splat16(q[(i + 3) * HEAD + c]), keys, a3)
            a4 = fma16(splat16(q[(i + 4) * HEAD + c]), keys, a4)
            a5 = fma16(splat16(q[(i + 5) * HEAD + c]), keys, a5)
            a6 = fma16(splat16(q[(i + 6) * HEAD + c]), keys, a6)
            a7 = fma16(splat16(q[(i + 7) * HEAD + c]), keys, a7)
        store16(p, i * width + jb, a0)
        store16(p, (i + 1) * width + jb, a1)
        store16(p, (i + 2) * width + jb, a2)
        store16(p, (i + 3) * width + jb, a3)
        store16(p, (i + 4) * width + jb, a4)
        store16(p, (i + 5) * width + jb, a5)
        store16(p, (i + 6) * width + jb, a6)
        store16(p, (i + 7) * width + jb, a7)


@helper()
def _shift_rows(p, rows, width, pad):
    # each row of p [rows, width]: p[i, j] <- p[i, j] + pad[j] - max_j (p[i, j] + pad[j]), at least the floor of
    # exp's range (-87), so that one flat exp pass covers every row; pad [width]: 0 for the keys, -inf past them
    # (whose weight is then exp(-87) ~ 2e-38: below the last bit of any sum)
    low = splat16(np.float32(-87.0))
    one = splat16(np.float32(1.0))
    for i in range(rows):
        at = i * width
        m = fma16(load16(p, at), one, load16(pad, 0))
        for jb in range(16, width, 16):
            m = max16(m, fma16(load16(p, at + jb), one, load16(pad, jb)))
        shift = splat16(-hmax16(m))
        for jb in range(0, width, 16):
            v = fma16(load16(p, at + jb), one, load16(pad, jb))
            store16(p, at + jb, max16(fma16(v, one, shift), low))


@helper()
def _row_sums(p, rows, width, inv):
    # inv[i] <- 1 / sum of row i of p [rows, width] (the padding's exp(-87)s are below its last bit)
    for i in range(rows):
        total = load16(p, i * width)
        one = splat16(np.float32(1.0))
        for jb in range(16, width, 16):
            total = fma16(load16(p, i * width + jb), one, total)
        inv[i] = np.float32(1.0) / hsum16(total)


@helper()
def _store_row(out, at, lo, hi, inv, blo, bhi):
    # out[at:at + 32] <- (lo | hi) * inv + (blo | bhi)
    s = splat16(inv)
    store16(out, at, fma16(lo, s, blo))
    store16(out, at + 16, fma16(hi, s, bhi))


@helper()
def _values8(seq, qkv_b, start, n, queries, i, o, width, p, inv, out):
    # out[start + i + r, o:o + 32] <- sum_j p[i + r, j] v_j * inv[i + r] + bias_v, for the rows i + r < queries;
    # seq [n, 3 hidden]: the sequence's rows of qkv
    three = seq.shape[1]
    vo = 2 * (three // 3) + o
    l0 = h0 = l1 = h1 = l2 = h2 = l3 = h3 = l4 = h4 = l5 = h5 = l6 = h6 = l7 = h7 = zeros16()
    for j in range(n):
        at = j * three + vo
        vlo, vhi = load16(seq, at), load16(seq, at + 16)
        s = splat16(p[i * width + j])
        l0, h0 = fma16(s, vlo, l0), fma16(s, vhi, h0)
        s = splat16(p[(i + 1) * width + j])
        l1, h1 = fma16(s, vlo, l1), fma16(s, vhi, h1)
        s = splat16(p[(i + 2) * width + j])
        l2, h2 = fma16(s, vlo, l2), fma16(s, vhi, h2)
        s = splat16(p[(i + 3) * width + j])
        l3, h3 = fma16(s, vlo, l3), fma16(s, vhi, h3)
        s = splat16(p[(i + 4) * width + j])
        l4, h4 = fma16(s, vlo, l4), fma16(s, vhi, h4)
        s = splat16(p[(i + 5) * width + j])
        l5, h5 = fma16(s, vlo, l5), fma16(s, vhi, h5)
        s = splat16(p[(i + 6) * width + j])
        l6, h6 = fma16(s, vlo, l6), fma16(s, vhi, h6)
        s = splat16(p[(i + 7) * width + j])
        l7, h7 = fma16(s, vlo, l7), fma16(s, vhi, h7)
    blo, bhi = load16(qkv_b, vo), load16(qkv_b, vo + 16)  # the values' bias, once: the weights sum to 1
    cols = out.shape[1]
    row = (start + i) * cols + o
    _store_row(out, row, l0, h0, inv[i], blo, bhi)  # row i < queries always
    if i + 1 < queries:
        _store_row(out, row + cols, l1, h1, inv[i + 1], blo, bhi)
    if i + 2 < queries:
        _store_row(out, row + 2 * cols, l2, h2, inv[i + 2], blo, bhi)
    if i + 3 < queries:
        _store_row(out, row + 3 * cols, l3, h3, inv[i + 3], blo, bhi)
    if i + 4 < queries:
        _store_row(out, row + 4 * cols, l4, h4, inv[i + 4], blo, bhi)
    if i + 5 < queries:
        _store_row(out, row + 5 * cols, l5, h5, inv[i + 5], blo, bhi)
    if i + 6 < queries:
        _store_row(out, row + 6 * cols, l6, h6, inv[i + 6], blo, bhi)
    if i + 7 < queries:
        _store_row(out, row + 7 * cols, l7, h7, inv[i + 7], blo, bhi)


SIGNATURE = "void(f4[:, ::1], f4[::1], i8[::1], i8[::1], i8, b1, f4[:, ::1])"
HEADS32_SIGNATURE = "void(f4[:, ::1], f4[::1], i8[::1], i8[::1], i8, b1, i8, f4[:, ::1])"  # SIGNATURE + blocks_from


# reassoc + contract only (no nnan/ninf): sums may be reordered so they vectorize; inf and NaN keep their meaning.
@kernel(HEADS32_SIGNATURE, fastmath={"contract", "reassoc"})
def attention_rows(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out):
    # `attention` for heads of 32 (qkv [tokens, 3 * 32 heads], qkv_b [3 * 32 heads], starts, lengths [sequences],
    # out [tokens, 32 heads]), a query row at a time: the sequences shorter than blocks_from, or under
    # first_only every sequence's [CLS] row (written out here, not in a helper: one level of LLVM less to compile)
    scale = np.float32(1.0 / np.sqrt(np.float32(HEAD)))
    longest = np.int64(0)  # not the literal 0: numba would compile what it is passed to twice, once for Literal[int](0)
    for s in range(starts.shape[0]):
        if first_only or lengths[s] < blocks_from:
            longest = max(longest, lengths[s])
    three = qkv.shape[1]
    hidden = three // 3
    one, nothing, sc = splat16(np.float32(1.0)), zeros16(), splat16(scale)
    keys = np.empty((longest, HEAD), dtype=np.float32)  # one head's keys, bias added
    p = np.empty(longest, dtype=np.float32)  # one row's scores, then weights
    bits = np.empty(longest, dtype=np.int32)
    for s in range(starts.shape[0]):
        start, n = starts[s], lengths[s]
        if not (first_only or n < blocks_from) or n == 0:
            continue
        scores, scratch = p[:n], bits[:n]
        rows = 1 if first_only else n
        for o in range(0, num_heads * HEAD, HEAD):  # one head: columns o .. o + 31, each row's slice two vectors
            klo_b, khi_b = load16(qkv_b, hidden + o), load16(qkv_b, hidden + o + 16)
            src, base, stride = qkv, start * three + hidden + o, three  # one row reads the keys where they are
            if rows > 1:  # more: the head's keys once, bias added, side by side
                for j in range(n):
                    at = base + j * stride
                    store16(keys, j * HEAD, fma16(load16(qkv, at), one, klo_b))
                    store16(keys, j * HEAD + 16, fma16(load16(qkv, at + 16), one, khi_b))
                src, base, stride, klo_b, khi_b = keys, 0, HEAD, nothing, nothing
            qlo_b, qhi_b, vo = load16(qkv_b, o), load16(qkv_b, o + 16), 2 * hidden + o
            vlo_b, vhi_b = load16(qkv_b, vo), load16(qkv_b, vo + 16)
            for i in range(rows):  # out[start + i, o:o + 32] <- softmax_j(q_i . k_j) v_j + bias_v
                at = (start + i) * three + o
                qlo = fma16(fma16(load16(qkv, at), one, qlo_b), sc, nothing)  # (q + b) * scale
                qhi = fma16(fma16(load16(qkv, at + 16), one, qhi_b), sc, nothing)
                m = np.float32(-np.inf)
                for j in range(n):
                    at = base + j * stride
                    klo, khi = fma16(load16(src, at), one, klo_b), fma16(load16(src, at + 16), one, khi_b)
                    t = hsum16(fma16(qhi, khi, fma16(qlo, klo, nothing)))
                    scores[j] = t
                    m = max(m, t)
                for j in range(n):
                    scores[j] -= m
                exp_nonpositive(scores, scratch)
                total = np.float32(0.0)
                for j in range(n):
                    total += scores[j]
                lo = hi = nothing
                for j in range(n):  # the weighted sum of the values; their bias is added once: the weights sum to 1
                    at = (start + j) * three + vo
                    w = splat16(scores[j])
                    lo, hi = fma16(w, load16(qkv, at), lo), fma16(w, load16(qkv, at + 16), hi)
                _store_row(out, (start + i) * out.shape[1] + o, lo, hi, np.float32(1.0) / total, vlo_b, vhi_b)


@kernel(HEADS32_SIGNATURE, fastmath={"contract", "reassoc"})
def attention_blocks(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out):
    # `attention` for heads of 32, as attention_rows, eight query rows at a time: the sequences of blocks_from
    # tokens or more (none under first_only)
    scale = np.float32(1.0 / np.sqrt(np.float32(HEAD)))
    blocked = np.int64(0)  # the longest of them
    for s in range(starts.shape[0]):
        if not first_only and lengths[s] >= blocks_from:
            blocked = max(blocked, lengths[s])
    widest = (blocked + 15) // 16 * 16
    most = (blocked + QUERIES - 1) // QUERIES * QUERIES
    kt = np.empty(HEAD * widest, dtype=np.float32)  # [32, width]: one head's keys
    q = np.empty(most * HEAD, dtype=np.float32)  # [rows, 32]: its queries
    p = np.empty(most * widest, dtype=np.float32)  # [rows, width]: their scores, then weights
    bits = np.empty(most * widest, dtype=np.int32)
    inv = np.empty(most, dtype=np.float32)
    pad = np.empty(widest, dtype=np.float32)
    local = np.empty((blocked, qkv.shape[1]), dtype=np.float32)  # one sequence's rows, near the core for every head
    for s in range(starts.shape[0]):  # (written out here, not in a helper: one level of LLVM less to compile)
        start, n = starts[s], lengths[s]
        if first_only or n < blocks_from:
            continue
        width = (n + 15) // 16 * 16
        for j in range(width):
            pad[j] = 0.0 if j < n else -np.inf
        queries = n
        rows = (queries + QUERIES - 1) // QUERIES * QUERIES
        # a contiguous copy first: each head reads 128 bytes of every row, which from a batch's qkv (a few MB,
        # in L3 at best) costs a cache miss per row and head (1024 tokens of 16-token sequences: 3.6x slower)
        seq = local[:n]
        for j in range(n):
            for c in range(qkv.shape[1]):
                seq[j, c] = qkv[start + j, c]
        for h in range(num_heads):
            o = h * HEAD
            _head_inputs(seq, qkv_b, n, queries, o, width, scale, kt, q)
            for i in range(0, rows, QUERIES):
                _scores8(kt, q, i, width, p)
            _shift_rows(p, rows, width, pad)
            exp_nonpositive(p[: rows * width], bits[: rows * width])
            _row_sums(p, rows, width, inv)
            for i in range(0, queries, QUERIES):
                _values8(seq, qkv_b, start, n, queries, i, o, width, p, inv, out)


@first_call_kernel(SIGNATURE, fastmath={"contract", "reassoc"})
def attention_any(qkv, qkv_b, starts, lengths, num_heads, first_only, out):
    # `attention` for any head size, by dot products along the head dimension (keys row-major, every head's at
    # once): compiled at its first call, as only a model whose heads are not 32 wide calls it
    hidden = out.shape[1]
    d = hidden // num_heads
    longest = np.int64(0)
    for s in range(starts.shape[0]):
        longest = max(longest, lengths[s])
    scale = np.float32(1.0 / np.sqrt(d))
    k = np.empty((longest, hidden), dtype=np.float32)  # keys of one sequence, every head, bias added
    q = np.empty(hidden, dtype=np.float32)  # one query row, every head, bias added and scaled
    p_buf = np.empty(longest, dtype=np.float32)  # scores, then probabilities, of one (query row, head)
    bits = np.empty(longest, dtype=np.int32)  # scratch for exp
    acc = np.empty(d, dtype=np.float32)
    for s in range(starts.shape[0]):
        start, n = starts[s], lengths[s]
        p = p_buf[:n]
        for j in range(n):
            for c in range(hidden):
                k[j, c] = qkv[start + j, hidden + c] + qkv_b[hidden + c]
        for i in range(1 if first_only else n):
            for c in range(hidden):
                q[c] = (qkv[start + i, c] + qkv_b[c]) * scale
            for h in range(num_heads):
                o, vo = h * d, 2 * hidden + h * d
                for j in range(n):  # scores: one dot product of length d per key
                    t = np.float32(0.0)
                    for c in range(d):
                        t += q[o + c] * k[j, o + c]
                    p[j] = t
                m = p[0]
                for j in range(1, n):
                    m = max(m, p[j])
                for j in range(n):
                    p[j] -= m
                exp_nonpositive(p, bits[:n])
                total = np.float32(0.0)
                for j in range(n):
                    total += p[j]
                inv = np.float32(1.0) / total
                for c in range(d):
                    acc[c] = 0.0
                for j in range(n):  # weighted sum of the values: [n] x [n, d] -> [d]
                    pj = p[j]
                    for c in range(d):
                        acc[c] += pj * qkv[start + j, vo + c]
                for c in range(d):  # the values' bias, added once: the weights sum to 1
                    out[start + i, o + c] = acc[c] * inv + qkv_b[vo + c]



def attention(qkv, qkv_b, starts, lengths, num_heads, first_only, out, blocks_from=VECTOR_FROM):
    """qkv [tokens, 3 * hidden] (query | key | value, bias not yet added), qkv_b [3 * hidden], starts, lengths
    [sequences], out [tokens, hidden] <- per sequence and head h: softmax(q_h k_h^T / sqrt(d)) v_h (rows of out
    outside the given sequences are left as they are). first_only: only each sequence's first query row (its
    [CLS] token) is computed and written, over all of its keys and values. Heads of 32 take `attention_rows`
    below blocks_from tokens and `attention_blocks` from there (the plan's `blocks_from`, measured per machine),
    any other size `attention_any`."""
    hidden = getattr(out, "shape", (0, 0))[-1]
    if hidden == HEAD * num_heads and getattr(qkv, "shape", (0, 0))[-1] == 3 * hidden:
        attention_rows(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out)
        if not first_only:
            attention_blocks(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out)
    else:
        attention_any(qkv, qkv_b, starts, lengths, num_heads, first_only, out)


@kernel("void(f4[:, :, ::1], f4)", fastmath={"contract", "reassoc"})
def softmax_rows(x, scale):  # [heads, n, n] raw scores -> softmax(x * scale) along the last axis, in place
    n = x.shape[2]
    bits = np.empty(n, dtype=np.int32)
    for h in range(x.shape[0]):
        for i in range(x.shape[1]):
            row = x[h, i]
            m = row[0]
            for j in range(n):
                m = max(m, row[j])
            for j in range(n):
                row[j] = (row[j] - m) * scale
            exp_nonpositive(row, bits)
            total = np.float32(0.0)
            for j in range(n):
                total += row[j]
            inv = np.float32(1.0) / total
            for j in range(n):
                row[j] *= inv
