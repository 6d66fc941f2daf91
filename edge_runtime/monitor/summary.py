"""Summaries of recorded samples: live rates for the terminal view and the Prometheus endpoint, and
the report's per-rail / load / memory / temperature figures."""

from __future__ import annotations

import numpy as np

from edge_runtime.monitor.recorder import energy_per_token


def live_rates(recorder, window_s: float = 5.0) -> dict:
    """tokens/s and J/token over the last window_s seconds of tokens."""
    tokens = list(recorder.token_times)
    if len(tokens) < 2:
        return {}
    recent = [t for t in tokens if t >= tokens[-1] - window_s]
    if len(recent) < 2:
        return {}
    out = {"tokens_per_s": (len(recent) - 1) / (recent[-1] - recent[0])}
    joules = energy_per_token(recorder.snapshot(), recent)
    if joules:
        out["joules_per_token"] = float(np.mean(joules))
    return out


def summarize(records: list[dict], token_times: list[float] | None = None) -> dict:
    """Per-rail mean and peak power (mW), mean CPU and GPU load, peak RAM, peak temperature per sensor,
    and, with token times, tokens/s, inter-token latency percentiles and J/token."""
    rails: dict[str, list[float]] = {}
    temps: dict[str, list[float]] = {}
    for r in records:
        for k, v in (r.get("rails_mw") or {}).items():
            rails.setdefault(k, []).append(v)
        for k, v in (r.get("temps_c") or {}).items():
            temps.setdefault(k, []).append(v)
    total = [r["power_mw"] for r in records if r.get("power_mw") is not None]

    def mean(key):
        vals = [r[key] for r in records if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    ram = [r["ram_used_mb"] for r in records if r.get("ram_used_mb") is not None]
    out = {
        "samples": len(records),
        "rails_mw": {k: {"mean": float(np.mean(v)), "peak": float(np.max(v))} for k, v in rails.items()},
        "total_mw": {"mean": float(np.mean(total)), "peak": float(np.max(total))} if total else None,
        "cpu_load_pct_mean": mean("cpu_load_pct"), "gpu_load_pct_mean": mean("gpu_load_pct"),
        "ram_used_mb_peak": float(np.max(ram)) if ram else None,
        "temps_c_peak": {k: float(np.max(v)) for k, v in temps.items()},
        "power_modes": sorted({str(r["power_mode"]) for r in records if r.get("power_mode")}),
    }
    if token_times and len(token_times) >= 2 and token_times[-1] > token_times[0]:
        gaps = np.diff(np.asarray(token_times)) * 1000
        out["tokens"] = len(token_times)
        out["tokens_per_s"] = float((len(token_times) - 1) / (token_times[-1] - token_times[0]))
        out["latency_ms"] = {f"p{q}": float(np.percentile(gaps, q)) for q in (50, 90, 99)}
        joules = energy_per_token(records, list(token_times))
        if joules:
            out["joules_per_token"] = float(np.mean(joules))
    return out
