"""Compiled GEMV over dense weights as stored (fp32, fp16, int8 with per-row scale, int4 with group scales):
the decode step's projections, the sparse FFN's gate/up over selected rows, and down as an accumulation
over rows of W_down^T. Weights are read in their encoding and widened in registers; no dequantised copy.

Shapes and dtypes (N rows, K inputs):
  w      (N, K)      float32 | uint16 (fp16 bits) | int8          dense kernels
  scale  (N,)        uint16 fp16 bits (int8), or (0,) = none
  q      (N, Kp/2)   uint8, two nibbles (low = even column), value = nibble - 8; Kp = K rounded up to group
  gscale (N, Kp/g)   uint16 fp16 bits, one per group of g columns
  bias   (N,) float32, or (0,) = none
  x      (K,) float32; idx (>= n,) int32 rows to use; out (>= n,) float32: out[j] = W[idx[j]] . x + b[idx[j]]
  axpy:  h (>= n,) float32, out (K,) float32 = sum_j h[j] * W[idx[j]];
         part (threads, >= K) float32 (int4: (threads, 2, >= Kp/2)) per-thread partial sums, preallocated
         (jit.per_thread: each thread's row on cache lines of its own).
Reference semantics: PackedTensor.dequantize (pack/quant.py); accumulation in float32.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from edge_runtime.backends.jit import kernel, prefetch, sum_parts, widen

ROWS = 4  # rows per block: four independent dot products per pass over x keep more loads in flight
AHEAD = 4 * ROWS  # rows ahead whose cache lines a block asks for (about 2.5x the bandwidth of none, measured)
LINE = 64  # cache line bytes (x86-64, Cortex-A78)
SPAN = 16 * ROWS  # rows per parallel work item: several blocks per helper call (see _rows_span)


@kernel(inline=True)
def _prefetch_rows(w, idx, j, n):
    """Request the cache lines of rows idx[j:j+ROWS] (those below n) of W (N, K)."""
    row_bytes = w.shape[1] * w.strides[1]
    for t in range(j, min(j + ROWS, n)):
        base = idx[t] * w.strides[0]
        for o in range(0, row_bytes, LINE):
            prefetch(w, base + o)


# The spans index W two-dimensionally: a row view (w[r]) is a new array whose reference count numba raises and
# drops with atomic operations. For the same reason each call covers many blocks: the arrays passed to an inlined
# helper are counted once per call, which per block of four rows measured as twice the time of the product for
# a cache-resident matrix outside a parallel region.
@kernel(inline=True)
def _rows_span(w, scale, bias, x, idx, lo, hi, out, ahead):
    """out[j] = W[idx[j]] . x * scale + bias for lo <= j < hi, ROWS rows per pass over x (a lone row's dot
    product waits on one stream of loads; four interleaved streams reach about 1.5x the bandwidth from memory);
    the lines of the rows `ahead` positions on requested first (0: none)."""
    k = w.shape[1]
    scaled = scale.shape[0] > 0
    biased = bias.shape[0] > 0
    j = lo
    while j + ROWS <= hi:
        if ahead > 0:
            _prefetch_rows(w, idx, j + ahead, hi)
        i0, i1, i2, i3 = idx[j], idx[j + 1], idx[j + 2], idx[j + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for c in range(k):
            xc = x[c]
            a0 += widen(w[i0, c]) * xc
            a1 += widen(w[i1, c]) * xc
            a2 += widen(w[i2, c]) * xc
            a3 += widen(w[i3, c]) * xc
        if scaled:
            a0 *= widen(scale[i0])
            a1 *= widen(scale[i1])
            a2 *= widen(scale[i2])
            a3 *= widen(scale[i3])
        if biased:
            a0 += bias[i0]
            a1 += bias[i1]
            a2 += bias[i2]
            a3 += bias[i3]
        out[j], out[j + 1], out[j + 2], out[j + 3] = a0, a1, a2, a3
        j += ROWS
    for jj in range(j, hi):
        r = idx[jj]
        v = np.float32(0.0)
        for c in range(k):
            v += widen(w[r, c]) * x[c]
        v = v * widen(scale[r]) if scaled else v
        out[jj] = v + bias[r] if biased else v


@kernel(parallel=True)
def gemv_rows(w, scale, bias, x, idx, n, out):
    """out[j] = (W[idx[j]] . x) * scale[idx[j]] + bias[idx[j]] for j < n; fp32 / fp16-bits / int8 rows,
    SPAN rows at a time over the threads."""
    for b in prange((n + SPAN - 1) // SPAN):
        _rows_span(w, scale, bias, x, idx, b * SPAN, min(n, (b + 1) * SPAN), out, AHEAD)


@kernel(parallel=True)
def gemv_rows3(w0, s0, b0, o0, w1, s1, b1, o1, w2, s2, b2, o2, x, rows):
    """Every row of three matrices with the same input x in one parallel region (q, k, v; or gate, up with a
    third of no rows): o_i = W_i x * s_i + b_i. One fork and join instead of three; rows (>= max N,) int32
    0, 1, 2, ..."""
    n0, n1, n2 = w0.shape[0], w1.shape[0], w2.shape[0]
    c0, c1 = (n0 + SPAN - 1) // SPAN, (n1 + SPAN - 1) // SPAN
    c2 = (n2 + SPAN - 1) // SPAN
    for b in prange(c0 + c1 + c2):
        if b < c0:
            _rows_span(w0, s0, b0, x, rows, b * SPAN, min(n0, (b + 1) * SPAN), o0, AHEAD)
        elif b < c0 + c1:
            j = b - c0
            _rows_span(w1, s1, b1, x, rows, j * SPAN, min(n1, (j + 1) * SPAN), o1, AHEAD)
        else:
            j = b - c0 - c1
            _rows_span(w2, s2, b2, x, rows, j * SPAN, min(n2, (j + 1) * SPAN), o2, AHEAD)


@kernel()
def gemv_rows_serial(w, scale, bias, x, idx, n, out):
    """gemv_rows on the calling thread: for the fused decode step of a small model (cpu_fused.py), where a
    parallel region's launch costs more than the product."""
    _rows_span(w, scale, bias, x, idx, 0, n, out, AHEAD)


