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

from edge_runtime.backends.jit import kernel, popcount32


@kernel()
def _compact(mask, idx):
    n = 0
    for r in range(mask.shape[0]):
        if mask[r]:
            idx[n] = r
            n += 1
    return n


@kernel(inline=True)
def _sign_words(x, xs):
    """xs (W,) uint32: bit j of word c set where x[32c + j] < 0."""
    d = x.shape[0]
    for c in range(xs.shape[0]):
        w = np.uint32(0)
        for j in range(32):
            i = 32 * c + j
            if i < d and x[i] < 0:
                w |= np.uint32(1) << np.uint32(j)
        xs[c] = w


@kernel(inline=True)
def _sparseinfer_active(gate_signs, xs, r, alpha, d):
    """Row r predicted active: its sign mismatches with x, N_neg, at most alpha * (d - N_neg)."""
    neg = 0
    for c in range(xs.shape[0]):
        neg += popcount32(gate_signs[r, c] ^ xs[c])
    return np.float64(neg) <= alpha * np.float64(d - neg)


@kernel(parallel=True)
def _sparseinfer_mask(x, gate_signs, alpha, xs, mask):
    _sign_words(x, xs)
    for r in prange(gate_signs.shape[0]):
        mask[r] = _sparseinfer_active(gate_signs, xs, r, alpha, x.shape[0])


@kernel()
def sparseinfer_serial(x, gate_signs, alpha, xs, idx):
    """sparseinfer on the calling thread, compacting as it goes (the fused decode step); returns the count."""
    _sign_words(x, xs)
    n = 0
    for r in range(gate_signs.shape[0]):
        if _sparseinfer_active(gate_signs, xs, r, alpha, x.shape[0]):
            idx[n] = r
            n += 1
    return n


def sparseinfer(x, gate_signs, alpha: float, xs, mask, idx) -> int:
    """Active rows into idx; xs (W,) uint32 scratch. Returns the count."""
    _sparseinfer_mask(x, gate_signs, alpha, xs, mask)
    return _compact(mask, idx)


@kernel()
def _byte_table(x, table):
    """table[c, b] = sum of x[8c + j] for the set bits j of b (x read as 0 past its end). Built by doubling:
    the entries with highest bit j are those below 2^j plus x[8c + j], a contiguous (vectorised) add."""
    d = x.shape[0]
    for c in range(table.shape[0]):
        table[c, 0] = 0.0
        for j in range(8):
            i = 8 * c + j
            v = x[i] if i < d else np.float32(0.0)
            half = 1 << j
            for b in range(half):
                table[c, half + b] = table[c, b] + v


@kernel(inline=True)
def _sum(x):
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i]
    return total


@kernel(inline=True)
def _projection_span(sign_bytes, table, total, lo, hi, z):
    """z[r] = x . sign(w_r) = sum(x) - 2 * (the x of row r's negative weights) for lo <= r < hi, a table lookup
    per byte; four rows at a time, four independent chains of adds (one row's lookups are a serial chain)."""
    nb = sign_bytes.shape[1]
    r = lo
    while r + 4 <= hi:
        n0 = n1 = n2 = n3 = np.float32(0.0)
        for c in range(nb):
            n0 += table[c, sign_bytes[r, c]]
            n1 += table[c, sign_bytes[r + 1, c]]
            n2 += table[c, sign_bytes[r + 2, c]]
            n3 += table[c, sign_bytes[r + 3, c]]
        z[r], z[r + 1] = total - np.float32(2.0) * n0, total - np.float32(2.0) * n1
        z[r + 2], z[r + 3] = total - np.float32(2.0) * n2, total - np.float32(2.0) * n3
        r += 4
    for rr in range(r, hi):
        neg = np.float32(0.0)
        for c in range(nb):
            neg += table[c, sign_bytes[rr, c]]
        z[rr] = total - np.float32(2.0) * neg


SPAN = 64  # rows per parallel work item


@kernel(parallel=True, reassociate=False)
def projection_z(x, sign_bytes, table, z):
    """z (N,) = x . sign(w_r); sign_bytes (N, 4W) uint8 the sign plane's bytes (little-endian words)."""
    _byte_table(x, table)
    total = _sum(x)
    n = sign_bytes.shape[0]
    for b in prange((n + SPAN - 1) // SPAN):
        _projection_span(sign_bytes, table, total, b * SPAN, min(n, (b + 1) * SPAN), z)


@kernel(inline=True)
def rows_at_least(z, theta, idx):
    """The rows with z >= theta, ascending, into idx; returns their count."""
    n = 0
    for r in range(z.shape[0]):
        if z[r] >= theta[r]:
            idx[n] = r
            n += 1
    return n


@kernel(reassociate=False)
def projection_serial(x, sign_bytes, theta, table, z, idx):
    """projection on the calling thread (the fused decode step): z (N,) scratch; returns the count."""
    _byte_table(x, table)
    _projection_span(sign_bytes, table, _sum(x), 0, sign_bytes.shape[0], z)
    return rows_at_least(z, theta, idx)


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
