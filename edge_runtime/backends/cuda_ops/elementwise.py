"""Launcher for kernels/elementwise.cu: residual add, activation times up, the step's position advance. Numpy
twins: the decoder's residual adds, CpuBackend._activate, CpuBackend.advance."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import STEP_SIZE, Module, check, check_opt, f32, i32
from edge_runtime.errors import EdgeRuntimeError

ACTIVATIONS = {"silu": 0, "relu": 1, "fatrelu": 2, "gelu_tanh": 3, "drelu": 4}


class Elementwise:
    def __init__(self):
        self.m = Module("elementwise.cu")

    def add(self, x, y, threads: int = 256) -> None:
        """x (n,) fp32 += y (n,) fp32."""
        n = x.shape[0] if x is not None else -1
        check(x, np.float32, (n,), "x")
        check(y, np.float32, (n,), "y")
        self.m.launch("add_f32", (-(-n // threads),), (threads,), (x, y, i32(n)))

    def softcap(self, x, cap: float, threads: int = 256) -> None:
        """x (n,) fp32 = cap * tanh(x / cap), in place; cap > 0."""
        n = x.shape[0] if x is not None else -1
        check(x, np.float32, (n,), "x")
        if not cap > 0:
            raise EdgeRuntimeError(f"softcap needs a positive cap, got {cap}")
        self.m.launch("softcap_f32", (-(-n // threads),), (threads,), (x, i32(n), f32(cap)))

    def advance(self, step) -> None:
        """step[STEP_POS] += 1 (step (STEP_SIZE,) int32, device)."""
        check(step, np.int32, (STEP_SIZE,), "step")
        self.m.launch("advance_pos", (1,), (32,), (step,))  # one warp, thread 0 writes

    def act_mul(self, g, u, h, activation: str, threshold: float = 0.0, threads: int = 256) -> None:
        """h (n,) = act(g) * u (u None: act(g)); activation silu | relu | fatrelu (threshold) | gelu_tanh |
        drelu (relu(g) * relu(u))."""
        if activation not in ACTIVATIONS:
            raise EdgeRuntimeError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        n = g.shape[0] if g is not None else -1
        check(g, np.float32, (n,), "g")
        check_opt(u, np.float32, (n,), "u")
        check(h, np.float32, (n,), "h")
        self.m.launch("act_mul", (-(-n // threads),), (threads,),
                      (g, u, i32(n), i32(ACTIVATIONS[activation]), f32(threshold), h))
