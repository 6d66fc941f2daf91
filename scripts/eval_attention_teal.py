"""The layers' weight bytes per token at a held-out perplexity cap: the best FFN-only setting against the best
setting of a path that also skips attention columns (TEAL on q/k/v and o, beside the FFN predictor).

  python scripts/eval_attention_teal.py --text docs/heldout-alice.txt [--model DIR] [--max-tokens 4096]
      [--cap 1.0] [--calibration-book ../shared/corpora/gutenberg/austen-persuasion.txt | --calibration FILE]
      [--calibration-tokens 2048] [--attention-levels 0,0.1,...] [--attention-criterion teal|wina]
      [--save-calibration FILE]
      [--profile jetson-agx-orin-64gb] [--json]

FFN-only candidates: every point of the model's shipped calibration paths and uniform settings (both
predictors), and of FFN-only paths calibrated on the same book and tokens as the combined ones. Combined
candidates: every point of the paths `calibrate` builds with attention moves, on the calibration book (or
read from --calibration, a YAML written by --save-calibration, with its FFN-only twin FILE-ffn.yaml).
Candidates whose calibration-text perplexity rose by more than 3x the cap are not measured. Each candidate's held-out
perplexity and bytes come from batched passes with the per-token masks and thresholds (equal to token-by-token sparse
decode, tests/test_policy.py and tests/test_attention_teal.py): FFN bytes from the predicted and kept rows,
attention bytes from the input channels each token keeps. The winner of each family (fewest layer bytes within
the cap) is then run token by token by `evaluate_text`, as `eval --json` does, and its counters reported. Last,
the projected decode-time ratio sparse/dense of a Llama-2-7B shape on the profile's top mode at the winners'
byte fractions: a projection from the profile's bandwidth, not a measurement.
"""

from __future__ import annotations

import edge_runtime  # before numpy, as the CLI does: OpenBLAS's idle spin, edge_runtime/blas_spin.py

# isort: split
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from corpus_text import prepared  # scripts/, beside this file

from edge_runtime.cli_args import description
from edge_runtime.devices.profile import load_profile
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.devices.sizes import DEFAULT_KV_TOKENS, decode_bytes_per_token
from edge_runtime.evaluate import evaluate_text
from edge_runtime.scoring import nll, windowed
from edge_runtime.sparsity.calibrate import (
    ATTN_LEVELS,
    attention_criterion,
    attention_teal,
    calibrate,
    ffn_bytes,
    rules_for,
)
from edge_runtime.sparsity.policy import projected_ms
from edge_runtime.sparsity.wina import CRITERIA


def measure(rt, wins, rules, teal, criterion: str = "teal") -> dict:
    """Held-out perplexity and bytes fractions (FFN, attention, layers) for one setting."""
    dec = rt.decoder
    dec.set_sparsity(rules)
    dec.set_teal(teal, criterion)
    layers = rt.backend.weights.layers

    def score(i, p, a):  # the criterion's channel score: |x| (TEAL) or |x| * W's column norm (WINA)
        return np.abs(a) * layers[i].column_norm(p) if criterion == "wina" else np.abs(a)

    ffn: dict[int, list] = {}
    attn: dict[int, list] = {}
    ffn_in: dict[int, np.ndarray] = {}

    def observe(i, point, a):
        th = teal[i] if teal else {}
        if point in ("attn_in", "attn_out"):
            names = ("q", "k", "v") if point == "attn_in" else ("o",)
            for p in names:
                attn.setdefault(i, []).append((p, len(a), float((score(i, p, a) >= th[p]).sum()) if p in th else None))
        elif point == "ffn_in":
            ffn_in[i] = a
        elif point == "ffn_act":
            pred = rules[i].active(ffn_in[i], layers[i].gate_signs)
            ffn.setdefault(i, []).append((len(a), float(pred.sum()), float((pred & (a > 0)).sum())))

    dec.observer = observe
    total, n = 0.0, 0
    try:
        for w in wins:
            dec.reset()
            total += float(nll(dec.forward(w[:-1], batched_sparse=True), w[1:]).sum())
            n += len(w) - 1
    finally:
        dec.observer = None
        dec.set_teal(None)
        dec.set_sparsity(None)
    ffn_used = attn_used = 0.0
    for i, L in enumerate(layers):
        t = sum(r[0] for r in ffn[i])
        row = {"predicted_density": sum(r[1] for r in ffn[i]) / (t * rt.config.ffn_dim),
               "kept_density": sum(r[2] for r in ffn[i]) / (t * rt.config.ffn_dim)}
        ffn_used += ffn_bytes(L, row, rules[i].kind, rt.config.ffn_dim)
        kept = {p: None for p in ("q", "k", "v", "o")}
        for p, _t, k in attn[i]:
            if k is not None:
                kept[p] = (kept[p] or 0.0) + k / t
        attn_used += L.attn_read_bytes(kept)
    ffn_dense = sum(L.ffn_dense_bytes() for L in layers)
    attn_dense = sum(L.attn_dense_bytes() for L in layers)
    return {"ppl": float(np.exp(total / n)), "ffn_bytes_fraction": ffn_used / ffn_dense,
            "attn_bytes_fraction": attn_used / attn_dense,
            "layer_bytes_fraction": (ffn_used + attn_used) / (ffn_dense + attn_dense)}


