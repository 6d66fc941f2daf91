"""Device profiles: identity, power modes, a performance model and a memory policy, loaded from YAML
and validated field by field (an error names the file and the field).

Search path for profiles/<name>.yaml: $EDGE_RUNTIME_PROFILES, the checkout's profiles/ (beside the
package), then <prefix>/share/edge-runtime/profiles (where a wheel installs them).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_runtime.errors import EdgeRuntimeError

KINDS = ("jetson", "gpu", "cpu")


class ProfileError(EdgeRuntimeError):
    pass


@dataclass(frozen=True)
class PowerMode:
    id: int  # nvpmodel id on this board and release; look modes up by name, ids differ per release
    name: str
    watts: float | None  # budget named by the mode; None for MAXN (no cap)
    gpu_max_mhz: float
    cpu_cores_online: int
    cpu_max_mhz: float
    emc_max_mhz: float  # memory controller cap
    memory_bandwidth_gbs: float  # theoretical peak at that EMC cap


@dataclass(frozen=True)
class Performance:
    bandwidth_efficiency: float  # achievable fraction of the peak bandwidth for a streaming GEMV
    launch_overhead_us: float  # per kernel launch (or per graph node on replay)
    kernels_per_layer: int = 8  # launches a layer in the cuda decode step (Llama-style; Gemma-2 post norms add 4)
    measured: bool = False  # True when written by scripts/generate_profile.py on the device itself
    # GPU clock at or above which a streaming GEMV is limited by memory, not by issue rate; below it the
    # achievable bandwidth is taken to fall in proportion to the clock (a modelling assumption).
    saturating_gpu_mhz: float = 0.0


@dataclass(frozen=True)
class MemoryPolicy:
    reserve_gb: float  # left to the OS, desktop and other processes
    runtime_overhead_gb: float  # CUDA context, allocator slack, workspaces
    shared_with_cpu: bool = True  # Jetson: one LPDDR pool for CPU and GPU


@dataclass(frozen=True)
class DecodeTarget:
    """What the policy aims for when the user names no objective (see sparsity/policy.py).

    Speed: hold_top_mode (the projected time per token of the most conservative calibrated setting in
    the profile's fastest mode, so every slower mode spends quality to keep that speed) or a floor of
    tokens_per_s. Quality: quality_cap_pct, the held-out perplexity increase never exceeded unless the
    user passes a budget of their own."""

    hold_top_mode: bool = True
    tokens_per_s: float | None = None  # a floor for interactive use; replaces hold_top_mode when set
    quality_cap_pct: float = 1.0


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # jetson | gpu | cpu
    memory_total_gb: float
    compute_capability: float | None
    module_skus: tuple[str, ...]  # e.g. ("p3701-0005",): matched against /proc/device-tree/compatible
    power_modes: tuple[PowerMode, ...]
    default_power_mode: str
    performance: Performance
    memory: MemoryPolicy
    gpu_names: tuple[str, ...] = field(default_factory=tuple)  # NVML names matched (desktop GPUs)
    decode_target: DecodeTarget = field(default_factory=DecodeTarget)

    def _named(self, name: str) -> PowerMode | None:
        """The mode of that name, case-insensitive."""
        return next((m for m in self.power_modes if m.name.upper() == name.upper()), None)

    def has_mode(self, name: str) -> bool:
        return self._named(name) is not None

    def mode(self, name: str | None = None) -> PowerMode:
        """The mode of that name (case-insensitive), or the default mode."""
        found = self._named(name or self.default_power_mode)
        if found is not None:
            return found
        raise ProfileError(f"profile {self.name} has no power mode {name!r}; modes: "
                           f"{', '.join(m.name for m in self.power_modes)}")

    def effective_bandwidth(self, mode: str | None = None) -> float:
        """Bytes per second a decode step can expect in that mode: the EMC-capped peak, times the
        achievable fraction, times the clock factor when the GPU cap is under the saturating clock."""
        m = self.mode(mode)
        perf = self.performance
        clock = min(1.0, m.gpu_max_mhz / perf.saturating_gpu_mhz) if perf.saturating_gpu_mhz > 0 else 1.0
        return m.memory_bandwidth_gbs * 1e9 * perf.bandwidth_efficiency * clock

    def top_mode(self) -> PowerMode:
        """The mode with the highest effective bandwidth (the first listed among equals)."""
        return max(self.power_modes, key=lambda m: self.effective_bandwidth(m.name))

    def usable_memory_gb(self) -> float:
        return self.memory_total_gb - self.memory.reserve_gb - self.memory.runtime_overhead_gb

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["module_skus"], d["gpu_names"] = list(self.module_skus), list(self.gpu_names)
        d["power_modes"] = [dataclasses.asdict(m) for m in self.power_modes]
        return d


def _get(d: dict, key: str, types: type | tuple, where: str, optional: bool = False, default: Any = None) -> Any:
    if key not in d or d[key] is None:
        if optional:
            return default
        raise ProfileError(f"{where}: missing field '{key}'")
    value = d[key]
    if types is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, types) or isinstance(value, bool) and types is not bool:
        name = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise ProfileError(f"{where}: field '{key}' must be {name}, got {value!r}")
    if types is float and not math.isfinite(value):  # YAML's .nan and .inf are floats
        raise ProfileError(f"{where}: field '{key}' must be a finite number, got {value!r}")
    return value


def _known_fields(d: dict, cls: type, where: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse a key the dataclass does not have: a misspelt optional field (quality_cap for quality_cap_pct)
    would otherwise be ignored and its default used without a word."""
    known = [f.name for f in dataclasses.fields(cls)] + list(extra)
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}"
            raise ProfileError(f"{where}: unknown field {key!r}{hint}")


