"""Both sign-plane predictors on held-out text: perplexity change and FFN bytes per token for every
uniform knob and for the policy's per-layer point at the cap, for several quality caps; then, for each
projection setting, the FFN bytes SparseInfer needs for the same perplexity (interpolated on its
uniform sweep) and the ratio.

  python scripts/compare_predictors.py --text docs/heldout-alice.txt [--model DIR] [--max-tokens 4096] [--json]

Perplexities use the per-token predicted masks in batched passes (equal to token-by-token sparse
decode, tests/test_policy.py); bytes are FFN weight bytes read per token over dense, sign planes and
thresholds included, from the masks actually produced on this text.
"""

from __future__ import annotations

import edge_runtime  # before numpy, as the CLI does: OpenBLAS's idle spin, edge_runtime/blas_spin.py

# isort: split
import argparse
import json

import numpy as np

from edge_runtime.cli_args import description
from edge_runtime.scoring import nll, windowed
from edge_runtime.sparsity.calibrate import GRIDS, ffn_bytes, rules_for
from edge_runtime.sparsity.policy import within_cap


def measure(rt, wins, rules) -> tuple[float, float]:
    """(perplexity, FFN bytes fraction) with these per-layer rules (None = dense)."""
    dec = rt.decoder
    dec.set_sparsity(rules)
    masks: dict[int, list] = {}
    layers = rt.backend.weights.layers
    ffn_in: dict[int, np.ndarray] = {}

    def observe(i, point, a):
        if rules is None:
            return
        if point == "ffn_in":
            ffn_in[i] = a
        elif point == "ffn_act":  # the dense activation: a neuron fired where it is > 0
            pred = rules[i].active(ffn_in[i], layers[i].gate_signs)
            masks.setdefault(i, []).append((pred.mean(), (pred & (a > 0)).mean()))

    dec.observer = observe
    total, n = 0.0, 0
    for w in wins:
        dec.reset()
        total += float(nll(dec.forward(w[:-1], batched_sparse=True), w[1:]).sum())
        n += len(w) - 1
    dec.observer = None
    dec.set_sparsity(None)
    if rules is None:
        return float(np.exp(total / n)), 1.0
    dense = sum(L.ffn_dense_bytes() for L in layers)
    used = 0.0
    for i, L in enumerate(layers):
        pred, kept = np.mean([m[0] for m in masks[i]]), np.mean([m[1] for m in masks[i]])
        used += ffn_bytes(L, {"predicted_density": pred, "kept_density": kept}, rules[i].kind, rt.config.ffn_dim)
    return float(np.exp(total / n)), used / dense


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", required=True)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rt = edge_runtime.load(args.model, profile=None, backend="cpu")
    with open(args.text, encoding="utf-8") as f:
        wins = windowed(rt.encode(f.read()), 256, args.max_tokens)
    dense, _ = measure(rt, wins, None)
    out = {"ppl_dense": dense, "uniform": {}, "policy": {}}
    for pred, (_knob, grid) in GRIDS.items():
        rows = []
        for k, val in enumerate(grid):
            ppl, frac = measure(rt, wins, rules_for(pred, grid, rt.thresholds, [k] * rt.config.n_layers))
            rows.append({"knob": val, "ppl_increase_pct": 100 * (ppl / dense - 1), "ffn_bytes_fraction": frac})
        out["uniform"][pred] = rows
        for budget in (0.25, 0.5, 1.0):
            # the furthest path point within the cap: where the policy runs when speed cannot be held
            path = rt.calibration["predictors"][pred]["path"]
            knobs = path[(within_cap(path, budget) or [0])[-1]]["knobs"]
            ppl, frac = measure(rt, wins, rules_for(pred, grid, rt.thresholds, [grid.index(k) for k in knobs]))
            out["policy"].setdefault(pred, []).append({"budget_pct": budget, "knobs": knobs,
                                                       "ppl_increase_pct": 100 * (ppl / dense - 1),
                                                       "ffn_bytes_fraction": frac})
    # SparseInfer's bytes at the projection points' perplexity, on SparseInfer's uniform curve
    si = sorted(out["uniform"]["sparseinfer"], key=lambda r: r["ppl_increase_pct"])
    xs, ys = [r["ppl_increase_pct"] for r in si], [r["ffn_bytes_fraction"] for r in si]
    ratios = []
    for r in out["uniform"]["projection"] + out["policy"]["projection"]:
        if r["ppl_increase_pct"] <= 1.0 and xs[0] <= r["ppl_increase_pct"] <= xs[-1]:
            need = float(np.interp(r["ppl_increase_pct"], xs, ys))
            ratios.append({"projection": r, "sparseinfer_bytes_at_same_ppl": need,
                           "ratio": r["ffn_bytes_fraction"] / need})
    out["projection_vs_sparseinfer"] = ratios
    if args.json:
        print(json.dumps(out))
        return
    print(f"dense perplexity {dense:.3f} on {sum(len(w) - 1 for w in wins)} tokens")
    for pred in GRIDS:
        for r in out["uniform"][pred]:
            print(f"  {pred:11s} uniform {r['knob']:<5g}  ppl {r['ppl_increase_pct']:+6.2f} %  FFN bytes "
                  f"{r['ffn_bytes_fraction']:.3f}")
        for r in out["policy"][pred]:
            print(f"  {pred:11s} policy +{r['budget_pct']:g} %  knobs {r['knobs']}  ppl {r['ppl_increase_pct']:+6.2f} %"
                  f"  FFN bytes {r['ffn_bytes_fraction']:.3f}")
    for r in ratios:
        p = r["projection"]
        print(f"  projection {p.get('knob', p.get('knobs'))}: {p['ffn_bytes_fraction']:.3f} at "
              f"{p['ppl_increase_pct']:+.2f} % vs SparseInfer {r['sparseinfer_bytes_at_same_ppl']:.3f}: "
              f"ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