@kernel(inline=True)
def _axpy_range(w, scale, h, idx, lo, hi, acc, ahead):
    """acc (K,) += sum_{lo <= j < hi} h[j] * scale[idx[j]] * W[idx[j]], ROWS rows per load and store of acc;
    the lines of the rows `ahead` positions on requested first (0: none)."""
    k = w.shape[1]
    scaled = scale.shape[0] > 0
    j = lo
    while j + ROWS <= hi:
        if ahead > 0:
            _prefetch_rows(w, idx, j + ahead, hi)
        r0, r1, r2, r3 = idx[j], idx[j + 1], idx[j + 2], idx[j + 3]
        c0 = h[j] * widen(scale[r0]) if scaled else h[j]
        c1 = h[j + 1] * widen(scale[r1]) if scaled else h[j + 1]
        c2 = h[j + 2] * widen(scale[r2]) if scaled else h[j + 2]
        c3 = h[j + 3] * widen(scale[r3]) if scaled else h[j + 3]
        for c in range(k):
            acc[c] += c0 * widen(w[r0, c]) + c1 * widen(w[r1, c]) + c2 * widen(w[r2, c]) + c3 * widen(w[r3, c])
        j += ROWS
    for jj in range(j, hi):
        r = idx[jj]
        cj = h[jj] * widen(scale[r]) if scaled else h[jj]
        for c in range(k):
            acc[c] += cj * widen(w[r, c])