def candidates(calib: dict, thresholds: dict, with_uniform: bool, tag: str = "") -> list[dict]:
    out = []
    for pred, sec in calib["predictors"].items():
        grid = tuple(sec["grid"])
        points = [dict(p, source=f"{tag}{pred} path {j}") for j, p in enumerate(sec["path"])]
        if with_uniform:
            points += [{"knobs": [u["knob"]] * len(sec["layers"]), "ppl_increase_pct": u["ppl_increase_pct"],
                        "source": f"{pred} uniform {u['knob']:g}"} for u in sec["uniform"]]
        for p in points:
            out.append({"source": p["source"], "predictor": pred, "knobs": p["knobs"],
                        "attention": p.get("attention"), "calibration_ppl_pct": p["ppl_increase_pct"],
                        "rules": rules_for(pred, grid, thresholds, [grid.index(k) for k in p["knobs"]]),
                        "teal": attention_teal(sec.get("attention"), p.get("attention")),
                        "criterion": attention_criterion(sec.get("attention"))})
    return out


def best_within(rt, wins, ppl_dense: float, cands: list[dict], cap: float, log) -> list[dict]:
    """Every candidate measured on the held-out windows, those within the cap sorted by layer bytes."""
    ok = []
    for c in cands:
        if c["calibration_ppl_pct"] > 3 * cap:
            continue
        m = measure(rt, wins, c["rules"], c["teal"], c["criterion"])
        m["ppl_increase_pct"] = 100 * (m["ppl"] / ppl_dense - 1)
        c.update(heldout=m)
        log(f"  {c['source']:28s} ppl {m['ppl_increase_pct']:+.2f} %  layers {m['layer_bytes_fraction']:.4f}  "
            f"FFN {m['ffn_bytes_fraction']:.4f}  attention {m['attn_bytes_fraction']:.4f}")
        if m["ppl_increase_pct"] <= cap:
            ok.append(c)
    return sorted(ok, key=lambda c: c["heldout"]["layer_bytes_fraction"])


