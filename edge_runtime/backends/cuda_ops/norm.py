"""Launcher for kernels/norm.cu: RMSNorm / LayerNorm of rows. Numpy twin: CpuBackend.norm. (Decode fuses the
norm into gemv and ffn_prepare; this is the stand-alone op.)"""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import Module, check, check_opt, f32, i32


class NormKernel:
    def __init__(self):
        self.m = Module("norm.cu")

    def __call__(self, x, w, b, eps: float, y, threads: int = 256) -> None:
        """x (rows, K) or (K,) fp32 -> y (same shape; may be x); w (K,) fp32; b (K,) fp32 (LayerNorm) or None."""
        shape = tuple(x.shape) if x is not None else (-1,)
        k = shape[-1]
        check(x, np.float32, shape, "x")
        check(w, np.float32, (k,), "w")
        check_opt(b, np.float32, (k,), "b")
        check(y, np.float32, shape, "y")
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        self.m.launch("norm_f32", (rows,), (threads,), (x, w, b, f32(eps), i32(k), y))
