"""The cpu backend's one dispatch point for weight matrices: each PackedTensor gets the compiled kernels of
its encoding once, at load; the backend calls gemv / axpy / rows / matmul and never looks at encodings.

One token (decode) reads the weights as stored (cpu_gemv, cpu_sparse_rows), and so do a few (SMALL_BATCH), once
per token. More tokens (prefill, evaluation) are compute-bound: BLAS on fp32 rows, dequantised a block of rows at
a time (at most BLOCK_BYTES of fp32 alive), or on the fp32 copy small models keep (PackedTensor.keep_f32).
"""

from __future__ import annotations

import numpy as np

import edge_runtime.backends.cpu_gemv as dense
import edge_runtime.backends.cpu_sparse_rows as sparse
from edge_runtime.backends.blas_threads import blas_threads
from edge_runtime.backends.cpu_step_ops import teal_select
from edge_runtime.backends.jit import f16_bits, per_thread, threads_for, use_threads
from edge_runtime.backends.weights import COLUMN_ENCODINGS
from edge_runtime.pack.quant import PackedTensor

BLOCK_BYTES = 4 << 20  # fp32 rows dequantised at once by the batched path
# Up to this many tokens a batch reads the weights as stored, once per token (the decode kernels), instead of
# dequantising every matrix to fp32 for BLAS: a 110M-shaped int8 model's 4-token prompt took 46 ms that way,
# against 0.8 ms per decode step; the dequantising path wins past about 55 tokens there.
SMALL_BATCH = 32
NO_F32 = np.zeros(0, np.float32)
NO_U16 = np.zeros(0, np.uint16)


