"""Launcher for kernels/gemv.cu: y = W norm(x) + bias + residual, any packed encoding (fp16, int8, int4,
compressed rows). Numpy twin: CpuBackend.linear (after CpuBackend.norm)."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import (
    THREADS,
    DeviceMatrix,
    Module,
    as_matrix,
    check,
    check_opt,
    f32,
    i32,
    overlaps,
    row_grid,
    row_smem,
)
from edge_runtime.errors import EdgeRuntimeError


class Gemv:
    def __init__(self):
        self.m = Module("gemv.cu")

    def __call__(self, m: DeviceMatrix, x, y, bias=None, residual=None, norm_w=None, norm_b=None, eps: float = 1e-5,
                 max_blocks: int | None = None) -> None:
        """m (N, K); x (K,) fp32; y (N,) fp32 out; bias, residual (N,) fp32 or None (residual may be y);
        norm_w (K,) fp32 fuses RMSNorm (norm_b None) or LayerNorm (norm_b (K,)) of x into the load."""
        m = as_matrix(m)
        n, k = m.shape
        m.check_row_kernel("gemv")
        check(x, np.float32, (k,), "x")
        check(y, np.float32, (n,), "y")
        check_opt(bias, np.float32, (n,), "bias")
        check_opt(residual, np.float32, (n,), "residual")
        check_opt(norm_w, np.float32, (k,), "norm_w")
        check_opt(norm_b, np.float32, (k,), "norm_b")
        if norm_b is not None and norm_w is None:
            raise EdgeRuntimeError("norm_b without norm_w")
        if overlaps(x, y):
            raise EdgeRuntimeError("gemv: y must not overlap x")
        smem = row_smem(m)
        self.m.launch(f"gemv_{m.kenc}", row_grid(n, max_blocks=max_blocks, smem=smem), (THREADS,),
                      (*m.row_args(), x, norm_w, norm_b, f32(eps), bias, residual, i32(n), i32(k), i32(m.kp), y),
                      shared_mem=smem)
