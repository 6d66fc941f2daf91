"""What conversion refuses to store: weights that are not finite in the checkpoint, and weights that the chosen
encoding cannot hold. fp16 storage (fp16 weights; the fp16 scales of int8 and int4; norm vectors, but Gemma's
folded 1 + w, and embeddings unless --dtype fp32) turns values past 65504 into inf and loses values below about
6e-8 to zero. A model packed from either loads, then answers garbage (or stops with a NumericalError at its first
token)."""

from __future__ import annotations

import numpy as np

from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.quant import PackedTensor

# Relative error (Frobenius) above which a stored tensor no longer stands for its source. Rounding to the
# encodings themselves stays far below: about 0.003 for fp16, 0.01 for int8, 0.1 for int4 on trained weights.
LOST = 0.5
ROWS = 1024


def check_finite(where: str, name: str, w: np.ndarray) -> None:
    """w: a checkpoint tensor as read (fp32)."""
    bad = int(np.count_nonzero(~np.isfinite(w)))
    if bad:
        raise ModelFormatError(f"{where}: tensor {name} holds {bad} NaN or infinite value(s) of {w.size}: the "
                               f"checkpoint is damaged")


def check_stored(where: str, name: str, w: np.ndarray, stored: PackedTensor | np.ndarray, encoding: str) -> None:
    """w: the source, fp32 (N, K) or (N,); stored: its packed matrix (dequantised 1,024 rows at a time: a 7B
    embedding whole would be another 0.5 GB), or the stored vector."""
    sq_err = 0.0
    for r0 in range(0, max(len(w), 1), ROWS):
        rows = slice(r0, r0 + ROWS)
        with np.errstate(over="ignore", invalid="ignore"):  # an inf scale times a 0 weight: said below, by name
            back = stored.dequantize(rows) if isinstance(stored, PackedTensor) else np.asarray(stored[rows],
                                                                                                np.float32)
            if not np.isfinite(back).all():
                raise ModelFormatError(f"{where}: tensor {name} has values up to {float(np.abs(w).max()):.3g}, past "
                                       f"the 65504 that fp16 holds, and --dtype {encoding} stores them in fp16 "
                                       f"(weights, scales, norms or embeddings): convert with --dtype fp32")
        sq_err += float(np.square(back - w[rows], dtype=np.float64).sum())
    norm = float(np.linalg.norm(w))
    err = np.sqrt(sq_err) / norm if norm > 0 else 0.0
    if err > LOST:
        raise ModelFormatError(f"{where}: tensor {name} would be stored with {err:.0%} error: its values (largest "
                               f"{float(np.abs(w).max()):.3g}) are too small for the fp16 that --dtype {encoding} "
                               f"stores them or their scales in: convert with --dtype fp32")


def check_compressed(where: str, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Compressed rows (--weight-sparsity): their fp16 values or scales checked for overflow only."""
    if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
        raise ModelFormatError(f"{where}: tensor {name} has values past the 65504 that fp16 holds, and compressed "
                               f"rows store fp16 values or scales: convert it without --weight-sparsity, with "
                               f"--dtype fp32")
