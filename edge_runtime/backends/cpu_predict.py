"""Compiled activity predictors over the 1-bit sign plane of W_gate, writing the active rows compacted.

  x          (d,) float32 the FFN input
  gate_signs (N, W) uint32, W = ceil(d/32); bit j of word c set = weight (r, 32c + j) negative
  idx        (N,) int32 out: active rows ascending in idx[:count]; count returned
  mask       (N,) uint8 scratch
SparseInfer: N_neg = popcount(signs(x) XOR signs(w_r)), active when N_neg <= alpha * (d - N_neg).
Projection: z_r = sum(x) - 2 * sum of x_i where bit i of row r is set, active when z_r >= theta_r; z is
read through a per-call table of every byte's partial sums (table (4W, 256) float32 scratch: entry
[c, b] = sum of x[8c + j] over the set bits j of b), 8 inputs per lookup.
Reference semantics: sparsity/predictor.py.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from edge_runtime.backends.jit import ctz32, kernel, popcount32


@kernel()
def _compact(mask, idx):
    n = 0
    for r in range(mask.shape[0]):
        if mask[r]:
            idx[n] = r
            n += 1
    return n


@kernel(parallel=True)
def _sparseinfer_mask(x, gate_signs, alpha, xs, mask):
    d = x.shape[0]
    for c in range(xs.shape[0]):
        w = np.uint32(0)
        for j in range(32):
            i = 32 * c + j
            if i < d and x[i] < 0:
                w |= np.uint32(1) << np.uint32(j)
        xs[c] = w
    for r in prange(gate_signs.shape[0]):
        row = gate_signs[r]
        neg = 0
        for c in range(xs.shape[0]):
            neg += popcount32(row[c] ^ xs[c])
        mask[r] = np.float64(neg) <= alpha * np.float64(d - neg)


def sparseinfer(x, gate_signs, alpha: float, xs, mask, idx) -> int:
    """Active rows into idx; xs (W,) uint32 scratch. Returns the count."""
    _sparseinfer_mask(x, gate_signs, alpha, xs, mask)
    return _compact(mask, idx)


@kernel()
def _byte_table(x, table):
    """table[c, b] = sum of x[8c + j] for the set bits j of b (x read as 0 past its end)."""
    d = x.shape[0]
    for c in range(table.shape[0]):
        table[c, 0] = 0.0
        for b in range(1, 256):
            j = 8 * c + ctz32(np.uint32(b))
            table[c, b] = table[c, b & (b - 1)] + (x[j] if j < d else np.float32(0.0))


@kernel(parallel=True)
def projection_z(x, sign_bytes, table, z):
    """z (N,) = x . sign(w_r); sign_bytes (N, 4W) uint8 the sign plane's bytes (little-endian words)."""
    _byte_table(x, table)
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i]
    for r in prange(sign_bytes.shape[0]):
        row = sign_bytes[r]
        neg = np.float32(0.0)
        for c in range(row.shape[0]):
            neg += table[c, row[c]]
        z[r] = total - np.float32(2.0) * neg


@kernel(parallel=True)
def _threshold(z, theta, mask):
    for r in prange(z.shape[0]):
        mask[r] = z[r] >= theta[r]


def projection(x, sign_bytes, theta, table, z, mask, idx) -> int:
    """Active rows (z >= theta) into idx; z (N,) float32 and table scratch. Returns the count."""
    projection_z(x, sign_bytes, table, z)
    _threshold(z, theta, mask)
    return _compact(mask, idx)


@kernel()
def keep_after_gate(g, rows, n, threshold, kept_rows, h):
    """Of n computed gates g[:n] for rows[:n], the survivors (g > 0 and g >= threshold) compacted into
    kept_rows / h; returns their count (sparsity/predictor.py keep_after_gate)."""
    m = 0
    for j in range(n):
        v = g[j]
        if v > 0 and v >= threshold:
            kept_rows[m] = rows[j]
            h[m] = v
            m += 1
    return m


@kernel()
def keep_positive_up(u, rows, m, h):
    """dReLU: of m kept rows with up values u[:m], those with u > 0 stay (compacted in place in rows / h,
    h[j] *= u[j]); returns their count. The rest are exact zeros of relu(g) * relu(u)."""
    k = 0
    for j in range(m):
        if u[j] > 0:
            rows[k] = rows[j]
            h[k] = h[j] * u[j]
            k += 1
    return k


@kernel()
def count_step(counters, rows, layer, predicted, kept, bytes_read, bytes_dense, up_dropped):
    """Advance layer's FFN statistics by one sparse step in one call; counters (fields, L) int64, rows (6,)
    int64: the counter rows of steps, predicted, kept, bytes_read, bytes_dense, up_dropped
    (sparsity/stats.py FIELDS)."""
    counters[rows[0], layer] += 1
    counters[rows[1], layer] += predicted
    counters[rows[2], layer] += kept
    counters[rows[3], layer] += bytes_read
    counters[rows[4], layer] += bytes_dense
    counters[rows[5], layer] += up_dropped
