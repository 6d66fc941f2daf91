"""Weight-sparse and TEAL GEMVs on a CUDA GPU against dense fp16, Llama-2-7B shapes, measured in one run (the GPU
benchmarks of the weight-sparsity / TEAL issue).

  python scripts/bench_sparse_gemv.py [--shapes gate,down] [--csv out.csv] [--smoke]

y = W x for W (N, K) random N(0, 1/K), x random:
- cuBLAS fp16 (CuPy matmul, fp16 in and out) and this project's dense fp16 GEMV kernel: the baselines.
- Compressed rows (pack/sparse_weights.py: per-row bitmap + packed kept values, fp16 or int8 with the row's
  scale) at weight sparsity 0.5 and 0.7, magnitude-pruned per row, read by kernels/gemv.cu as stored.
- TEAL column skipping (kernels/teal.cu) over W^T fp16, at activation sparsity 0 (the kernel dense), 0.25, 0.4 and
  0.5: the threshold is set between two |x| values so that this fraction of the input channels is skipped.
Every kernel's output is checked against numpy on the same weights (max error relative to max |y|). Each
weight set is uploaded several times and the copies rotated, so that L2 never holds what is timed; times are
medians of CUDA-event timings; GB/s counts the bytes a kernel must read, divided by a device-to-device copy's
bandwidth measured here. `--smoke` runs a tiny shape (also under the CPU emulator) to check the script.
"""

from __future__ import annotations

import argparse

import numpy as np

from edge_runtime.atomic_write import atomic_write_csv
from edge_runtime.backends import require_cuda
from edge_runtime.backends.cuda_ops.common import DeviceMatrix
from edge_runtime.backends.cuda_ops.gemv import Gemv
from edge_runtime.backends.cuda_ops.teal import TealGemv
from edge_runtime.bench import copies_past_l2, cuda_copy_bandwidth, cuda_event_ms, cuda_l2_bytes, rotated
from edge_runtime.cli_args import description
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.quant import PackedTensor, quantize
from edge_runtime.pack.sparse_weights import compress, prune_mask

SHAPES = {"gate": (11008, 4096), "down": (4096, 11008), "tiny": (96, 128)}  # (N, K) of y = W x; tiny: --smoke
WEIGHT_SPARSITY = (0.5, 0.7)
TEAL_SPARSITY = (0.0, 0.25, 0.4, 0.5)
MAX_REL_ERR = 2e-3  # fp16 inputs (cuBLAS) and fp32 accumulation in a different order than numpy


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def teal_threshold(x: np.ndarray, sparsity: float) -> np.float32:
    """Midway between the |x| values either side of the `sparsity` quantile: that many channels fall under it."""
    if sparsity == 0:
        return np.float32(0.0)
    a = np.sort(np.abs(x))
    i = int(round(sparsity * len(a)))
    return np.float32((a[i - 1] + a[i]) / 2)


