"""Activity predictors on the 1-bit sign plane of W_gate, numpy reference semantics for every backend.

SparseInfer (knob alpha): for row r and input x (length d), N_neg = popcount(signs(x) XOR signs(w_r))
counts the products x_i * w_ri that are negative; N_pos = d - N_neg. Row r is predicted zero when
N_neg > alpha * N_pos. Larger alpha keeps more rows (more conservative). Zeros count as positive.

Projection (knob q): z_r = sum_i x_i * sign(w_ri), the full-precision input projected on the signs
(= sum(x) - 2 * sum of x_i where the sign bit is set). Row r is predicted active when z_r >= theta_r,
theta_r the q-quantile of z_r over calibration tokens on which neuron r was truly active. Smaller q is
more conservative. Same memory as SparseInfer plus one threshold per neuron.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.pack.signbits import count_negative_products, pack_signs


def predict_active(x: np.ndarray, gate_signs: np.ndarray, alpha: float) -> np.ndarray:
    """SparseInfer. x (d,) float, gate_signs (N, ceil(d/32)) uint32 -> (N,) bool, True = predicted non-zero."""
    d = x.shape[-1]
    n_neg = count_negative_products(pack_signs(x), gate_signs)
    return n_neg <= alpha * (d - n_neg)


def alpha_for_density(x: np.ndarray, gate_signs: np.ndarray, density: float) -> float:
    """The SparseInfer alpha that lets through the ceil(density * N) rows of smallest N_neg / N_pos for this
    x (d,) (more where ratios tie), placed halfway to the next larger ratio: a float32 copy of it, as the
    kernels read it, still selects the same rows. Benchmarks impose densities with it."""
    d = x.shape[-1]
    n_neg = count_negative_products(pack_signs(x), gate_signs).astype(np.float64)
    ratio = np.sort(np.where(n_neg < d, n_neg / np.maximum(d - n_neg, 1), np.inf))  # inf: never active
    finite = ratio[np.isfinite(ratio)]
    if finite.size == 0:
        return 1.0  # every product negative in every row: no alpha lets a row through
    k = min(max(1, int(np.ceil(density * len(ratio)))), finite.size)
    edge = finite[k - 1]
    above = finite[finite > edge]
    return float((edge + above[0]) / 2 if above.size else edge + 1.0)


def negative_counts_batch(x: np.ndarray, gate_signs: np.ndarray, chunk: int = 64) -> np.ndarray:
    """(T, d) -> (T, N) int64 N_neg for every token; XOR and popcount broadcast over a chunk of tokens."""
    xs = pack_signs(x)  # (T, W)
    out = np.empty((len(xs), gate_signs.shape[0]), dtype=np.int64)
    for s in range(0, len(xs), chunk):
        both = np.bitwise_xor(xs[s:s + chunk, None, :], gate_signs[None, :, :])  # (t, N, W)
        out[s:s + chunk] = np.bitwise_count(both).sum(axis=-1, dtype=np.int64)
    return out


def predict_active_batch(x: np.ndarray, gate_signs: np.ndarray, alpha: float) -> np.ndarray:
    """x (T, d) -> (T, N) bool: predict_active for every row of x."""
    n_neg = negative_counts_batch(x, gate_signs)
    return n_neg <= alpha * (x.shape[-1] - n_neg)


def sign_matrix_bits(gate_signs: np.ndarray, d: int) -> np.ndarray:
    """(N, W) uint32 -> (N, d) float32 with 1.0 where the weight is negative."""
    as_bytes = np.ascontiguousarray(gate_signs).view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, :d].astype(np.float32)


def projection_scores(x: np.ndarray, gate_signs: np.ndarray) -> np.ndarray:
    """x (..., d) -> z (..., N) = x . sign(w_r) with sign(0) = +1."""
    d = x.shape[-1]
    bits = sign_matrix_bits(gate_signs, d)  # (N, d)
    return x.sum(axis=-1, keepdims=True) - 2.0 * (x @ bits.T)


def keep_after_gate(g: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose computed gate survives the activation: g > 0 and, for FATReLU, g >= threshold."""
    return (g > 0) & (g >= threshold)


@dataclass(frozen=True)
class Rule:
    """One layer's predictor setting, as the backends consume it."""

    kind: str  # "sparseinfer" | "projection"
    alpha: float = 1.0  # sparseinfer
    theta: np.ndarray | None = None  # projection: (N,) float32 per-neuron thresholds
    knob: float = 0.0  # the calibrated setting this rule came from (alpha or q), for reports

    def active(self, x: np.ndarray, gate_signs: np.ndarray) -> np.ndarray:
        """x (d,) -> (N,) bool; x (T, d) -> (T, N) bool."""
        if self.kind == "sparseinfer":
            if x.ndim == 1:
                return predict_active(x, gate_signs, self.alpha)
            return predict_active_batch(x, gate_signs, self.alpha)
        return projection_scores(x, gate_signs) >= self.theta