def confirm(rt, text: str, max_tokens: int, ranked: list[dict], cap: float) -> dict | None:
    """The first of the ranked candidates whose token-by-token evaluation stays within the cap."""
    for c in ranked[:3]:
        rt.decoder.set_teal(c["teal"], c["criterion"])
        res = evaluate_text(rt, text, c["rules"], max_tokens=max_tokens)
        rt.decoder.set_teal(None)
        res["ppl_increase_pct"] = 100 * (res["ppl_sparse"] / res["ppl_dense"] - 1)
        if res["ppl_increase_pct"] <= cap:
            keys = ("tokens", "ppl_dense", "ppl_sparse", "ppl_increase_pct", "ffn_bytes_fraction",
                    "attn_bytes_fraction", "layer_bytes_fraction", "step_bytes_fraction", "layer_bytes_per_token",
                    "lm_head_bytes_per_token", "step_bytes_per_token")
            return {"source": c["source"], "predictor": c["predictor"], "knobs": c["knobs"],
                    "attention": c["attention"], "criterion": c["criterion"], "heldout_batched": c["heldout"],
                    "eval": {k: res[k] for k in keys if k in res}}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", required=True)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--cap", type=float, default=1.0, help="held-out perplexity increase allowed, percent")
    ap.add_argument("--calibration-book", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpora"
                                                      / "gutenberg" / "austen-persuasion.txt"))
    ap.add_argument("--calibration-tokens", type=int, default=2048, help="tokens of the book calibration reads")
    ap.add_argument("--attention-levels", default=None,
                    help="comma-separated TEAL levels of the attention moves, from 0 (default: calibrate's)")
    ap.add_argument("--attention-criterion", choices=CRITERIA, default="teal",
                    help="how the attention thresholds keep channels: |x| (teal) or |x| * column norm (wina)")
    ap.add_argument("--calibration", help="a combined calibration YAML (from --save-calibration): skip calibrating")
    ap.add_argument("--save-calibration", help="write the combined calibration (and its thresholds) here")
    ap.add_argument("--profile", default="jetson-agx-orin-64gb")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    t0 = time.time()
    rt = edge_runtime.load(args.model, profile=None, backend="cpu")
    if rt.calibration is None:
        raise SystemExit("the model is not calibrated (its FFN-only paths are the baseline)")
    text = Path(args.text).read_text(encoding="utf-8")
    wins = windowed(rt.encode(text), 256, args.max_tokens)
    # The combined calibration and an FFN-only one on the same text and tokens (its paths join the FFN-only
    # candidates: the baseline gets whatever the calibration text gives the combined path).
    if args.calibration:
        combined, combined_th = _read(Path(args.calibration))
        ffn_path = _ffn_file(Path(args.calibration))
        ffn_cal, ffn_th = _read(ffn_path) if ffn_path.is_file() else (None, {})
    else:
        levels = ATTN_LEVELS if args.attention_levels is None else tuple(
            float(v) for v in args.attention_levels.split(","))
        book = prepared(Path(args.calibration_book))
        t = time.time()
        combined, combined_th = calibrate(rt, book, source=Path(args.calibration_book).name,
                                          max_tokens=args.calibration_tokens, attention_levels=levels,
                                          attention_criterion=args.attention_criterion)
        log(f"combined calibration: {time.time() - t:.0f} s")
        ffn_cal, ffn_th = calibrate(rt, book, source=Path(args.calibration_book).name,
                                    max_tokens=args.calibration_tokens, attention_levels=())
        if args.save_calibration:
            _write(Path(args.save_calibration), combined, combined_th)
            _write(_ffn_file(Path(args.save_calibration)), ffn_cal, ffn_th)
    ppl_dense = float(np.exp(np.mean(np.concatenate([nll(_dense(rt, w), w[1:]) for w in wins]))))
    log(f"held-out: {sum(len(w) - 1 for w in wins)} tokens, dense perplexity {ppl_dense:.3f}")
    log("FFN-only (the shipped calibration's paths and uniform settings):")
    ffn_cands = candidates(rt.calibration, rt.thresholds, True, "shipped ")
    if ffn_cal is not None:
        ffn_cands += candidates(ffn_cal, ffn_th, False, "book ")
    ffn_only = best_within(rt, wins, ppl_dense, ffn_cands, args.cap, log)
    log("FFN predictor + attention TEAL (the combined paths):")
    both = best_within(rt, wins, ppl_dense, candidates(combined, combined_th, False), args.cap, log)
    out = {"cap_pct": args.cap, "ppl_dense": ppl_dense,
           "ffn_only": confirm(rt, text, args.max_tokens, ffn_only, args.cap),
           "combined": confirm(rt, text, args.max_tokens, both, args.cap)}
    if out["ffn_only"] and out["combined"]:
        a = out["ffn_only"]["eval"]["layer_bytes_fraction"]
        b = out["combined"]["eval"]["layer_bytes_fraction"]
        out["layer_bytes_reduction"] = 1 - b / a
        out["projection_7b"] = project_7b(args.profile, out)
    out["wall_s"] = time.time() - t0
    if args.json:
        print(json.dumps(out))
        return
    for key in ("ffn_only", "combined"):
        r = out[key]
        if r is None:
            print(f"{key}: no setting within +{args.cap:g} %")
            continue
        e = r["eval"]
        print(f"{key:9s} {r['source']}: knobs {r['knobs']} attention {r['attention']} ({r['criterion']})\n"
              f"          eval: ppl {e['ppl_increase_pct']:+.2f} %  layer bytes {e['layer_bytes_fraction']:.4f} "
              f"of dense "
              f"({e['layer_bytes_per_token']:.0f} B/token; FFN {e['ffn_bytes_fraction']:.4f}, attention "
              f"{e['attn_bytes_fraction']:.4f})  LM head {e['lm_head_bytes_per_token']:.0f} B  step "
              f"{e['step_bytes_fraction']:.4f} of dense")
    if "layer_bytes_reduction" in out:
        print(f"layer bytes: {100 * out['layer_bytes_reduction']:.1f} % fewer with attention TEAL (bar: >= 20 %)")
        p = out["projection_7b"]
        print(f"projection (not measured), Llama-2-7B shape {p['encoding']} on {p['profile']} {p['mode']}, "
              f"{p['kv_tokens']} KV tokens: sparse/dense time {p['ffn_only_ratio']:.3f} FFN-only "
              f"({1 / p['ffn_only_ratio']:.2f}x), {p['combined_ratio']:.3f} combined ({1 / p['combined_ratio']:.2f}x)")
    print(f"wall {out['wall_s']:.0f} s")