def bench_shape(cp, shape: str, rng, copy_bw: float, l2: int, repeats: dict) -> list[dict]:
    n, k = SHAPES[shape]
    w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    x_h = rng.standard_normal(k).astype(np.float32)
    x, x16, y = cp.asarray(x_h), cp.asarray(x_h.astype(np.float16)), cp.empty(n, cp.float32)
    w16 = w.astype(np.float16)
    ref16 = w16.astype(np.float32) @ x_h  # the fp16 weights every dense and TEAL row reads
    gemv, teal = Gemv(), TealGemv()
    rows = []

    def ms_of(mats: list, fn) -> float:  # median ms of fn(m), the device copies rotated past L2
        return cuda_event_ms(cp, rotated(mats, fn), **repeats)

    def add(kernel: str, sparsity: float, ms: float, nbytes: int, err: float, **extra) -> None:
        rows.append({"shape": shape, "kernel": kernel, "sparsity": sparsity, "ms": ms, "bytes": nbytes,
                     "gbs": nbytes / (ms * 1e-3) / 1e9, "copy_fraction": nbytes / (ms * 1e-3) / copy_bw,
                     "max_rel_err": err, **extra})

    dense_bytes = n * k * 2
    mats = [cp.asarray(w16) for _ in range(copies_past_l2(l2, dense_bytes))]
    y16 = cp.empty(n, cp.float16)  # preallocated: an allocation would keep the call out of the timing graph

    def cublas_fp16(m):
        cp.matmul(m, x16, out=y16)

    ms = ms_of(mats, cublas_fp16)
    add("cublas fp16", 0.0, ms, dense_bytes, rel_err(cp.matmul(mats[0], x16).get().astype(np.float32), ref16))
    del mats
    mats = [DeviceMatrix(quantize(w, "fp16")) for _ in range(copies_past_l2(l2, dense_bytes))]
    ms = ms_of(mats, lambda m: gemv(m, x, y))
    gemv(mats[0], x, y)
    add("dense fp16", 0.0, ms, dense_bytes, rel_err(y.get(), ref16))
    del mats
    for s in WEIGHT_SPARSITY:
        mask = prune_mask(w, s)
        for enc in ("sparse-fp16", "sparse-int8"):
            packed = PackedTensor(enc, w.shape, compress(w, mask, enc))
            mats = [DeviceMatrix(packed)]
            mats += [DeviceMatrix(packed) for _ in range(copies_past_l2(l2, mats[0].nbytes) - 1)]
            ms = ms_of(mats, lambda m: gemv(m, x, y))
            gemv(mats[0], x, y)
            add(f"compressed {enc[7:]}", s, ms, mats[0].nbytes, rel_err(y.get(), packed.matvec(x_h)))
            del mats
    wt = quantize(np.ascontiguousarray(w.T), "fp16")  # (K, N): a skipped input channel is a skipped row
    mats = [DeviceMatrix(wt) for _ in range(copies_past_l2(l2, dense_bytes))]
    ones, thr = cp.ones(k, cp.float32), cp.zeros(1, cp.float32)
    for s in TEAL_SPARSITY:
        t = teal_threshold(x_h, s)
        thr[...] = t
        kept = int((np.abs(x_h) >= t).sum())
        ms = ms_of(mats, lambda m: teal(m, x, ones, thr, y))
        teal(mats[0], x, ones, thr, y)
        ref = w16.astype(np.float32) @ np.where(np.abs(x_h) >= t, x_h, 0)
        add("teal fp16", s, ms, kept * n * 2, rel_err(y.get(), ref), channels_kept=kept / k)
    del mats
    cublas = rows[0]["ms"]
    dense = rows[1]["ms"]
    for r in rows:
        r["speedup_vs_cublas"], r["speedup_vs_dense_kernel"] = cublas / r["ms"], dense / r["ms"]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--shapes", default="gate,down", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--smoke", action="store_true", help="the tiny shape, few repeats: checks the script")
    args = ap.parse_args(argv)
    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {', '.join(unknown)}")
    try:
        cp = require_cuda("this benchmark", "the cpu backend's sparse kernels are timed by scripts/bench_cpu.py")
    except EdgeRuntimeError as e:
        raise SystemExit(f"bench_sparse_gemv.py: error: {e}") from None
    l2 = (1 << 16) if args.smoke else cuda_l2_bytes(cp)
    repeats = {"repeats": 3, "warmup": 1} if args.smoke else {}
    copy_bw = cuda_copy_bandwidth(cp, (4 << 20) if args.smoke else (2 << 30))
    rng = np.random.default_rng(0)
    rows = [r for shape in shapes for r in bench_shape(cp, shape, rng, copy_bw, l2, repeats)]
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write); L2 {l2 >> 20} MB")
    print(f"{'shape':5} {'kernel':17} {'sparsity':>8} {'ms':>8} {'x cuBLAS':>8} {'x own':>6} {'GB/s':>6} {'copy':>5} "
          f"{'rel err':>8}")
    for r in rows:
        print(f"{r['shape']:5} {r['kernel']:17} {r['sparsity']:8.2f} {r['ms']:8.4f} {r['speedup_vs_cublas']:8.2f} "
              f"{r['speedup_vs_dense_kernel']:6.2f} {r['gbs']:6.0f} {r['copy_fraction']:5.2f} {r['max_rel_err']:8.1e}")
    bad = [r for r in rows if not r["max_rel_err"] < MAX_REL_ERR]
    if args.csv:
        atomic_write_csv(args.csv, rows)
    if bad:
        raise SystemExit(f"bench_sparse_gemv.py: error: {len(bad)} kernels disagree with numpy (max relative error "
                         f"over {MAX_REL_ERR:g}): " + ", ".join(f"{r['shape']} {r['kernel']} {r['sparsity']}"
                                                            for r in bad))


if __name__ == "__main__":
    main()
