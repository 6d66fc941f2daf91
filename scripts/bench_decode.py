"""FFN-block decode benchmark on a CUDA GPU (part a of the CUDA issue): predictor + gate + up + down at
imposed densities against the dense GEMVs of the same layer, measured in the same run.

  python scripts/bench_decode.py [--shapes 7b,13b] [--encodings fp16,int8,int4] [--csv out.csv]
                                 [--smoke]

Density is the fraction of gate rows the predictor lets through (imposed by choosing alpha on the host
for this x; the numpy predictor's count is reported beside the kernel's); about half of them survive the
ReLU. The dense baseline for fp16 is cuBLAS (CuPy matmul); for int8/int4 there is no cuBLAS GEMV, so the
baseline is this project's dense GEMV kernel. Every row reports bytes read, achieved GB/s, the fraction
of a device-to-device copy's bandwidth (measured here) and the ratio to dense. Weight sets are rotated
(--copies random sets, each uploaded as often as it takes for the rotation to hold 3 x L2 even at the smallest
density's bytes) so that L2 (50 MB on an H100) never holds what is timed; times are medians of CUDA-event
timings after warm-up. Jetson rows are PROJECTIONS from the profiles' bandwidth, not measurements.
`--smoke` runs a tiny shape with few repeats (also under the CPU emulator) to check the script, not to
time anything.
Parts b (end-to-end 7B-shaped decode) and c (default model, cuda vs cpu) are scripts/bench_decode_e2e.py.
"""

from __future__ import annotations

import argparse

import numpy as np

from edge_runtime.atomic_write import atomic_write_csv
from edge_runtime.backends import require_cuda
from edge_runtime.backends.cuda_ops.common import DeviceMatrix
from edge_runtime.backends.cuda_ops.gemv import Gemv
from edge_runtime.backends.cuda_ops.sparse_ffn import SparseFFN, SparseFFNKernels
from edge_runtime.bench import copies_past_l2, cuda_copy_bandwidth, cuda_event_ms, cuda_l2_bytes, rotated
from edge_runtime.cli_args import description
from edge_runtime.devices.profile import load_profile
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.quant import quantize
from edge_runtime.pack.signbits import pack_signs
from edge_runtime.sparsity.predictor import alpha_for_density, predict_active

