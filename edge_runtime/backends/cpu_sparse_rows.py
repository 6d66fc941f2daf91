"""Compiled GEMV over compressed weight-sparse rows (pack/sparse_weights.py), read as stored: each row's
bitmap is walked a set bit at a time (count-trailing-zeros), its packed values widened in registers.

  bitmap  (N, ceil(K/8)) uint8, bit j of byte c = column 8c + j kept (LSB first); bits past K are 0
  values  (nnz,) int8 | uint16 (fp16 bits), row r's at values[offsets[r]:offsets[r + 1]]
  offsets (N + 1,) int64
  scale   (N,) uint16 fp16 bits (sparse-int8), or (0,) = none (sparse-fp16)
  bias    (N,) float32, or (0,) = none
  x (K,) float32; idx (>= n,) int32 rows; out (>= n,) float32; axpy: h (>= n,), part (threads, >= K), out (K,)
Reference semantics: PackedTensor.matvec / rows_weighted_sum (pack/quant.py).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from edge_runtime.backends.jit import ctz32, kernel, sum_parts, widen


@kernel(parallel=True)
def sparse_gemv_rows(bitmap, values, offsets, scale, bias, x, idx, n, out):
    """out[j] = compressed row idx[j] . x + bias[idx[j]] for j < n."""
    scaled = scale.shape[0] > 0
    biased = bias.shape[0] > 0
    for j in prange(n):
        r = idx[j]
        bits = bitmap[r]
        o = offsets[r]
        acc = np.float32(0.0)
        for c in range(bits.shape[0]):
            b = np.uint32(bits[c])
            while b:
                acc += widen(values[o]) * x[8 * c + ctz32(b)]
                o += 1
                b &= b - np.uint32(1)
        acc = acc * widen(scale[r]) if scaled else acc
        out[j] = acc + bias[r] if biased else acc


@kernel(parallel=True)
def sparse_axpy_rows(bitmap, values, offsets, scale, h, idx, n, part, out):
    """out = sum_{j < n} h[j] * compressed row idx[j]; rows split over threads, partial sums reduced."""
    nt = part.shape[0]
    scaled = scale.shape[0] > 0
    for t in prange(nt):
        acc = part[t]
        acc[:] = 0.0
        for j in range(t * n // nt, (t + 1) * n // nt):
            r = idx[j]
            bits = bitmap[r]
            o = offsets[r]
            cj = h[j] * widen(scale[r]) if scaled else h[j]
            for c in range(bits.shape[0]):
                b = np.uint32(bits[c])
                while b:
                    acc[8 * c + ctz32(b)] += cj * widen(values[o])
                    o += 1
                    b &= b - np.uint32(1)
    sum_parts(part, out)
