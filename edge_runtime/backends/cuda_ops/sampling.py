"""Launcher for kernels/sampling.cu: next-token choice on the device (the token id and the RNG counter written
into the step buffer). Semantics: edge_runtime/model/sampling.py Sampler, with a
counter-based RNG (device_uniform is its numpy twin) instead of numpy's generator."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import STEP_SIZE, Module, check, check_opt, i32
from edge_runtime.model.sampling import SamplingParams

_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def device_uniform(seed: int, counter: int) -> float:
    """The draw the kernel makes for this seed and step[STEP_RNG]: in [0, 1), 24 bits."""
    z = _splitmix64((seed & _M64) ^ _splitmix64(counter & 0xFFFFFFFF))
    return (z >> 40) / float(1 << 24)


def param_arrays(p: SamplingParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(params (4,) fp32 {temperature, top_p, repetition_penalty, 0}, iparams (4,) int32 {top_k, seed lo, seed hi,
    0}) to copy into the device buffers the captured graph reads (between replays: no recapture).
    A temperature above 0 but below fp32's normal range is raised to its smallest normal value, not rounded to 0:
    its limit shares the draw among tied maxima, as the cpu sampler does, where 0 (greedy) takes the lowest id."""
    temperature = max(p.temperature, float(np.finfo(np.float32).tiny)) if p.temperature > 0 else p.temperature
    params = np.array([temperature, p.top_p, p.repetition_penalty, 0.0], dtype=np.float32)
    seed &= _M64
    top_k = min(p.top_k, 2**31 - 1)  # past the vocabulary: off, as 0 is; larger would not fit the int32
    iparams = np.array([top_k, seed & 0xFFFFFFFF, seed >> 32, 0], dtype=np.uint32).view(np.int32)
    return params, iparams


class SampleKernel:
    def __init__(self):
        self.m = Module("sampling.cu")

    def __call__(self, logits, params, iparams, seen, work, step, ids, uniform=None, threads: int = 1024) -> None:
        """logits (V,) fp32; params (4,) fp32 and iparams (4,) int32 (param_arrays); seen (V,) uint8 history mask
        (the sampled id is marked); work (V,) fp32 scratch; step (STEP_SIZE,) int32 (token, pos, rng advanced);
        ids (n,) int32 (ids[draw counter] = the sampled id, the request's ids in order); uniform (1,) fp32 or None
        (the RNG). The position is not moved: Elementwise.advance is the step's last op."""
        v = logits.shape[0] if logits is not None else -1
        check(logits, np.float32, (v,), "logits")
        check(params, np.float32, (4,), "params")
        check(iparams, np.int32, (4,), "iparams")
        check(seen, np.uint8, (v,), "seen")
        check(work, np.float32, (v,), "work")
        check(step, np.int32, (STEP_SIZE,), "step")
        check(ids, np.int32, (-1,), "ids")
        check_opt(uniform, np.float32, (1,), "uniform")
        self.m.launch("sample", (1,), (threads,), (logits, i32(v), params, iparams, seen, uniform, work, step, ids,
                                                   i32(ids.shape[0])))