def _ffn_file(path: Path) -> Path:
    return path.with_name(path.stem + "-ffn" + path.suffix)


def _read(path: Path) -> tuple[dict, dict]:
    th_path = path.with_suffix(".npz")
    return yaml.safe_load(path.read_text()), dict(np.load(th_path)) if th_path.is_file() else {}


def _write(path: Path, calib: dict, thresholds: dict) -> None:
    path.write_text(yaml.safe_dump(calib, sort_keys=False, width=110))
    np.savez(path.with_suffix(".npz"), **thresholds)


def _dense(rt, w):
    rt.decoder.set_sparsity(None)
    rt.decoder.set_teal(None)
    rt.decoder.reset()
    return rt.decoder.forward(w[:-1])


def project_7b(profile_name: str, out: dict, encoding: str = "int8") -> dict:
    """Projected time per token of a Llama-2-7B shape at the winners' attention and FFN byte fractions over dense,
    on the profile's fastest mode (bytes / effective bandwidth + launches): a projection, not a measurement."""
    prof = load_profile(profile_name)
    cfg = SHAPES["llama2-7b"]
    mode = prof.top_mode().name

    def ms(ffn: float, attn: float) -> float:
        return projected_ms(prof, mode, cfg, decode_bytes_per_token(cfg, encoding, ffn, DEFAULT_KV_TOKENS, attn))

    dense = ms(1.0, 1.0)
    res = {"profile": prof.name, "mode": mode, "encoding": encoding, "kv_tokens": DEFAULT_KV_TOKENS,
           "dense_ms": dense}
    for key in ("ffn_only", "combined"):
        e = out[key]["eval"]
        res[f"{key}_ms"] = ms(e["ffn_bytes_fraction"], e.get("attn_bytes_fraction", 1.0))
        res[f"{key}_ratio"] = res[f"{key}_ms"] / dense
    return res


if __name__ == "__main__":
    main()
