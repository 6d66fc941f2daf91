"""Launcher for kernels/teal.cu: TEAL column skipping over a transposed weight (Wt (K, N)), the threshold read
from device memory. Numpy twin: CpuBackend.linear(x, lin, teal=t)."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import (
    COL_THREADS,
    DeviceMatrix,
    Module,
    as_matrix,
    check,
    check_opt,
    column_grid,
    i32,
    overlaps,
)
from edge_runtime.errors import EdgeRuntimeError


class TealGemv:
    def __init__(self):
        self.m = Module("teal.cu")

    def __call__(self, wt: DeviceMatrix, x, xs, thr, y, bias=None, accumulate: bool = False, splits: int | None = None,
                 kept=None) -> None:
        """y (N,) = [y +] W mask(x) + bias with Wt = W^T packed (K, N) fp32 | fp16 | int8 | int4, or an int8
        weight's columns as stored (DeviceMatrix.int8_columns); x (K,) fp32; xs (K,) fp32 channel factors
        (ones: TEAL, column norms: WINA); thr (1,) fp32 device threshold (channels with |x| * xs < thr skipped;
        0 = dense); bias (N,) fp32 or None. accumulate=False zeroes y first (a memset, capturable); True adds
        into y (e.g. y is the residual). kept (1,) uint64 or None: the number of channels kept is added to it
        (statistics). splits: channel splits (None: column_grid's choice)."""
        wt = as_matrix(wt)
        if wt.sparse:
            raise EdgeRuntimeError("TEAL kernels read dense transposed weights (fp16, int8, int4)")
        k, n = wt.shape
        wt.check_column_kernel("teal")
        check(x, np.float32, (k,), "x")
        check(xs, np.float32, (k,), "xs")
        check(thr, np.float32, (1,), "thr")
        check(y, np.float32, (n,), "y")
        check_opt(bias, np.float32, (n,), "bias")
        check_opt(kept, np.uint64, (1,), "kept")
        if overlaps(x, y):  # blocks would read x while others add into y
            raise EdgeRuntimeError("teal: y must not overlap x")
        if not accumulate:
            y.fill(0)
        self.m.launch(f"teal_gemv_{wt.kenc}", column_grid(n, k, splits), (COL_THREADS,),
                      (wt.w, wt.scale, i32(wt.group), i32(k), i32(n), i32(wt.kp), x, xs, thr, bias, y, kept))
