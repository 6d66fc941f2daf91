"""Measure the machine this runs on and write a device profile YAML (validated before it is written).

  python scripts/generate_profile.py --name my-board --out profiles/my-board.yaml [--backend auto|cpu|cuda]
                                     [--base jetson-orin-nano-8gb] [--power-mode 15W]

Measures: a large copy's bandwidth (bytes read + written), GEMV bandwidth by matrix size, the cost of one
launch (one numpy call on the CPU; one kernel launch on a GPU), the sparse FFN block's time against
density, and power where a sampler can read it (INA3221 on Jetson, NVML on desktop GPUs). With --base,
identity, power modes and memory policy come from that profile and the measured bandwidth becomes the
current mode's figure; otherwise a one-mode profile of this machine is written. --base must be the board this
runs on (detected), in the mode named (read from nvpmodel when --power-mode is left out), measured on the
backend that profile decodes with: a VM's CPU figures written as a measured Jetson profile would mislead
every projection made from it.
"""

from __future__ import annotations

import edge_runtime  # noqa: F401  (before numpy, as the CLI does: OpenBLAS's idle spin, edge_runtime/blas_spin.py)

# isort: split
import argparse
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import yaml

from edge_runtime.atomic_write import atomic_write_text
from edge_runtime.backends import create_backend, require_cuda, resolve_backend
from edge_runtime.bench import copies_past_l2, cuda_copy_bandwidth, cuda_event_ms, cuda_l2_bytes, rotated
from edge_runtime.cli_args import description
from edge_runtime.devices.detect import detect
from edge_runtime.devices.profile import load_profile, parse_profile
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.monitor.command import default_samplers
from edge_runtime.pack.synthetic import random_llama
from edge_runtime.sparsity.predictor import Rule, alpha_for_density


@dataclass(frozen=True)
class Sizes:
    """What is measured: the copy's bytes, the GEMVs' n x n matrices, how many tiny ops time a launch, and
    the sparse FFN block's shape (d, N) and encoding; l2_bytes: the cache weight copies are rotated past (None:
    the device's)."""

    copy_bytes: int
    gemv_n: tuple[int, ...]
    launches: int
    ffn: tuple[int, int]
    ffn_encoding: str
    l2_bytes: int | None = None


CPU = Sizes(256 << 20, (1024, 4096, 8192), 2000, (1024, 2816), "int8")
CUDA = Sizes(1 << 30, (4096, 8192, 16384), 1000, (4096, 11008), "fp16")  # Llama-2-7B's FFN
# checks the script (also under the CUDA emulator)
SMOKE = Sizes(4 << 20, (64, 128), 20, (64, 128), "int8", l2_bytes=1 << 16)
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)


