"""The two sign-plane predictors' kernels on a CUDA GPU, Llama-2-7B shapes, measured in one run (the GPU bars of
the projection-predictor issue).

  python scripts/bench_predictors.py [--model DIR] [--cap 1.0] [--encodings fp16,int8,int4] [--csv out.csv]
                                     [--smoke]

a. Predictor alone: the fused predictor + gate launch with a knob that lets no row through (SparseInfer alpha
   -1, projection theta +inf): both read exactly x and the N x d sign plane and score every row, SparseInfer by
   XOR + popcount, the projection by 8 lookups a sign word in a table of x's 4-input partial sums built in
   shared memory per block; no gate row is read.
b. The FFN block (prepare, predictor + gate + up, down) with each predictor at the densities the model's
   calibration measured at equal perplexity: the projection predictor at the last point of its calibrated path
   within +`--cap` % perplexity, SparseInfer at that same perplexity, interpolated on its own path. The means
   over layers of the predicted density and of the kept density (predicted rows whose gate survives) are
   IMPOSED on random 7B-shaped weights: the knob is set for this x so that that fraction of rows is predicted,
   and a uniform gate bias so that that fraction survives. The kernel's own counts are printed beside them, and
   the block's output is checked against numpy.
Device copies of the weights are rotated so that L2 never holds what is timed; times are medians of CUDA-event
timings. `--smoke` runs a tiny shape (also under the CPU emulator) to check the script.
"""

from __future__ import annotations

import argparse

import numpy as np

from edge_runtime.atomic_write import atomic_write_csv
from edge_runtime.backends import require_cuda
from edge_runtime.backends.cuda_ops.sparse_ffn import SparseFFN, SparseFFNKernels
from edge_runtime.bench import copies_past_l2, cuda_event_ms, cuda_l2_bytes, rotated
from edge_runtime.cli_args import description
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.quant import quantize
from edge_runtime.pack.signbits import pack_signs
from edge_runtime.paths import resolve_model
from edge_runtime.sparsity.calibration_files import read_calibration
from edge_runtime.sparsity.predictor import alpha_for_density, predict_active, projection_scores

SHAPES = {"7b": (4096, 11008), "13b": (5120, 13824), "tiny": (64, 256)}  # (d, N); tiny: --smoke
MAX_REL_ERR = 1e-3


def point_densities(section: dict, knobs: list[float]) -> tuple[float, float]:
    """Mean over layers of the calibrated (predicted, kept) density at these per-layer knobs."""
    rows = [next(r for r in layer["table"] if r["knob"] == knob)
            for layer, knob in zip(section["layers"], knobs, strict=True)]
    return float(np.mean([r["predicted_density"] for r in rows])), float(np.mean([r["kept_density"] for r in rows]))


def equal_perplexity_densities(calib: dict, cap_pct: float) -> dict[str, dict]:
    """{predictor: {predicted, kept, ppl_increase_pct}}: the projection predictor's furthest path point within the
    cap, and SparseInfer's densities at that perplexity (linear on its path, ordered by perplexity)."""
    preds = calib["predictors"]
    if not {"sparseinfer", "projection"} <= set(preds):
        raise EdgeRuntimeError("the model's calibration must cover both predictors (edge-runtime calibrate)")
    path = preds["projection"]["path"]
    within = [i for i, p in enumerate(path) if p["ppl_increase_pct"] <= cap_pct] or [0]
    p = path[within[-1]]
    pred, kept = point_densities(preds["projection"], p["knobs"])
    out = {"projection": {"predicted": pred, "kept": kept, "ppl_increase_pct": p["ppl_increase_pct"]}}
    si = sorted(preds["sparseinfer"]["path"], key=lambda q: q["ppl_increase_pct"])
    ppl = [q["ppl_increase_pct"] for q in si]
    dens = np.array([point_densities(preds["sparseinfer"], q["knobs"]) for q in si])
    out["sparseinfer"] = {"predicted": float(np.interp(p["ppl_increase_pct"], ppl, dens[:, 0])),
                          "kept": float(np.interp(p["ppl_increase_pct"], ppl, dens[:, 1])),
                          "ppl_increase_pct": float(np.clip(p["ppl_increase_pct"], ppl[0], ppl[-1]))}
    return out


