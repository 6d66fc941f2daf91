"""The memory planner: which weight encoding fits this device with the KV cache for the context asked.
On an 8 GB Orin the OOM killer takes the whole desktop, so the plan never gambles: it refuses with a
message that says what would fit."""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.devices.profile import DeviceProfile
from edge_runtime.devices.sizes import kv_cache_bytes, model_bytes
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.config import ModelConfig

# Best quality first. After int4 come int8 values with unstructured weight pruning of the projections
# (convert --dtype int8 --weight-sparsity S): smaller than int4 only from about 60 % sparsity on (bitmap
# 1/8 B + kept values per weight), at a larger cost in quality, so they are offered only when int4 does
# not fit.
PREFERENCE = ("fp16", "int8", "int4", "int8+ws0.7", "int8+ws0.8")
GB = 1e9


def _split(encoding: str) -> tuple[str, float]:
    """"int8+ws0.6" -> ("int8", 0.6); "int4" -> ("int4", 0.0)."""
    if "+ws" in encoding:
        base, s = encoding.split("+ws")
        return base, float(s)
    return encoding, 0.0


@dataclass
class MemoryPlan:
    encoding: str
    needed_gb: dict[str, float]  # encoding -> weights + KV cache + 5 % activations/workspace
    budget_gb: float
    context: int


def needed_gb(cfg: ModelConfig, encoding: str, context: int) -> float:
    base, sparsity = _split(encoding)
    weights = model_bytes(cfg, base, weight_sparsity=sparsity)["total"]
    return (weights + kv_cache_bytes(cfg, context)) * 1.05 / GB


def plan_memory(cfg: ModelConfig, profile: DeviceProfile, context: int = 2048, encoding: str | None = None
                ) -> MemoryPlan:
    """The best-quality encoding that fits (or check the one asked for); refuse with what fits.
    Encodings: fp16, int8, int4, or "int8+wsS" (int8 values, weight sparsity S)."""
    budget = profile.usable_memory_gb()
    needs = {e: needed_gb(cfg, e, context) for e in PREFERENCE}
    fits = [e for e in PREFERENCE if needs[e] <= budget]
    detail = ", ".join(f"{e} {needs[e]:.2f} GB" for e in PREFERENCE)
    where = (f"{profile.name} leaves {budget:.2f} GB ({profile.memory_total_gb} GB total - "
             f"{profile.memory.reserve_gb} reserved - {profile.memory.runtime_overhead_gb} runtime)")
    if encoding is not None:
        if encoding not in needs:
            raise EdgeRuntimeError(f"unknown encoding {encoding!r}; choose one of {', '.join(PREFERENCE)}")
        if needs[encoding] > budget:
            alt = f"{fits[0]} fits" if fits else "nothing fits; use a smaller model or a shorter context"
            raise EdgeRuntimeError(f"{encoding} needs {needs[encoding]:.2f} GB with a {context}-token KV cache but "
                                   f"{where}; {alt} (needs: {detail})")
        return MemoryPlan(encoding, needs, budget, context)
    if not fits:
        raise EdgeRuntimeError(f"this model does not fit: {where}; needs with a {context}-token KV cache: {detail}; "
                               f"use a shorter context or a smaller model")
    return MemoryPlan(fits[0], needs, budget, context)