class MatrixKernels:
    """Kernels over one (N, K) PackedTensor. x (K,) float32 in, float32 out; buffers preallocated here."""

    def __init__(self, t: PackedTensor, threads: int):
        self.t = t
        n, k = self.shape = t.shape
        a = t.arrays
        self.all_rows = np.arange(n, dtype=np.int32)  # idx for "every row"
        self.threads = threads_for(t.nbytes, threads)
        self.blas_threads = threads  # the backend's count (blas_threads.py)
        self.kind = "sparse" if t.sparse else "int4" if t.encoding == "int4" else "dense"
        self.scale = f16_bits(a["scale"]) if "scale" in a else NO_U16  # (N,) or (N, groups) fp16 bits
        if self.kind == "sparse":
            self.bitmap, self.values, self.offsets = a["bitmap"], f16_bits(a["values"]), a["row_offsets"]
            self.part = per_thread(threads, k)
        elif self.kind == "int4":
            self.q = a["q"]
            self.xeo = np.zeros((2, self.q.shape[1]), np.float32)  # x split even/odd, zero padded
            self.xg = np.zeros(self.scale.shape[1], np.float32)  # x summed per group
            self.part = per_thread(threads, 2, self.q.shape[1])
        else:
            self.w = a["q"] if t.encoding == "int8" else f16_bits(a["w"])
            self.part = per_thread(threads, k)

    def gemv(self, x: np.ndarray, out: np.ndarray, idx: np.ndarray | None = None, n: int | None = None,
             bias: np.ndarray | None = None) -> None:
        """out[:n] = W[idx[:n]] @ x (+ bias[idx]); all rows when idx is None. x (K,), out (>= n,)."""
        if idx is None:
            idx, n = self.all_rows, self.shape[0]
        b = NO_F32 if bias is None else bias
        use_threads(self.threads)
        if self.kind == "dense":
            dense.gemv_rows(self.w, self.scale, b, x, idx, n, out)
        elif self.kind == "int4":
            dense.gemv_rows_int4(self.q, self.scale, b, x, self.xeo, self.xg, idx, n, out)
        else:
            sparse.sparse_gemv_rows(self.bitmap, self.values, self.offsets, self.scale, b, x, idx, n, out)

    def axpy(self, h: np.ndarray, out: np.ndarray, idx: np.ndarray | None = None, n: int | None = None) -> None:
        """out (K,) = sum_j h[j] * W[idx[j]] over j < n (all rows when idx is None)."""
        if idx is None:
            idx, n = self.all_rows, self.shape[0]
        use_threads(self.threads)
        if self.kind == "dense":
            dense.axpy_rows(self.w, self.scale, h, idx, n, self.part, out)
        elif self.kind == "int4":
            dense.axpy_rows_int4(self.q, self.scale, h, idx, n, self.part, out)
        else:
            sparse.sparse_axpy_rows(self.bitmap, self.values, self.offsets, self.scale, h, idx, n, self.part, out)

    def rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out (T, K) = rows ids (T,) of W as float32 (embedding lookup)."""
        if self.kind == "dense" and self.t.f32 is None:
            dense.dense_rows(self.w, self.scale, ids, out)
        elif self.kind == "int4" and self.t.f32 is None:
            dense.int4_rows(self.q, self.scale, ids, out)
        else:
            out[...] = self.t.dequantize(ids)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """(T, K) -> (T, N) = x W^T, for several tokens: BLAS over fp32 row blocks."""
        if self.t.f32 is None and len(x) <= SMALL_BATCH:
            return _per_token(self.gemv, x, self.shape[0])
        with blas_threads(self.blas_threads):
            if self.t.f32 is not None:
                return x @ self.t.f32.T
            n, k = self.shape
            out = np.empty((x.shape[0], n), np.float32)
            step = max(1, BLOCK_BYTES // (4 * k))
            for r in range(0, n, step):
                np.matmul(x, self.t.dequantize(slice(r, r + step)).T, out=out[:, r:r + step])
            return out

    def matmul_t(self, h: np.ndarray) -> np.ndarray:
        """(T, N) -> (T, K) = h W (the down projection over rows of W_down^T), for several tokens."""
        if self.t.f32 is None and len(h) <= SMALL_BATCH:
            return _per_token(self.axpy, h, self.shape[1])
        with blas_threads(self.blas_threads):
            if self.t.f32 is not None:
                return h @ self.t.f32
            n, k = self.shape
            out = np.zeros((h.shape[0], k), np.float32)
            step = max(1, BLOCK_BYTES // (4 * k))
            for r in range(0, n, step):
                out += h[:, r:r + step] @ self.t.dequantize(slice(r, r + step))
            return out


def _per_token(kernel, x: np.ndarray, width: int) -> np.ndarray:
    """(T, width) float32: kernel(x[t], out[t]) for each of the T rows of x (one-token gemv or axpy)."""
    out = np.empty((len(x), width), np.float32)
    for i, row in enumerate(np.ascontiguousarray(x, np.float32)):
        kernel(row, out[i])
    return out


class ColumnKernels:
    """TEAL column skipping over one (N, K) PackedTensor stored column-major (backends/weights.column_layout):
    only the rows of W^T of the input channels kept are read. Made between tokens, when a threshold is set.
      wt       (K, N) float32 | uint16 (fp16 bits) | int8: the stored values transposed (int8 without scales)
      colscale (N,) float32: int8's per-output-row scales, applied after the sum; (0,) otherwise
      idx, h   (K,) int32 / float32: kept channels and their values; part (threads, N) partial sums."""

    def __init__(self, t: PackedTensor, threads: int):
        n, k = t.shape
        if t.encoding not in COLUMN_ENCODINGS:
            raise ValueError(f"no column layout for {t.encoding} weights")
        w = t.arrays["q"] if t.encoding == "int8" else t.arrays["w"]
        self.wt = f16_bits(np.ascontiguousarray(np.asarray(w).T))
        self.colscale = (np.asarray(t.arrays["scale"], np.float32) if t.encoding == "int8" else NO_F32)
        self.idx, self.h = np.zeros(k, np.int32), np.zeros(k, np.float32)
        self.threads = threads_for(self.wt.nbytes, threads)
        self.part = per_thread(threads, n)

    def gemv(self, x: np.ndarray, scale: np.ndarray, threshold: np.float32, out: np.ndarray,
             bias: np.ndarray | None = None) -> int:
        """out (N,) = W mask(x) (+ bias), mask(x) = x where |x| * scale >= threshold (scale (K,): ones for TEAL,
        column norms for WINA); returns the channels kept."""
        m = teal_select(x, scale, threshold, self.idx, self.h)
        use_threads(self.threads)
        dense.axpy_rows(self.wt, NO_U16, self.h, self.idx, m, self.part, out)
        if self.colscale.shape[0]:
            out *= self.colscale
        if bias is not None:
            out += bias
        return m