def imposed_knob(predictor: str, x: np.ndarray, signs: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray]:
    """(knob as the kernel reads it, host-predicted rows (N,) bool) letting `density` of the rows through."""
    if predictor == "sparseinfer":
        alpha = np.float32(alpha_for_density(x, signs, density))
        return np.array([alpha], np.float32), predict_active(x, signs, float(alpha))
    z = projection_scores(x, signs)
    top = np.sort(z)[::-1]
    k = min(max(1, int(round(density * len(z)))), len(z) - 1)
    theta = np.full(len(z), (top[k - 1] + top[k]) / 2, np.float32)  # midway: the kernel's fp32 sum agrees
    return theta, z >= theta


def gate_bias_for(g: np.ndarray, predicted: np.ndarray, kept: float) -> float:
    """A uniform gate bias under which round(kept * N) of the predicted rows have g + bias > 0."""
    gp = np.sort(g[predicted])[::-1]
    k = min(max(1, int(round(kept * len(g)))), len(gp) - 1)
    return float(-(gp[k - 1] + gp[k]) / 2)


def bench_encoding(cp, kernels, shape: str, enc: str, targets: dict, l2: int, repeats: dict, rng) -> list[dict]:
    d, n = SHAPES[shape]
    w = {name: (rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
         for name in ("gate", "up", "down_t")}
    packed = {name: quantize(m, enc) for name, m in w.items()}
    signs = pack_signs(w["gate"])
    ffns = [SparseFFN(kernels, packed["gate"], packed["up"], packed["down_t"], signs, gate_b=np.zeros(n, np.float32))
            for _ in range(copies_past_l2(l2, signs.nbytes))]  # the sign plane: the least a timing reads
    x_h = rng.standard_normal(d).astype(np.float32)
    x = cp.asarray(x_h)
    deq = {name: p.dequantize() for name, p in packed.items()}
    g_h, u_h = deq["gate"] @ x_h, deq["up"] @ x_h
    rows = []
    none_pass = {"sparseinfer": cp.asarray(np.array([-1.0], np.float32)),
                 "projection": cp.asarray(np.full(n, np.inf, np.float32))}
    for f in ffns:
        f.run(x, alpha_ptr=none_pass["sparseinfer"])  # prepare's xn, signs and sum in every copy
    for predictor, knob in none_pass.items():
        def gate_only(f, predictor=predictor, knob=knob):
            f.k.gate(predictor, f.gate, f.up, f.gate_b, f.up_b, f.xn, f.x_signs, f.x_sum, f.gate_signs, knob,
                     f.threshold, f.idx, f.h, f.counters)

        ms = cuda_event_ms(cp, rotated(ffns, gate_only), **repeats)
        gate_only(ffns[0])
        rows.append({"shape": shape, "encoding": enc, "part": "predictor alone", "predictor": predictor, "ms": ms,
                     "predicted": int(ffns[0].counters.get()[1]) / n, "bytes": signs.nbytes})
    for predictor, t in targets.items():
        knob_h, predicted = imposed_knob(predictor, x_h, signs, t["predicted"])
        bias = gate_bias_for(g_h, predicted, t["kept"])
        knob = cp.asarray(knob_h)
        for f in ffns:
            f.gate_b[...] = bias

        def block(f, predictor=predictor, knob=knob):
            f.run(x, alpha_ptr=knob) if predictor == "sparseinfer" else f.run(x, theta=knob)

        ms = cuda_event_ms(cp, rotated(ffns, block), **repeats)
        block(ffns[0])
        pred, kept = (int(v) for v in ffns[0].counters.get()[::-1])
        keep = predicted & (g_h + bias > 0)
        ref = ((g_h + bias) * u_h * keep) @ deq["down_t"]  # (d,): h over the kept rows times their W_down^T rows
        err = float(np.abs(ffns[0].y.get() - ref).max() / max(float(np.abs(ref).max()), 1e-30))
        row_b = packed["gate"].nbytes / n
        rows.append({"shape": shape, "encoding": enc, "part": "FFN block", "predictor": predictor, "ms": ms,
                     "target_predicted": t["predicted"], "target_kept": t["kept"], "predicted": pred / n,
                     "kept": kept / n, "host_predicted": float(predicted.mean()), "host_kept": float(keep.mean()),
                     "bytes": signs.nbytes + pred * row_b + 2 * kept * row_b, "max_rel_err": err})
    for f in ffns:
        f.free()
    by = {(r["part"], r["predictor"]): r for r in rows}
    for part in ("predictor alone", "FFN block"):
        ratio = by[(part, "projection")]["ms"] / by[(part, "sparseinfer")]["ms"]
        by[(part, "projection")]["projection_over_sparseinfer"] = ratio
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default=None, help="a model calibrated for both predictors (default: the embedded one)")
    ap.add_argument("--cap", type=float, default=1.0, help="perplexity increase (%%) of the compared settings")
    ap.add_argument("--shapes", default="7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--encodings", default="fp16,int8,int4")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--smoke", action="store_true", help="the tiny shape, few repeats: checks the script")
    args = ap.parse_args(argv)
    shapes, encodings = (["tiny"] if args.smoke else args.shapes.split(",")), args.encodings.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [e for e in encodings if e not in ("fp16", "int8", "int4")]
    if unknown:
        ap.error(f"unknown shape or encoding {', '.join(unknown)}")
    try:
        found = read_calibration(resolve_model(args.model))
        if found is None:
            raise EdgeRuntimeError(f"{resolve_model(args.model)} is not calibrated (edge-runtime calibrate)")
        targets = equal_perplexity_densities(found[0], args.cap)
        cp = require_cuda("this benchmark", "scripts/compare_predictors.py compares the predictors on cpu")
    except EdgeRuntimeError as e:
        raise SystemExit(f"bench_predictors.py: error: {e}") from None
    repeats = {"repeats": 3, "warmup": 1} if args.smoke else {}
    l2 = (1 << 10) if args.smoke else cuda_l2_bytes(cp)  # smoke: two copies of the tiny sign plane
    kernels, rng = SparseFFNKernels(), np.random.default_rng(0)
    rows = [r for shape in shapes for enc in encodings
            for r in bench_encoding(cp, kernels, shape, enc, targets, l2, repeats, rng)]
    for name, t in targets.items():
        print(f"{name:11s} at {t['ppl_increase_pct']:+.2f} % perplexity (calibration): predicted {t['predicted']:.3f}, "
              f"kept {t['kept']:.3f}")
    print(f"{'shape':5} {'enc':5} {'part':15} {'predictor':11} {'ms':>8} {'pred':>6} {'kept':>6} {'proj/SI':>7}")
    for r in rows:
        ratio = r.get("projection_over_sparseinfer")
        print(f"{r['shape']:5} {r['encoding']:5} {r['part']:15} {r['predictor']:11} {r['ms']:8.4f} "
              f"{r['predicted']:6.3f} {r.get('kept', 0.0):6.3f} {'' if ratio is None else f'{ratio:7.2f}'}")
    if args.csv:
        atomic_write_csv(args.csv, rows)
    bad = [r for r in rows if r.get("max_rel_err", 0.0) >= MAX_REL_ERR or (r["part"] == "predictor alone"
                                                                           and r["predicted"] != 0)]
    if bad:
        raise SystemExit("bench_predictors.py: error: kernel output disagrees with numpy: "
                         + ", ".join(f"{r['shape']} {r['encoding']} {r['part']} {r['predictor']}" for r in bad))


if __name__ == "__main__":
    main()
