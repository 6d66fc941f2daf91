"""Sign-bit planes (SparseInfer): one bit per weight, bit j of uint32 word c set when element 32c+j < 0."""

from __future__ import annotations

import numpy as np


def pack_signs(m: np.ndarray) -> np.ndarray:
    """(..., K) float -> (..., ceil(K/32)) uint32, LSB first; padding bits are 0 (read as positive)."""
    neg = np.asarray(m) < 0
    k = neg.shape[-1]
    words = -(-k // 32)
    padded = np.zeros(neg.shape[:-1] + (words * 32,), dtype=bool)
    padded[..., :k] = neg
    as_bytes = np.packbits(padded, axis=-1, bitorder="little")  # (..., words*4) uint8, LSB first
    return np.ascontiguousarray(as_bytes).view("<u4").astype(np.uint32, copy=False)


def count_negative_products(x_signs: np.ndarray, w_signs: np.ndarray) -> np.ndarray:
    """N_neg per row: popcount(x XOR w) summed over words. (W,) and (N, W) uint32 -> (N,) int64."""
    return np.bitwise_count(np.bitwise_xor(w_signs, x_signs)).sum(axis=-1, dtype=np.int64)
