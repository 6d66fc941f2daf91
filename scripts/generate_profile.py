"""Measure the machine this runs on and write a device profile YAML (validated before it is written).

  python scripts/generate_profile.py --name my-board --out profiles/my-board.yaml [--backend auto|cpu|cuda]
                                     [--base jetson-orin-nano-8gb] [--power-mode 15W]

Measures: a large copy's bandwidth (bytes read + written), GEMV bandwidth by matrix size, the cost of one
launch (one numpy call on the CPU; one kernel launch on a GPU), the sparse FFN block's time against
density, and power where a sampler can read it (INA3221 on Jetson, NVML on desktop GPUs). With --base,
identity, power modes and memory policy come from that profile and the measured bandwidth becomes the
current mode's figure; otherwise a one-mode profile of this machine is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

from edge_runtime.bench import cuda_event_ms
from edge_runtime.devices.profile import load_profile, parse_profile
from edge_runtime.monitor.command import default_samplers


def _median_s(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_cpu() -> dict:
    src = np.ones(64 << 20, dtype=np.float32)  # 256 MB
    dst = np.empty_like(src)
    copy_bw = 2 * src.nbytes / _median_s(lambda: np.copyto(dst, src), 5)
    gemv = {}
    for n in (1024, 4096, 8192):
        w = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        x = np.ones(n, dtype=np.float32)
        gemv[n] = w.nbytes / _median_s(lambda w=w, x=x: w @ x, 5)
    tiny = np.ones(8, dtype=np.float32)
    launch = _median_s(lambda: tiny + tiny, 2000)
    return {"copy_bw": copy_bw, "gemv_bw": gemv, "launch_s": launch, "sparse_ffn": sparse_ffn_cpu()}


def sparse_ffn_cpu(d: int = 1024, n: int = 2816) -> dict:
    """Time of the cpu backend's sparse FFN (SparseInfer) on random int8 weights against density."""
    from types import SimpleNamespace

    from edge_runtime.backends.base import DecodeState
    from edge_runtime.backends.cpu import CpuBackend
    from edge_runtime.backends.weights import Layer, Linear
    from edge_runtime.pack.quant import quantize
    from edge_runtime.pack.signbits import pack_signs
    from edge_runtime.sparsity.predictor import Rule, predict_active

    rng = np.random.default_rng(0)
    gate_f = rng.standard_normal((n, d)).astype(np.float32)
    layer = Layer(None, None, None, None, None, None, Linear(quantize(gate_f, "int8"), None),
                  Linear(quantize(rng.standard_normal((n, d)).astype(np.float32), "int8"), None),
                  quantize(rng.standard_normal((n, d)).astype(np.float32), "int8"), None, pack_signs(gate_f))
    # a one-layer backend holding just this FFN: its decode state carries the knob and the counters
    cfg = SimpleNamespace(n_layers=1, ffn_dim=n, vocab_size=1, act_threshold=0.0)
    be = CpuBackend.__new__(CpuBackend)
    be.config, be.state = cfg, DecodeState.allocate(np, cfg)
    x = rng.standard_normal((1, d)).astype(np.float32)
    y = np.zeros((1, d), dtype=np.float32)
    out = {}
    for density in (1.0, 0.5, 0.25, 0.1, 0.05):
        lo, hi = 0.0, 64.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if predict_active(x[0], layer.gate_signs, mid).mean() < density else (lo, mid)
        be.set_knobs([Rule("sparseinfer", alpha=hi)], None)
        out[density] = _median_s(lambda: be.ffn_step(0, x, layer, y, "sparse"), 20) * 1e3
    return out


