"""Unstructured weight sparsity: pruning at conversion, and the compressed row format.

A pruned (N, K) matrix is stored per row as a bitmap of kept positions and the kept values packed in
row order, in fp16 or int8 (with the dense int8 scale of that row):
  "bitmap":      (N, ceil(K/8)) uint8, bit j of byte c = column 8c + j kept (LSB first)
  "values":      (nnz,) float16 | int8, row 0's kept values, then row 1's, ...
  "row_offsets": (N + 1,) int64, row r's values are values[row_offsets[r]:row_offsets[r + 1]]
  "scale":       (N,) float16, int8 only
GEMV reads this directly (a segment sum per row); a skipped row is a skipped segment. Pruning:
"magnitude" keeps the largest |W| of each row; "wanda" keeps the largest |W_ij| * ||X_j|| (input
activation norms from calibration text), also per row, as in Wanda.
"""

from __future__ import annotations

import numpy as np


def prune_mask(w: np.ndarray, sparsity: float, input_norms: np.ndarray | None = None) -> np.ndarray:
    """(N, K) bool of kept weights: per row, the top (1 - sparsity) by score."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"weight sparsity must be in [0, 1), got {sparsity}")
    score = np.abs(w) if input_norms is None else np.abs(w) * input_norms[None, :]
    k = w.shape[1]
    keep = k - int(round(sparsity * k))
    if keep >= k:
        return np.ones_like(w, dtype=bool)
    order = np.argpartition(-score, keep - 1, axis=1)[:, :keep]
    mask = np.zeros_like(w, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def compress(w: np.ndarray, mask: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """Arrays of the compressed format for the kept entries of w (N, K) fp32."""
    n, k = w.shape
    kept = np.where(mask, w, 0.0).astype(np.float32)
    bits = np.zeros((n, -(-k // 8) * 8), dtype=bool)
    bits[:, :k] = mask
    out = {"bitmap": np.packbits(bits, axis=1, bitorder="little"),
           "row_offsets": np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)}
    if encoding == "sparse-fp16":
        out["values"] = kept[mask].astype(np.float16)
    elif encoding == "sparse-int8":
        scale = (np.abs(kept).max(axis=1) / 127.0).astype(np.float16)
        s32 = scale.astype(np.float32)
        q = np.clip(np.rint(kept / np.where(s32 > 0, s32, 1.0)[:, None]), -127, 127).astype(np.int8)
        out["values"], out["scale"] = q[mask], scale
    else:
        raise ValueError(f"unknown sparse encoding {encoding!r}")
    return out


def _segments(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `values` of the selected rows' segments, and each segment's length."""
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    seg_start = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return seg_start + np.arange(total), lengths


def row_columns(bitmap: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """Column index of every kept entry of the selected rows, in storage order."""
    mask = np.unpackbits(bitmap[rows], axis=1, bitorder="little")[:, :k].astype(bool)
    return np.nonzero(mask)[1]


def values_f32(arrays: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept values of the selected rows as fp32 with their row scale applied, segment lengths)."""
    idx, lengths = _segments(arrays["row_offsets"], rows)
    vals = arrays["values"][idx].astype(np.float32)
    if "scale" in arrays:
        vals *= np.repeat(arrays["scale"][rows].astype(np.float32), lengths)
    return vals, lengths