def _positive(value: float, where: str, key: str) -> float:
    if value <= 0:
        raise ProfileError(f"{where}: field '{key}' must be > 0, got {value}")
    return value


def _optional_positive(value: float | None, where: str, key: str) -> float | None:
    return None if value is None else _positive(value, where, key)


def _not_negative(value: float, where: str, key: str) -> float:
    if value < 0:
        raise ProfileError(f"{where}: field '{key}' must be >= 0, got {value}")
    return value


def parse_profile(data: Any, source: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is a YAML mapping")
    w = source
    _known_fields(data, DeviceProfile, w, extra=("measurements",))  # measurements: generate_profile.py's record
    kind = _get(data, "kind", str, w)
    if kind not in KINDS:
        raise ProfileError(f"{w}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    modes_raw = _get(data, "power_modes", list, w)
    if not modes_raw:
        raise ProfileError(f"{w}: field 'power_modes' is empty")
    modes = []
    for i, m in enumerate(modes_raw):
        mw = f"{w}: power_modes[{i}]"
        if not isinstance(m, dict):
            raise ProfileError(f"{mw} must be a mapping")
        _known_fields(m, PowerMode, mw)
        modes.append(PowerMode(
            id=_not_negative(_get(m, "id", int, mw), mw, "id"), name=_get(m, "name", str, mw),
            watts=_optional_positive(_get(m, "watts", float, mw, optional=True), mw, "watts"),
            gpu_max_mhz=_positive(_get(m, "gpu_max_mhz", float, mw), mw, "gpu_max_mhz"),
            cpu_cores_online=_positive(_get(m, "cpu_cores_online", int, mw), mw, "cpu_cores_online"),
            cpu_max_mhz=_positive(_get(m, "cpu_max_mhz", float, mw), mw, "cpu_max_mhz"),
            emc_max_mhz=_not_negative(_get(m, "emc_max_mhz", float, mw), mw, "emc_max_mhz"),  # 0: the SKU's top
            memory_bandwidth_gbs=_positive(_get(m, "memory_bandwidth_gbs", float, mw), mw, "memory_bandwidth_gbs"),
        ))
    names = [m.name.upper() for m in modes]
    if len(set(names)) != len(names):
        raise ProfileError(f"{w}: power mode names repeat")
    perf_raw = _get(data, "performance", dict, w)
    pw = f"{w}: performance"
    _known_fields(perf_raw, Performance, pw)
    eff = _get(perf_raw, "bandwidth_efficiency", float, pw)
    if not 0 < eff <= 1:
        raise ProfileError(f"{pw}: field 'bandwidth_efficiency' must be in (0, 1], got {eff}")
    perf = Performance(eff, _not_negative(_get(perf_raw, "launch_overhead_us", float, pw), pw, "launch_overhead_us"),
                       _positive(_get(perf_raw, "kernels_per_layer", int, pw, optional=True, default=8), pw,
                                 "kernels_per_layer"),
                       _get(perf_raw, "measured", bool, pw, optional=True, default=False),
                       _not_negative(_get(perf_raw, "saturating_gpu_mhz", float, pw, optional=True, default=0.0), pw,
                                     "saturating_gpu_mhz"))
    mem_raw = _get(data, "memory", dict, w)
    mwhere = f"{w}: memory"
    _known_fields(mem_raw, MemoryPolicy, mwhere)
    reserve, overhead = (_not_negative(_get(mem_raw, key, float, mwhere), mwhere, key)
                         for key in ("reserve_gb", "runtime_overhead_gb"))
    mem = MemoryPolicy(reserve, overhead, _get(mem_raw, "shared_with_cpu", bool, mwhere, optional=True, default=True))
    target = _decode_target(_get(data, "decode_target", dict, w, optional=True, default={}), f"{w}: decode_target")
    profile = DeviceProfile(
        name=_get(data, "name", str, w), description=_get(data, "description", str, w, optional=True, default=""),
        kind=kind, memory_total_gb=_positive(_get(data, "memory_total_gb", float, w), w, "memory_total_gb"),
        compute_capability=_get(data, "compute_capability", float, w, optional=True),
        module_skus=tuple(_get(data, "module_skus", list, w, optional=True, default=[])),
        power_modes=tuple(modes), default_power_mode=_get(data, "default_power_mode", str, w),
        performance=perf, memory=mem, gpu_names=tuple(_get(data, "gpu_names", list, w, optional=True, default=[])),
        decode_target=target)
    profile.mode(profile.default_power_mode)  # the default must name a mode
    if profile.usable_memory_gb() <= 0:
        raise ProfileError(f"{w}: memory_total_gb {profile.memory_total_gb:g} leaves nothing after reserve_gb "
                           f"{mem.reserve_gb:g} and runtime_overhead_gb {mem.runtime_overhead_gb:g}")
    return profile


def _decode_target(raw: dict, where: str) -> DecodeTarget:
    """Optional in the YAML (profiles written before it hold the top mode's speed within +1 %)."""
    _known_fields(raw, DecodeTarget, where)
    tps = _get(raw, "tokens_per_s", float, where, optional=True)
    hold = _get(raw, "hold_top_mode", bool, where, optional=True, default=tps is None)
    if hold == (tps is not None):
        raise ProfileError(f"{where}: give either 'hold_top_mode: true' or 'tokens_per_s', not both or neither")
    cap = _get(raw, "quality_cap_pct", float, where, optional=True, default=1.0)
    if cap < 0:
        raise ProfileError(f"{where}: field 'quality_cap_pct' must be >= 0, got {cap}")
    return DecodeTarget(hold, None if tps is None else _positive(tps, where, "tokens_per_s"), cap)


def profile_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("EDGE_RUNTIME_PROFILES"):
        own = Path(os.environ["EDGE_RUNTIME_PROFILES"])
        if not own.is_dir():  # a mistyped folder would silently leave the shipped profile of the same name in use
            raise ProfileError(f"EDGE_RUNTIME_PROFILES={own} is not a folder; name the folder holding your "
                               f"<name>.yaml profiles, or unset it")
        dirs.append(own)
    dirs.append(Path(__file__).resolve().parents[2] / "profiles")
    dirs.append(Path(sys.prefix) / "share" / "edge-runtime" / "profiles")
    return [d for d in dirs if d.is_dir()]


def list_profiles() -> list[str]:
    names: dict[str, None] = {}
    for d in profile_dirs():
        for p in sorted(d.glob("*.yaml")):
            names.setdefault(p.stem, None)
    return list(names)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        found = [d / f"{name_or_path}.yaml" for d in profile_dirs() if (d / f"{name_or_path}.yaml").is_file()]
        if not found:
            raise ProfileError(f"no device profile {name_or_path!r}; known: {', '.join(list_profiles()) or 'none'}")
        path = found[0]
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_profile(data, str(path))