def measure_cuda() -> dict:
    import cupy as cp

    def ev(fn, repeats=20):
        return cuda_event_ms(cp, fn, repeats) * 1e-3

    src = cp.ones(256 << 20, dtype=cp.float32)  # 1 GB
    dst = cp.empty_like(src)
    copy_bw = 2 * src.nbytes / ev(lambda: dst.__setitem__(Ellipsis, src), 10)
    gemv = {}
    for n in (4096, 8192, 16384):
        w = cp.ones((n, n), dtype=cp.float16)
        x = cp.ones(n, dtype=cp.float16)
        gemv[n] = w.nbytes / ev(lambda w=w, x=x: cp.matmul(w, x))
    tiny = cp.ones(8, dtype=cp.float32)
    t0 = time.perf_counter()
    for _ in range(1000):
        tiny += 1
    cp.cuda.Device().synchronize()
    return {"copy_bw": copy_bw, "gemv_bw": gemv, "launch_s": (time.perf_counter() - t0) / 1000, "sparse_ffn": {}}


def power_mw(seconds: float = 2.0) -> float | None:
    samplers = default_samplers()
    vals = []
    t_end = time.time() + seconds
    while time.time() < t_end:
        for s in samplers:
            v = s.sample().get("power_mw")
            if v is not None:
                vals.append(v)
        time.sleep(0.1)
    return float(np.mean(vals)) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--base", default=None, help="profile to take identity and power modes from")
    ap.add_argument("--power-mode", default=None, help="the mode the board is in now (with --base)")
    args = ap.parse_args()
    from edge_runtime.backends import cuda_available

    use_cuda = args.backend == "cuda" or (args.backend == "auto" and cuda_available())
    m = measure_cuda() if use_cuda else measure_cpu()
    best_gemv = m["gemv_bw"][max(m["gemv_bw"])]  # the largest matrix: the one no cache holds
    idle_power = power_mw()
    copy_gbs = m["copy_bw"] / 1e9
    measured = {"copy_gbs": round(copy_gbs, 2),
                "gemv_gbs_by_n": {int(k): round(v / 1e9, 2) for k, v in m["gemv_bw"].items()},
                "launch_us": round(m["launch_s"] * 1e6, 2),
                "sparse_ffn_ms_by_density": {float(k): round(v, 4) for k, v in m["sparse_ffn"].items()},
                "idle_power_mw": idle_power, "backend": "cuda" if use_cuda else "cpu"}
    if args.base:
        data = load_profile(args.base).to_dict()
        mode = args.power_mode or data["default_power_mode"]
        for pm in data["power_modes"]:
            if pm["name"].upper() == mode.upper():
                peak = pm["memory_bandwidth_gbs"]
                data["performance"]["bandwidth_efficiency"] = round(min(1.0, best_gemv / 1e9 / peak), 3)
    else:
        data = {"name": args.name, "description": f"measured by generate_profile.py on {os.uname().nodename}",
                "kind": "gpu" if use_cuda else "cpu", "memory_total_gb": round(psutil.virtual_memory().total / 1e9, 1),
                "default_power_mode": "default",
                "power_modes": [{"id": 0, "name": "default", "watts": None, "gpu_max_mhz": 1,
                                 "cpu_cores_online": psutil.cpu_count(), "cpu_max_mhz": 1, "emc_max_mhz": 0,
                                 "memory_bandwidth_gbs": round(copy_gbs / 2, 2)}],
                "performance": {"bandwidth_efficiency": round(min(1.0, best_gemv / (m["copy_bw"] / 2)), 3)},
                "memory": {"reserve_gb": 2.0, "runtime_overhead_gb": 0.5}}
        if use_cuda:
            import cupy as cp

            data["gpu_names"] = [cp.cuda.runtime.getDeviceProperties(0)["name"].decode()]
            data["memory_total_gb"] = round(cp.cuda.Device().mem_info[1] / 1e9, 1)
    data["name"] = args.name
    data["performance"].update(launch_overhead_us=measured["launch_us"], measured=True)
    data["measurements"] = measured
    parse_profile({k: v for k, v in data.items() if k != "measurements"}, str(args.out))  # validate first
    args.out.write_text("# written by scripts/generate_profile.py; measurements below are this machine's\n"
                        + yaml.safe_dump(data, sort_keys=False))
    print(yaml.safe_dump(measured, sort_keys=False))


if __name__ == "__main__":
    main()
