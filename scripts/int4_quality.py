"""int4's per-group scale search against plain absmax scales: perplexity and mean KL to the fp32 model.

One Hugging Face checkpoint converted three times (fp32, int4 with absmax scales, int4 as convert stores it),
each evaluated on the same windows of a text by batched prefill; KL(fp32 || int4) per position, averaged.

  python scripts/int4_quality.py [--hf ../shared/models/stories260K-hf] --text FILE [--group 64] [--json]
"""

from __future__ import annotations

import edge_runtime  # noqa: F401  (before numpy, as the CLI does: OpenBLAS's idle spin, edge_runtime/blas_spin.py)

# isort: split
import argparse
import json
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

import edge_runtime.pack.quant as quant
from edge_runtime.cli_args import description
from edge_runtime.pack.convert import convert
from edge_runtime.runtime import load
from edge_runtime.scoring import windowed


def log_probs(model: Path, text: str, window: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities (T, V) float64 over every window's positions, the targets (T,))."""
    with load(model, profile=None, backend="cpu", warm_up=False) as rt:
        wins = windowed(rt.encode(text), window, tokens)
        out = []
        for w in wins:
            rt.decoder.reset()
            out.append(rt.decoder.forward(w[:-1].tolist()).astype(np.float64))
    lp = np.concatenate(out)
    lp -= lp.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    return lp, np.concatenate([w[1:] for w in wins])


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--hf", type=Path, default=Path("../shared/models/stories260K-hf"))
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--group", type=int, default=quant.DEFAULT_INT4_GROUP)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    text = args.text.read_text(encoding="utf-8")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype, shrink in (("fp32", "fp32", None), ("int4 absmax", "int4", [1.0]),
                                    ("int4 searched", "int4", None)):
            out = Path(tmp) / name.replace(" ", "-")
            with mock.patch.object(quant, "INT4_SHRINK", np.array(shrink) if shrink else quant.INT4_SHRINK):
                convert(args.hf, out, dtype, group_size=args.group, progress=False)
            lp, targets = log_probs(out, text, args.window, args.tokens)
            ref = rows["fp32"]["lp"] if rows else lp
            rows[name] = {"lp": lp, "ppl": float(np.exp(-lp[np.arange(len(targets)), targets].mean())),
                          "kl": float((np.exp(ref) * (ref - lp)).sum(axis=1).mean()), "tokens": len(targets)}
    base = rows["fp32"]["ppl"]
    result = {name: {"ppl": r["ppl"], "ppl_increase_pct": 100 * (r["ppl"] / base - 1), "mean_kl": r["kl"],
                     "tokens": r["tokens"]} for name, r in rows.items()}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.hf.name}, {args.text.name}, group {args.group}, {result['fp32']['tokens']} tokens")
    for name, r in result.items():
        print(f"  {name:14s} perplexity {r['ppl']:9.3f} ({r['ppl_increase_pct']:+6.2f} %)  mean KL {r['mean_kl']:.4f}")


if __name__ == "__main__":
    main()
