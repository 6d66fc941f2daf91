"""Launcher for kernels/attention.cu: split-K (flash-decoding) attention of one token over the KV cache, GQA.
Numpy twin: CpuBackend.attention for T = 1 (after the cache append)."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import STEP_SIZE, Module, check, cupy, f32, i32
from edge_runtime.backends.cuda_ops.kv_cache import CACHE_DTYPES, check_tables
from edge_runtime.errors import EdgeRuntimeError


class DecodeAttention:
    """Shapes fixed at construction, workspace allocated once (paired with free()); every layer may share it.
    chunk: positions per block; the KV length is split into ceil(max_ctx / chunk) blocks per kv head, of which
    only those below the current length (read from the step buffer) do work. scale multiplies q k^T (default
    head_dim ** -0.5); softcap > 0 bends the scores to softcap * tanh(s / softcap)."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, max_ctx: int, chunk: int = 128,
                 threads: int = 128, scale: float | None = None, softcap: float = 0.0):
        if n_heads % n_kv_heads:
            raise EdgeRuntimeError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        if threads % 32 or chunk <= 0:
            raise EdgeRuntimeError("attention: threads must be a multiple of 32 and chunk positive")
        cp = cupy()
        self.m = Module("attention.cu")
        self.n_heads, self.n_kv, self.hd, self.max_ctx, self.chunk = n_heads, n_kv_heads, head_dim, max_ctx, chunk
        self.threads = threads
        self.scale = float(head_dim ** -0.5 if scale is None else scale)
        self.softcap = float(softcap)
        self.n_chunks = -(-max_ctx // chunk)
        self.part_m = cp.zeros((n_heads, self.n_chunks), dtype=cp.float32)  # (n_heads, n_chunks) chunk max
        self.part_l = cp.zeros((n_heads, self.n_chunks), dtype=cp.float32)  # (n_heads, n_chunks) sum of exp
        self.part_acc = cp.zeros((n_heads, self.n_chunks, head_dim), dtype=cp.float32)  # unnormalised outputs
        self.smem = 4 * (n_heads // n_kv_heads) * (head_dim + chunk)

    def __call__(self, q, k_cache, v_cache, step, out, window: int = 0, cos=None, sin=None) -> None:
        """q (n_heads * hd,) fp32; caches (n_kv, max_ctx, hd) fp32 | fp16 of one layer; attends to positions
        [lo, step[STEP_POS]], lo = max(0, pos + 1 - window) (window 0: 0); out (n_heads * hd,) fp32.
        cos, sin (n_pos, hd/2) fp32: q is rotated (RoPE) at the position as it is loaded (q itself unchanged);
        None: q is used as given."""
        if self.part_m is None:
            raise EdgeRuntimeError("DecodeAttention used after free()")
        shape = (self.n_kv, self.max_ctx, self.hd)
        dt = CACHE_DTYPES.get(np.dtype(k_cache.dtype)) if k_cache is not None else None
        if dt is None:
            raise EdgeRuntimeError("k_cache: want a float32 or float16 device array")
        check(k_cache, k_cache.dtype, shape, "k_cache")
        check(v_cache, k_cache.dtype, shape, "v_cache")
        check(q, np.float32, (self.n_heads * self.hd,), "q")
        check(out, np.float32, (self.n_heads * self.hd,), "out")
        check(step, np.int32, (STEP_SIZE,), "step")
        n_pos = check_tables(cos, sin, self.hd)
        self.m.launch(f"attn_partial_{dt}", (self.n_kv, self.n_chunks), (self.threads,),
                      (q, cos, sin, i32(n_pos), k_cache, v_cache, step, i32(self.n_heads), i32(self.n_kv),
                       i32(self.max_ctx), i32(self.hd), i32(self.chunk), f32(self.scale), f32(self.softcap),
                       i32(window), self.part_m, self.part_l, self.part_acc), shared_mem=self.smem)
        self.m.launch("attn_combine", (self.n_heads,), (max(32, min(256, -(-self.hd // 32) * 32)),),
                      (self.part_m, self.part_l, self.part_acc, step, i32(self.max_ctx), i32(self.chunk),
                       i32(self.n_chunks), i32(self.hd), out))

    def free(self) -> None:
        self.part_m = self.part_l = self.part_acc = None
