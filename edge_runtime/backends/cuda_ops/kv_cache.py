"""Launcher for kernels/kv_cache.cu (k rotated into the cache, v copied; q is rotated by the attention as it
loads it, kernels/attention.cu). The position is read from the step buffer; linear / llama3 scaling is in the
cos/sin tables (edge_runtime/model/rope.py rope_tables). Numpy twins: CpuBackend.rope, CpuBackend.attention's
cache write."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import STEP_SIZE, Module, check, i32
from edge_runtime.errors import EdgeRuntimeError

CACHE_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def check_tables(cos, sin, hd: int) -> int:
    """The rows of RoPE tables cos, sin (n_pos, hd/2) fp32 given together, or 0 when both are None."""
    if (cos is None) != (sin is None):
        raise EdgeRuntimeError("cos and sin go together")
    if cos is None:
        return 0
    n_pos = cos.shape[0] if cos.ndim == 2 else -1
    check(cos, np.float32, (n_pos, hd // 2), "cos")
    check(sin, np.float32, (n_pos, hd // 2), "sin")
    return n_pos


class KVAppendKernel:
    def __init__(self):
        self.m = Module("kv_cache.cu")

    def __call__(self, k, v, cos, sin, step, k_cache, v_cache, threads: int = 64) -> None:
        """k, v (n_kv * hd,) fp32 -> k_cache, v_cache (n_kv, max_ctx, hd) fp32 | fp16 (one layer) at position
        step[STEP_POS]; k rotated with cos, sin (n_pos, hd/2) fp32, or not at all when both are None."""
        if k_cache is None or k_cache.ndim != 3:
            raise EdgeRuntimeError("k_cache: want a (n_kv, max_ctx, hd) device array")
        n_kv, max_ctx, hd = k_cache.shape
        dt = CACHE_DTYPES.get(np.dtype(k_cache.dtype))
        if dt is None:
            raise EdgeRuntimeError(f"KV cache dtype {k_cache.dtype}: want float32 or float16")
        check(k_cache, k_cache.dtype, (n_kv, max_ctx, hd), "k_cache")
        check(v_cache, k_cache.dtype, (n_kv, max_ctx, hd), "v_cache")
        check(k, np.float32, (n_kv * hd,), "k")
        check(v, np.float32, (n_kv * hd,), "v")
        check(step, np.int32, (STEP_SIZE,), "step")
        n_pos = check_tables(cos, sin, hd)
        self.m.launch(f"kv_append_{dt}", (n_kv,), (threads,),
                      (k, v, cos, sin, step, i32(n_pos), i32(max_ctx), i32(hd), k_cache, v_cache))
