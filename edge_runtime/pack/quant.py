"""Weight encodings of the packed format and their exact dequantisation.

A matrix W of logical shape (N, K) (N output rows, K inputs) is stored as:
  fp32 / fp16  "w":     (N, K)       the values
  int8         "q":     (N, K) int8  round(W / s_row), s_row = max|W_row| / 127, symmetric
               "scale": (N,)   fp16  s_row
  int4         "q":     (N, Kp/2) uint8, Kp = K rounded up to the group; low nibble = even column,
                        high nibble = odd column, nibble = q + 8 with q in [-8, 7]
               "scale": (N, Kp/group) fp16, s = a * max|W_group| / 7 with a in INT4_SHRINK, the one whose
                        rounded and clipped values are nearest W_group (least squared error against the stored
                        fp16 scale): clipping a group's few largest values buys finer steps for the rest
Dequantisation multiplies in fp32 by the fp16 scale widened to fp32; every backend must do the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from edge_runtime.errors import ModelFormatError

ENCODINGS = ("fp32", "fp16", "int8", "int4")
STORED_ENCODINGS = ENCODINGS + ("sparse-fp16", "sparse-int8")  # what a manifest may name
DEFAULT_INT4_GROUP = 64
# Shrink factors of max|W_group| / 7 tried per int4 group. Against absmax alone (group 64, 4,096 tokens; README,
# scripts/int4_quality.py): stories260K's perplexity over fp32 +22.5 -> +12.7 % (Buster Brown), +14.8 -> +8.8 %
# (Alice), mean KL to fp32 -28 / -26 %. 1.0 first: a tie keeps absmax.
INT4_SHRINK = np.linspace(1.0, 0.7, 16)
INT4_ROWS = 1024  # rows searched at a time: working arrays of (rows, K) fp32, ~4 of them


@dataclass
class PackedTensor:
    """One logical 2-D weight in its stored encoding. Arrays may be read-only views of an mmap."""

    encoding: str
    shape: tuple[int, int]  # logical (N, K)
    arrays: dict[str, np.ndarray]
    group_size: int = 0  # int4 only
    meta: dict = field(default_factory=dict)
    # fp32 copy of the dequantised matrix, kept by the numpy backend for small models (numpy has no
    # int8/int4 GEMV): rows are still selected as the stored encoding would be read. None = not kept.
    f32: np.ndarray | None = field(default=None, repr=False)

    def keep_f32(self) -> None:
        if not self.sparse and self.encoding != "fp32":
            self.f32 = self.dequantize()

    @cached_property
    def nbytes(self) -> int:
        """Stored bytes (the arrays never change after construction; decode steps count with this)."""
        return sum(a.nbytes for a in self.arrays.values())

    def row_bytes(self) -> float:
        """Bytes read to use one full row (values plus its scales)."""
        return self.nbytes / self.shape[0]

    @property
    def sparse(self) -> bool:
        return self.encoding.startswith("sparse-")

    def _row_index(self, rows) -> np.ndarray:
        return np.arange(self.shape[0]) if rows is None else np.arange(self.shape[0])[rows]

    def matvec(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """W[rows] @ x for one input x (K,) -> (n,) fp32. Compressed rows are read as segments, never
        expanded to dense rows."""
        if not self.sparse:
            return self.dequantize(rows) @ x
        from edge_runtime.pack.sparse_weights import row_columns, values_f32

        r = self._row_index(rows)
        vals, lengths = values_f32(self.arrays, r)
        prods = vals * x[row_columns(self.arrays["bitmap"], self.shape[1], r)]
        out = np.zeros(len(r), dtype=np.float32)
        nonempty = lengths > 0
        if prods.size:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[nonempty]
            out[nonempty] = np.add.reduceat(prods, starts)
        return out

    def rows_weighted_sum(self, h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """sum_i h_i * W[rows_i] -> (K,) fp32: the down projection over the rows of W_down^T."""
        if not self.sparse:
            return h @ self.dequantize(rows)
        from edge_runtime.pack.sparse_weights import row_columns, values_f32

        vals, lengths = values_f32(self.arrays, rows)
        out = np.zeros(self.shape[1], dtype=np.float32)
        np.add.at(out, row_columns(self.arrays["bitmap"], self.shape[1], rows), vals * np.repeat(h, lengths))
        return out

    def dequantize(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """fp32 (n, K) for the selected rows (all rows when None)."""
        sel = slice(None) if rows is None else rows
        if self.f32 is not None:
            return self.f32[sel]
        n_cols = self.shape[1]
        if self.sparse:  # the reference and batched paths; decode uses matvec / rows_weighted_sum
            from edge_runtime.pack.sparse_weights import values_f32

            r = self._row_index(rows)
            mask = np.unpackbits(self.arrays["bitmap"][r], axis=1, bitorder="little")[:, :n_cols].astype(bool)
            dense = np.zeros((len(r), n_cols), dtype=np.float32)
            dense[mask] = values_f32(self.arrays, r)[0]
            return dense
        if self.encoding in ("fp32", "fp16"):
            return np.asarray(self.arrays["w"][sel], dtype=np.float32)
        if self.encoding == "int8":
            q = self.arrays["q"][sel].astype(np.float32)
            return q * self.arrays["scale"][sel].astype(np.float32)[:, None]
        if self.encoding == "int4":
            packed = self.arrays["q"][sel]
            q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.float32)
            q[:, 0::2] = (packed & 0x0F).astype(np.float32) - 8.0
            q[:, 1::2] = (packed >> 4).astype(np.float32) - 8.0
            scale = self.arrays["scale"][sel].astype(np.float32)
            q = q.reshape(q.shape[0], scale.shape[1], self.group_size) * scale[:, :, None]
            return q.reshape(q.shape[0], scale.shape[1] * self.group_size)[:, :n_cols]  # (0 rows too)
        raise ModelFormatError(f"unknown encoding {self.encoding!r}")


def quantize(w: np.ndarray, encoding: str, group_size: int = DEFAULT_INT4_GROUP) -> PackedTensor:
    """Encode an fp32 (N, K) matrix."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize wants a 2-D matrix, got shape {w.shape}")
    n, k = w.shape
    if encoding == "fp32":
        return PackedTensor("fp32", (n, k), {"w": w})
    if encoding == "fp16":
        return PackedTensor("fp16", (n, k), {"w": w.astype(np.float16)})
    if encoding == "int8":
        amax = np.abs(w).max(axis=1)
        scale = (amax / 127.0).astype(np.float16)
        s32 = scale.astype(np.float32)
        safe = np.where(s32 > 0, s32, 1.0)
        q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
        return PackedTensor("int8", (n, k), {"q": q, "scale": scale})
    if encoding == "int4":
        if group_size <= 0 or group_size % 2:
            raise ValueError(f"int4 group size must be a positive even number, got {group_size}")
        kp = -(-k // group_size) * group_size
        padded = np.zeros((n, kp), dtype=np.float32)
        padded[:, :k] = w
        groups = padded.reshape(n, kp // group_size, group_size)
        scale = np.concatenate([int4_scales(groups[r:r + INT4_ROWS]) for r in range(0, max(n, 1), INT4_ROWS)])
        q = _int4_values(groups, scale.astype(np.float32)).astype(np.int16).reshape(n, kp) + 8
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        return PackedTensor("int4", (n, k), {"q": packed, "scale": scale}, group_size=group_size)
    raise ValueError(f"unknown encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")


def _int4_values(groups: np.ndarray, s32: np.ndarray) -> np.ndarray:
    """(R, G, g) float32 q in [-8, 7] for groups (R, G, g) at scales s32 (R, G); a zero scale gives zeros."""
    safe = np.where(s32 > 0, s32, np.float32(1.0))
    return np.clip(np.rint(groups / safe[:, :, None]), -8, 7)


def int4_scales(groups: np.ndarray) -> np.ndarray:
    """(R, G) fp16 scale per group of groups (R, G, g) float32: of a * max|group| / 7 for a in INT4_SHRINK, rounded
    to fp16 as stored, the one whose values q (rounded, clipped to [-8, 7]) leave the least squared error; the
    first factor's where none is less. A scale past fp16's 65504 stays inf (its error is NaN, never less), for
    check_stored to refuse by name."""
    amax = np.abs(groups).max(axis=2)
    scale = best = None
    with np.errstate(over="ignore", invalid="ignore"):
        for a in INT4_SHRINK:
            s16 = (amax * np.float32(a / 7.0)).astype(np.float16)
            s32 = s16.astype(np.float32)
            err = np.square(_int4_values(groups, s32) * s32[:, :, None] - groups).sum(axis=2)
            if scale is None:
                scale, best = s16, err
                continue
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, s16, scale)
    return scale