SHAPES = {"7b": (4096, 11008), "13b": (5120, 13824), "tiny": (64, 128)}  # (d, N); tiny: --smoke
DENSITIES = (1.0, 0.5, 0.25, 0.15, 0.10, 0.05)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--shapes", default="7b,13b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--encodings", default="fp16,int8,int4")
    ap.add_argument("--copies", type=int, default=3, help="weight sets rotated per timing")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--smoke", action="store_true", help="the tiny shape, one copy, few repeats: checks the script")
    args = ap.parse_args(argv)
    shapes, encodings = args.shapes.split(","), args.encodings.split(",")
    if args.smoke:
        shapes, args.copies = ["tiny"], 1
    unknown = [s for s in shapes if s not in SHAPES] + [e for e in encodings if e not in ("fp16", "int8", "int4")]
    if unknown or args.copies < 1:
        ap.error(f"unknown shape or encoding {', '.join(unknown)}" if unknown else "--copies must be at least 1")
    try:
        cp = require_cuda("this benchmark", "see scripts/bench_cpu.py for the cpu backend")
    except EdgeRuntimeError as e:
        raise SystemExit(f"bench_decode.py: error: {e}") from None
    repeats = {"repeats": 3, "warmup": 1} if args.smoke else {}
    kernels, gemv = SparseFFNKernels(), Gemv()
    bw = cuda_copy_bandwidth(cp, (4 << 20) if args.smoke else (2 << 30))
    l2 = (1 << 16) if args.smoke else cuda_l2_bytes(cp)
    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        d, n = SHAPES[shape]
        for enc in encodings:
            host = []  # (gate sign plane, [gate, up, down_t] packed) of each random set
            for _ in range(args.copies):
                gate_f = (rng.standard_normal((n, d)) * 0.02).astype(np.float32)
                host.append((pack_signs(gate_f), [quantize(gate_f, enc)] + [
                    quantize((rng.standard_normal((n, d)) * 0.02).astype(np.float32), enc) for _ in range(2)]))
            signs, mats0 = host[0]
            # Each set uploaded as often as it takes for the rotation to hold 3 x L2 at the smallest density's
            # bytes (sign plane + 5 % of the rows): a sparse step reads little, and L2 must not serve it.
            small = len(host) * (signs.nbytes + min(DENSITIES) * sum(m.nbytes for m in mats0))
            on_device = host * copies_past_l2(l2, small, least=1, most=max(1, 16 // len(host)))
            ffns = [SparseFFN(kernels, *mats, s) for s, mats in on_device]
            dense_mats = [[DeviceMatrix(m) for m in mats] for _, mats in on_device]
            x_h = rng.standard_normal(d).astype(np.float32)
            x = cp.asarray(x_h)
            ys = [cp.empty(n, cp.float32) for _ in range(3)]  # gate, up, and down_t read as an (N, d) GEMV
            # cuBLAS operands preallocated: an allocation would keep the step out of the timing graph
            xh, g16, h16, y16 = x.astype(cp.float16), cp.empty(n, cp.float16), cp.empty(n, cp.float16), \
                cp.empty(d, cp.float16)

            def dense_step(mats):
                g, u, dt = mats
                if enc == "fp16":
                    cp.matmul(g.w, xh, out=g16)
                    cp.matmul(u.w, xh, out=h16)
                    cp.matmul(h16, dt.w, out=y16)
                else:
                    gemv(g, x, ys[0])
                    gemv(u, x, ys[1])
                    gemv(dt, x, ys[2])  # W_down^T (N, d) read in full, as a dense down would read it

            dense_ms = cuda_event_ms(cp, rotated(dense_mats, dense_step), **repeats)
            dense_bytes = sum(m.nbytes for m in dense_mats[0])
            for density in DENSITIES:
                alpha_h = np.array([alpha_for_density(x_h, signs, density)], np.float32)  # as the kernel reads it
                host_predicted = float(predict_active(x_h, signs, float(alpha_h[0])).mean())
                alpha = cp.asarray(alpha_h)
                ms = cuda_event_ms(cp, rotated(ffns, lambda f, a=alpha: f.run(x, alpha_ptr=a)), **repeats)
                ffn = ffns[0]
                ffn.run(x, alpha_ptr=alpha)
                pred, kept = int(ffn.predicted.get()[0]), int(ffn.count.get()[0])
                row_b = dense_mats[0][0].nbytes / n
                bytes_read = ffn.gate_signs.nbytes + pred * row_b + 2 * kept * row_b
                rows.append({"shape": shape, "encoding": enc, "density": density, "predicted": pred / n,
                             "host_predicted": host_predicted, "kept": kept / n, "dense_ms": dense_ms,
                             "sparse_ms": ms, "ratio": ms / dense_ms,
                             "bytes": bytes_read, "gbs": bytes_read / (ms * 1e-3) / 1e9,
                             "copy_fraction": bytes_read / (ms * 1e-3) / bw,
                             "dense_gbs": dense_bytes / (dense_ms * 1e-3) / 1e9,
                             "dense_copy_fraction": dense_bytes / (dense_ms * 1e-3) / bw})
            for f in ffns:
                f.free()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    print(f"{'shape':5} {'enc':5} {'dens':>5} {'kept':>5} {'dense ms':>9} {'sparse ms':>9} {'x dense':>7} "
          f"{'GB/s':>6} {'copy':>5}")
    for r in rows:
        print(f"{r['shape']:5} {r['encoding']:5} {r['density']:5.2f} {r['kept']:5.2f} {r['dense_ms']:9.4f} "
              f"{r['sparse_ms']:9.4f} {r['ratio']:7.3f} {r['gbs']:6.0f} {r['copy_fraction']:5.2f}")
    for name in ("jetson-agx-orin-64gb", "jetson-orin-nano-8gb"):
        prof = load_profile(name)
        eff = prof.effective_bandwidth()
        print(f"PROJECTION for {name} ({prof.default_power_mode}, {eff / 1e9:.0f} GB/s effective), not measured:")
        for r in rows:
            if r["encoding"] != "fp16" or r["shape"] != "7b":
                continue
            print(f"  7b fp16 density {r['density']:.2f}: sparse {r['bytes'] / eff * 1e3:.3f} ms vs dense "
                  f"{3 * SHAPES['7b'][0] * SHAPES['7b'][1] * 2 / eff * 1e3:.3f} ms per FFN block")
    if args.csv:
        atomic_write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