@kernel(parallel=True)
def axpy_rows(w, scale, h, idx, n, part, out):
    """out = sum_{j < n} h[j] * scale[idx[j]] * W[idx[j]]: rows split over threads, partial sums reduced."""
    nt = part.shape[0]
    for t in prange(nt):
        acc = part[t]
        acc[:] = 0.0
        _axpy_range(w, scale, h, idx, t * n // nt, (t + 1) * n // nt, acc, AHEAD)
    sum_parts(part, out)


@kernel()
def axpy_rows_serial(w, scale, h, idx, n, out):
    """axpy_rows on the calling thread, accumulating straight into out (the fused step)."""
    out[:] = 0.0
    _axpy_range(w, scale, h, idx, 0, n, out, AHEAD)


@kernel()
def _split_even_odd(x, xeo, xg):
    """x (K,) -> xeo (2, Kp/2): even columns, odd columns, zero beyond K (padding nibbles are 8 = 0);
    xg (Kp/g,): each group's sum of x, for the "- 8" of every nibble applied once per group."""
    half = xeo.shape[1]
    k = x.shape[0]
    gh = half // xg.shape[0]
    for i in range(half):
        xeo[0, i] = x[2 * i] if 2 * i < k else np.float32(0.0)
        xeo[1, i] = x[2 * i + 1] if 2 * i + 1 < k else np.float32(0.0)
    for g in range(xg.shape[0]):
        s = np.float32(0.0)
        for i in range(g * gh, (g + 1) * gh):
            s += xeo[0, i] + xeo[1, i]
        xg[g] = s


@kernel(parallel=True)
def _gemv_rows_int4(q, gscale, bias, xeo, xg, idx, n, out):
    gh = q.shape[1] // gscale.shape[1]  # bytes per group
    biased = bias.shape[0] > 0
    xe, xo = xeo[0], xeo[1]
    for j in prange(n):
        r = idx[j]
        row, srow = q[r], gscale[r]
        acc = np.float32(0.0)
        for g in range(gscale.shape[1]):
            part = np.float32(0.0)
            o = g * gh
            for b in range(gh):
                v = np.int32(row[o + b])  # int32, not uint8 arithmetic: the conversions vectorise
                part += np.float32(v & 15) * xe[o + b] + np.float32(v >> 4) * xo[o + b]
            acc += (part - np.float32(8.0) * xg[g]) * widen(srow[g])
        out[j] = acc + bias[r] if biased else acc


def gemv_rows_int4(q, gscale, bias, x, xeo, xg, idx, n, out):
    """out[j] = W[idx[j]] . x + bias[idx[j]] for int4 rows; xeo (2, Kp/2) and xg (Kp/g,) float32 scratch."""
    _split_even_odd(x, xeo, xg)
    _gemv_rows_int4(q, gscale, bias, xeo, xg, idx, n, out)


@kernel(parallel=True)
def axpy_rows_int4(q, gscale, h, idx, n, part, out):
    """out (K,) = sum_j h[j] * W[idx[j]] for int4 rows; part (threads, 2, Kp/2) even/odd partial sums."""
    gh = q.shape[1] // gscale.shape[1]
    ng = gscale.shape[1]
    nt = part.shape[0]
    k = out.shape[0]
    for t in prange(nt):
        acc = part[t]
        acc[:] = 0.0
        ae, ao = acc[0], acc[1]
        for j in range(t * n // nt, (t + 1) * n // nt):
            r = idx[j]
            row, srow = q[r], gscale[r]
            for g in range(ng):
                cg = h[j] * widen(srow[g])
                o = g * gh
                for b in range(gh):
                    v = np.int32(row[o + b])
                    ae[o + b] += cg * np.float32((v & 15) - 8)
                    ao[o + b] += cg * np.float32((v >> 4) - 8)
    for c in range(k):
        s = np.float32(0.0)
        for t in range(nt):
            s += part[t, c & 1, c >> 1]
        out[c] = s


@kernel()
def dense_rows(w, scale, ids, out):
    """out[i] = row ids[i] of W as float32 (embedding lookup); fp32 / fp16-bits / int8 rows."""
    scaled = scale.shape[0] > 0
    for i in range(ids.shape[0]):
        r = ids[i]
        s = widen(scale[r]) if scaled else np.float32(1.0)
        for c in range(w.shape[1]):
            out[i, c] = widen(w[r, c]) * s


@kernel()
def int4_rows(q, gscale, ids, out):
    """out[i] = row ids[i] of an int4 W as float32 (first K columns)."""
    gh = q.shape[1] // gscale.shape[1]
    k = out.shape[1]
    for i in range(ids.shape[0]):
        r = ids[i]
        for b in range(q.shape[1]):
            v = np.int32(q[r, b])
            s = widen(gscale[r, b // gh])
            if 2 * b < k:
                out[i, 2 * b] = np.float32((v & 15) - 8) * s
            if 2 * b + 1 < k:
                out[i, 2 * b + 1] = np.float32((v >> 4) - 8) * s
