"""Launcher for kernels/embed.cu: the step's token (or position) row of a packed table, dequantised.
Numpy twin: CpuBackend.embed_tokens."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import (
    STEP_SIZE,
    STEP_TOKEN,
    DeviceMatrix,
    Module,
    as_matrix,
    check,
    f32,
    i32,
)
from edge_runtime.errors import EdgeRuntimeError


class EmbedKernel:
    def __init__(self):
        self.m = Module("embed.cu")

    def __call__(self, table: DeviceMatrix, step, out, slot: int = STEP_TOKEN, offset: int = 0,
                 accumulate: bool = False, scale: float = 1.0, threads: int = 256) -> None:
        """out (K,) fp32 = (out +) scale * table[step[slot] + offset]; table (N, K) fp16 | int8 | int4."""
        table = as_matrix(table)
        if table.sparse:
            raise EdgeRuntimeError("embedding tables are dense (fp16, int8, int4)")
        n, k = table.shape
        check(step, np.int32, (STEP_SIZE,), "step")
        check(out, np.float32, (k,), "out")
        if not 0 <= slot < STEP_SIZE:
            raise EdgeRuntimeError(f"step slot {slot} outside the step buffer")
        self.m.launch(f"embed_{table.kenc}", (-(-k // threads),), (threads,),
                      (table.w, table.scale, i32(table.group), i32(n), i32(k), i32(table.kp), step, i32(slot),
                       i32(offset), i32(int(accumulate)), f32(scale), out))