def _median_s(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_cpu(sizes: Sizes) -> dict:
    src = np.ones(sizes.copy_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy_bw = 2 * src.nbytes / _median_s(lambda: np.copyto(dst, src), 5)
    gemv = {}
    for n in sizes.gemv_n:
        w = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        x = np.ones(n, dtype=np.float32)
        gemv[n] = w.nbytes / _median_s(lambda w=w, x=x: w @ x, 5)
    tiny = np.ones(8, dtype=np.float32)
    launch = _median_s(lambda: tiny + tiny, sizes.launches)
    ffn = sparse_ffn_ms("cpu", np, sizes, lambda fn, stream: _median_s(fn, 20) * 1e3)
    return {"copy_bw": copy_bw, "gemv_bw": gemv, "launch_s": launch, "sparse_ffn": ffn}


def measure_cuda(cp, sizes: Sizes) -> dict:
    copy_bw = cuda_copy_bandwidth(cp, sizes.copy_bytes)
    l2 = sizes.l2_bytes or cuda_l2_bytes(cp)
    gemv = {}
    for n in sizes.gemv_n:
        ws = [cp.ones((n, n), dtype=cp.float16) for _ in range(copies_past_l2(l2, 2 * n * n))]  # none served by L2
        x, y = cp.ones(n, dtype=cp.float16), cp.empty(n, dtype=cp.float16)  # preallocated: capturable

        def cublas_fp16(w, x=x, y=y):
            cp.matmul(w, x, out=y)

        gemv[n] = ws[0].nbytes / (cuda_event_ms(cp, rotated(ws, cublas_fp16), 20) * 1e-3)
        del ws, x, y
    tiny = cp.ones(8, dtype=cp.float32)
    t0 = time.perf_counter()
    for _ in range(sizes.launches):
        tiny += 1
    cp.cuda.Device().synchronize()
    launch = (time.perf_counter() - t0) / sizes.launches
    d, n = sizes.ffn
    # layer copies rotated so that the lowest density's reads (sign plane + 5 % of three matrices) pass 3 x L2
    least = n * -(-d // 32) * 4 + min(DENSITIES) * 3 * n * d * (2 if sizes.ffn_encoding == "fp16" else 1)
    ffn = sparse_ffn_ms("cuda", cp, sizes, lambda fn, stream: cuda_event_ms(cp, fn, 20, stream=stream),
                        copies_past_l2(l2, least, least=1))
    return {"copy_bw": copy_bw, "gemv_bw": gemv, "launch_s": launch, "sparse_ffn": ffn}


def sparse_ffn_ms(backend: str, xp, sizes: Sizes, time_ms, copies: int = 1) -> dict[float, float]:
    """The backend's FFN block (SparseInfer predictor, gate, up, down) on a random layer of shape sizes.ffn, in
    ms against the fraction of gate rows the predictor lets through (alpha chosen for this x); `copies` device
    copies of the layer taken in turn (past the L2 cache). time_ms(fn, stream) -> milliseconds of one fn() there
    (stream: the cuda backend's, where its ops are issued; None on cpu)."""
    d, n = sizes.ffn
    cfg = dataclasses.replace(SHAPES["llama2-7b"], dim=d, ffn_dim=n, n_layers=copies, n_heads=max(1, d // 64),
                              n_kv_heads=max(1, d // 64), head_dim=min(64, d), vocab_size=256, tie_embeddings=True)
    model = random_llama(cfg, sizes.ffn_encoding, gate_bias=0.0, distinct_layers=1)  # one layer, `copies` uploads
    be = create_backend(backend, model, max_context=16)
    try:
        layers = list(enumerate(be.weights.layers))
        x_host = np.random.default_rng(1).standard_normal((1, d)).astype(np.float32)
        x, y = xp.asarray(x_host), xp.zeros((1, d), dtype=xp.float32)
        out = {}

        def sparse_ffn(il):
            be.ffn_step(il[0], x, il[1], y, "sparse")

        for density in DENSITIES:
            alpha = alpha_for_density(x_host[0], layers[0][1].gate_signs, density)
            be.set_knobs([Rule("sparseinfer", alpha=alpha)] * copies, None)
            out[density] = time_ms(rotated(layers, sparse_ffn), getattr(be, "stream", None))
        return out
    finally:
        if hasattr(be, "free"):
            be.free()


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


def base_mode(name: str, mode: str | None) -> tuple[dict, dict]:
    """The --base profile as a dict and the entry of its power mode `mode` (default: its default mode)."""
    data = load_profile(name).to_dict()
    mode = mode or data["default_power_mode"]
    for pm in data["power_modes"]:
        if pm["name"].upper() == mode.upper():
            return data, pm
    raise EdgeRuntimeError(f"profile {name!r} has no power mode {mode!r}; it has "
                           f"{', '.join(pm['name'] for pm in data['power_modes'])}")


def _board(profile) -> tuple:
    """What makes two profiles one board: kind, module SKUs, power-mode names (a Super release's differ) and GPU
    names. A profile written with --base keeps its base's, and a path names the same board as a name does."""
    return (profile.kind, frozenset(profile.module_skus), frozenset(m.name.upper() for m in profile.power_modes),
            frozenset(g.lower() for g in profile.gpu_names))


def check_base_is_here(base: str, power_mode: str | None, backend: str) -> str | None:
    """The power mode to measure in, after checking that this machine is the --base board, in that mode, measured
    on the backend the profile decodes with (its GPU unless it is a cpu profile)."""
    found, want = detect(), load_profile(base)
    if _board(load_profile(found.profile)) != _board(want):
        raise EdgeRuntimeError(f"this machine is detected as {found.profile} ({found.source}), not {base}: --base "
                               "takes identity and power modes from the board it is measured on (leave --base out "
                               "to profile this machine as it is)")
    if power_mode and found.power_mode and power_mode.upper() != found.power_mode.upper():
        raise EdgeRuntimeError(f"the board is in power mode {found.power_mode}, not {power_mode}: switch with "
                               f"nvpmodel first, or name {found.power_mode}")
    if not power_mode and not found.power_mode and want.kind == "jetson":
        raise EdgeRuntimeError("the board's power mode could not be read (nvpmodel): name it with --power-mode")
    if want.kind != "cpu" and resolve_backend(backend) != "cuda":
        raise EdgeRuntimeError(f"{base} decodes on its GPU: measure with --backend cuda (needs CuPy on the board)")
    return power_mode or found.power_mode


def this_machine(name: str, cp, copy_bw: float, best_gemv: float) -> dict:
    """A one-mode profile of this machine (cp: CuPy where the GPU was measured, else None)."""
    data = {"name": name, "description": f"measured by generate_profile.py on {os.uname().nodename}",
            "kind": "gpu" if cp is not None else "cpu",
            "memory_total_gb": round(psutil.virtual_memory().total / 1e9, 1), "default_power_mode": "default",
            "power_modes": [{"id": 0, "name": "default", "watts": None, "gpu_max_mhz": 1,
                             "cpu_cores_online": psutil.cpu_count(), "cpu_max_mhz": 1, "emc_max_mhz": 0,
                             "memory_bandwidth_gbs": round(copy_bw / 2e9, 2)}],
            "performance": {"bandwidth_efficiency": round(min(1.0, best_gemv / (copy_bw / 2)), 3)},
            "memory": {"reserve_gb": 2.0, "runtime_overhead_gb": 0.5}}
    if cp is not None:
        data["gpu_names"] = [cp.cuda.runtime.getDeviceProperties(0)["name"].decode()]
        data["memory_total_gb"] = round(cp.cuda.Device().mem_info[1] / 1e9, 1)
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--base", default=None, help="profile to take identity and power modes from")
    ap.add_argument("--power-mode", default=None, help="the mode the board is in now (with --base)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, and --base taken without checking this is that board: checks the script, "
                         "measures nothing real")
    args = ap.parse_args(argv)
    try:
        write_profile(args)
    except EdgeRuntimeError as e:
        raise SystemExit(f"generate_profile.py: error: {e}") from None


def write_profile(args) -> None:
    mode = args.power_mode
    if args.base and not args.smoke:
        mode = check_base_is_here(args.base, mode, args.backend)
    base = base_mode(args.base, mode) if args.base else None  # bad names fail before measuring
    if not args.out.parent.is_dir():
        raise EdgeRuntimeError(f"{args.out.parent} is not a directory")
    cp = require_cuda("--backend cuda", "use --backend cpu") if resolve_backend(args.backend) == "cuda" else None
    m = measure_cpu(SMOKE if args.smoke else CPU) if cp is None else measure_cuda(cp, SMOKE if args.smoke else CUDA)
    best_gemv = m["gemv_bw"][max(m["gemv_bw"])]  # the largest matrix: the one no cache holds
    measured = {"copy_gbs": round(m["copy_bw"] / 1e9, 2),
                "gemv_gbs_by_n": {int(k): round(v / 1e9, 2) for k, v in m["gemv_bw"].items()},
                "launch_us": round(m["launch_s"] * 1e6, 2),
                "sparse_ffn_ms_by_density": {float(k): round(v, 4) for k, v in m["sparse_ffn"].items()},
                "idle_power_mw": power_mw(0.2 if args.smoke else 2.0), "backend": "cpu" if cp is None else "cuda"}
    if args.smoke:
        measured["smoke"] = True  # tiny sizes: these figures say nothing about the machine
    if base is not None:  # the measured GEMV over the mode's nominal bandwidth
        data, mode = base
        data["performance"]["bandwidth_efficiency"] = round(min(1.0, best_gemv / 1e9 / mode["memory_bandwidth_gbs"]), 3)
    else:
        data = this_machine(args.name, cp, m["copy_bw"], best_gemv)
    data["name"] = args.name
    data["performance"].update(launch_overhead_us=measured["launch_us"], measured=True)
    parse_profile(data, str(args.out))  # validated before anything is written
    data["measurements"] = measured
    atomic_write_text(args.out, "# written by scripts/generate_profile.py; measurements below are this machine's\n"
                      + yaml.safe_dump(data, sort_keys=False))
    print(yaml.safe_dump(measured, sort_keys=False))


if __name__ == "__main__":
    main()
