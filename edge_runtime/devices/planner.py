"""The memory planner: which weight encoding fits this device with the KV cache for the context asked
(plan_memory, for convert --for-device and profile select), and whether a packed model can be loaded
now (plan_load: the profile's usable memory and the memory free at this moment). On an 8 GB Orin the
OOM killer takes the whole desktop, so the plan never gambles: it shortens the KV cache with a
warning, or refuses with a message that says what would fit."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

from edge_runtime.config import ModelConfig
from edge_runtime.devices.profile import DeviceProfile
from edge_runtime.devices.sizes import kv_cache_bytes, model_bytes
from edge_runtime.errors import EdgeRuntimeError

# Best quality first. After int4 come int8 values with unstructured weight pruning of the projections
# (convert --dtype int8 --weight-sparsity S): smaller than int4 only from about 60 % sparsity on (bitmap
# 1/8 B + kept values per weight), at a larger cost in quality, so they are offered only when int4 does
# not fit.
PREFERENCE = ("fp16", "int8", "int4", "int8+ws0.7", "int8+ws0.8")
GB = 1e9
WORKSPACE = 1.05  # activations, logits and backend workspace on top of weights + KV cache
MIN_CONTEXT = 256  # a KV budget below this is no use for chat: refuse instead
CONTEXT_STEP = 256  # a shortened KV budget is rounded down to a multiple of this


class KVBudgetWarning(UserWarning):
    """The full context did not fit; the KV cache was shortened (the message is one line)."""


def split_encoding(encoding: str) -> tuple[str, float]:
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


def needed_gb(cfg: ModelConfig, encoding: str, context: int, kv_dtype_bytes: int = 2) -> float:
    base, sparsity = split_encoding(encoding)
    weights = model_bytes(cfg, base, weight_sparsity=sparsity)["total"]
    return (weights + kv_cache_bytes(cfg, context, kv_dtype_bytes)) * WORKSPACE / GB


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


@dataclass
class LoadPlan:
    """What load() decided for one packed model on one device, for /health and profile select."""

    encoding: str
    weights_gb: float  # the packed files as stored
    asked_context: int
    context: int  # KV positions granted: asked_context, or fewer when memory is short
    needed_gb: float  # (weights + KV cache for `context`) x WORKSPACE
    budget_gb: float  # min(profile_gb, free_gb)
    profile_gb: float  # the profile's usable memory (total - reserve - runtime overhead)
    free_gb: float | None  # memory available now (psutil) less the CUDA context on unified boards
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def available_memory_bytes() -> int:
    """Memory the OS could hand out now (psutil's `available`: free plus reclaimable page cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


def available_memory_gb() -> float:
    return available_memory_bytes() / GB


def plan_load(cfg: ModelConfig, encoding: str, weights_bytes: int, profile: DeviceProfile, context: int,
              free_now_gb: float | None, kv_dtype_bytes: int = 2, extras: dict[str, int] | None = None) -> LoadPlan:
    """Check a packed model plus its KV cache for `context` positions against the profile's usable memory
    and the memory free now. Returns the plan (context shortened, with a KVBudgetWarning, when only a
    shorter KV cache fits) or raises naming what fits. On a unified-memory board (shared_with_cpu) the
    CUDA context and workspace (runtime_overhead_gb) come out of the same free memory, so they are
    subtracted from it; the profile's usable memory already leaves them out. extras: bytes the backend builds
    beside the weights, by what they are (counted with the weights, and named in the note)."""
    extras = extras or {}
    stored, weights_bytes = weights_bytes, weights_bytes + sum(extras.values())
    besides = "".join(f" + {what} ({b / GB:.2f} GB)" for what, b in extras.items())
    profile_gb = profile.usable_memory_gb()
    free_gb = None
    if free_now_gb is not None:
        free_gb = free_now_gb - (profile.memory.runtime_overhead_gb if profile.memory.shared_with_cpu else 0.0)
    budget = profile_gb if free_gb is None else min(profile_gb, free_gb)
    kept = "workspace" if profile.kind == "cpu" else "CUDA context and workspace"
    limit = (f"{profile.name} leaves {profile_gb:.2f} GB" if budget == profile_gb else
             f"{free_now_gb:.2f} GB is free now" + (f", {profile.memory.runtime_overhead_gb:g} GB of it for the {kept}"
                                                    if profile.memory.shared_with_cpu else ""))

    def need(c: int) -> float:
        return (weights_bytes + kv_cache_bytes(cfg, c, kv_dtype_bytes)) * WORKSPACE / GB

    per_token = kv_cache_bytes(cfg, 1, kv_dtype_bytes)
    room = int((budget * GB / WORKSPACE - weights_bytes) // per_token)
    shortened = min(context, room // CONTEXT_STEP * CONTEXT_STEP)
    plan = LoadPlan(encoding, stored / GB, context, context, need(context), budget, profile_gb, free_gb, "")
    if need(context) <= budget:
        plan.note = f"{encoding} weights{besides} + a {context}-token KV cache need {need(context):.2f} GB; {limit}"
        return plan
    if shortened >= min(MIN_CONTEXT, context):
        plan.context, plan.needed_gb = shortened, need(shortened)
        plan.note = (f"KV cache shortened from {context} to {shortened} tokens: {encoding} weights{besides} + the "
                     f"full context need {need(context):.2f} GB but {limit}")
        warnings.warn(plan.note, KVBudgetWarning, stacklevel=3)
        return plan
    alt = "nothing fits; use a smaller model"
    for c in dict.fromkeys((context, min(MIN_CONTEXT, context))):  # the full context first, then the shortest
        fits = [e for e in PREFERENCE if needed_gb(cfg, e, c, kv_dtype_bytes) <= budget]
        if fits:
            alt = f"{fits[0]} fits with a {c}-token context (convert --for-device {profile.name})"
            break
    raise EdgeRuntimeError(f"{encoding} weights{besides} need {need(min(MIN_CONTEXT, context)):.2f} GB even with a "
                           f"{min(MIN_CONTEXT, context)}-token KV cache but {limit}; {alt}")
