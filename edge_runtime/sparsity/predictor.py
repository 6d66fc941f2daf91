"""SparseInfer's sign-bit predictor, numpy reference semantics shared by every backend.

For gate row r and input x (both length d), N_neg = #{i : sign(x_i) != sign(w_ri)} counted as
popcount(signs(x) XOR signs(w_r)); N_pos = d - N_neg. The row is predicted zero when
N_neg > alpha * N_pos. Larger alpha keeps more rows (more conservative); alpha = 1 is a majority vote.
A zero input or weight counts as positive (its sign bit is 0).
"""

from __future__ import annotations

import numpy as np

from edge_runtime.pack.signbits import count_negative_products, pack_signs


def predict_active(x: np.ndarray, gate_signs: np.ndarray, alpha: float) -> np.ndarray:
    """x (d,) float, gate_signs (N, ceil(d/32)) uint32 -> (N,) bool, True where predicted non-zero."""
    d = x.shape[-1]
    n_neg = count_negative_products(pack_signs(x), gate_signs)
    return n_neg <= alpha * (d - n_neg)


def predict_active_batch(x: np.ndarray, gate_signs: np.ndarray, alpha: float) -> np.ndarray:
    """x (T, d) -> (T, N) bool: predict_active for every row of x."""
    d = x.shape[-1]
    xs = pack_signs(x)  # (T, W)
    n_neg = np.stack([count_negative_products(row, gate_signs) for row in xs]) if len(xs) else np.zeros((0, 0))
    return n_neg <= alpha * (d - n_neg)


def keep_after_gate(g: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose computed gate survives the activation: g > 0 and, for FATReLU, g >= threshold."""
    return (g > 0) & (g >= threshold)
