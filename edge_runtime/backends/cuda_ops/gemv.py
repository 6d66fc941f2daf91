"""Launchers for kernels/gemv.cu: y = W norm(x) + bias + residual, any packed encoding (fp16, int8, int4,
compressed rows), and two or three projections of one normed input in one launch (q, k, v; gate, up). Numpy twin:
CpuBackend.linear (after CpuBackend.norm)."""

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
        _check_input(x, k, norm_w, norm_b)
        check(y, np.float32, (n,), "y")
        check_opt(bias, np.float32, (n,), "bias")
        check_opt(residual, np.float32, (n,), "residual")
        if overlaps(x, y):
            raise EdgeRuntimeError("gemv: y must not overlap x")
        smem, name = row_smem(m), f"gemv_{m.kenc}"
        grid = row_grid(n, max_blocks=max_blocks, smem=smem, regs=self.m.info(name).registers)
        self.m.launch(name, grid, (THREADS,),
                      (*m.row_args(), x, norm_w, norm_b, f32(eps), bias, residual, i32(n), i32(k), i32(m.kp), y),
                      shared_mem=smem)

    def stacked(self, mats: tuple, x, ys: tuple, biases: tuple | None = None, norm_w=None, norm_b=None,
                eps: float = 1e-5, max_blocks: int | None = None) -> None:
        """ys[j] = mats[j] norm(x) + biases[j] for two or three matrices in one launch (attention's q, k, v; a
        dense FFN's gate and up): mats (N_j, K) of one encoding, K and int4 group (`compatible`); x (K,) fp32;
        ys (N_j,) fp32, overlapping neither x nor each other; biases (N_j,) fp32 or None; the norm as in __call__."""
        mats = tuple(as_matrix(m) for m in mats)
        biases = biases if biases is not None else (None,) * len(mats)
        if len(mats) not in (2, 3) or len(ys) != len(mats) or len(biases) != len(mats):
            raise EdgeRuntimeError("gemv stacked: want two or three matrices, with as many outputs and biases")
        if not compatible(mats):
            raise EdgeRuntimeError("gemv stacked: the matrices differ in encoding, K or group: "
                                   + ", ".join(f"{m.encoding}{m.shape}" for m in mats))
        first = mats[0]
        k = first.shape[1]
        first.check_row_kernel("gemv stacked")
        _check_input(x, k, norm_w, norm_b)
        args = []
        for j, (m, y, b) in enumerate(zip(mats, ys, biases, strict=True)):
            n = m.shape[0]
            check(y, np.float32, (n,), f"y{j}")
            check_opt(b, np.float32, (n,), f"bias{j}")
            if overlaps(x, y) or any(overlaps(y, other) for other in ys[:j]):
                raise EdgeRuntimeError("gemv stacked: an output overlaps x or another output")
            args += [m.w, m.scale, m.bitmap, m.row_offsets, b, y, i32(n)]
        if len(mats) == 2:  # the kernel's third matrix, empty: no row falls in it
            args += args[-7:-1] + [i32(0)]
        smem, name = row_smem(first), f"gemv3_{first.kenc}"
        rows = sum(m.shape[0] for m in mats)
        grid = row_grid(rows, max_blocks=max_blocks, smem=smem, regs=self.m.info(name).registers)
        self.m.launch(name, grid, (THREADS,),
                      (*args, i32(first.group), x, norm_w, norm_b, f32(eps), i32(k), i32(first.kp)), shared_mem=smem)


def _check_input(x, k: int, norm_w, norm_b) -> None:
    """x (K,) fp32 and the norm fused into its load: norm_w (K,) fp32 or None, norm_b (K,) only with norm_w."""
    check(x, np.float32, (k,), "x")
    check_opt(norm_w, np.float32, (k,), "norm_w")
    check_opt(norm_b, np.float32, (k,), "norm_b")
    if norm_b is not None and norm_w is None:
        raise EdgeRuntimeError("norm_b without norm_w")


def compatible(mats) -> bool:
    """Whether matrices can share one gemv3 launch: one encoding, input width and int4 group."""
    return len({(m.kenc, m.shape[1], m.kp, m.group) for m in mats}) == 1
