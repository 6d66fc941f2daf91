"""TEAL and WINA on stories260K (a SiLU model): held-out perplexity at 25 / 40 / 50 % activation sparsity.

In-domain text is sampled from the model itself (temperature 1, seeds 0..N-1); the first half of the
samples calibrates the thresholds of both criteria (TEAL's |x|, WINA's |x| * weight column norm; the
calibration keeps one), the second half is evaluated. Perplexity is computed with the per-token masks in
one batched pass (equal to token-by-token decode, see tests).

  python scripts/teal_stories.py [--hf ../shared/models/stories260K-hf] [--samples 40] [--json]
"""

from __future__ import annotations

import edge_runtime  # noqa: F401  (before numpy, as the CLI does: OpenBLAS's idle spin, edge_runtime/blas_spin.py)

# isort: split
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.cli_args import description
from edge_runtime.pack.convert import convert
from edge_runtime.runtime import load
from edge_runtime.sparsity.perplexity import perplexity
from edge_runtime.sparsity.teal import better_criteria, calibrate_teal, thresholds_for
from edge_runtime.sparsity.wina import CRITERIA


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--hf", type=Path, default=Path("../shared/models/stories260K-hf"))
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        convert(args.hf, Path(tmp) / "m", "fp32", progress=False)
        rt = load(Path(tmp) / "m", profile=None, backend="cpu")
        samples = [[1] + rt.generate([1], max_new_tokens=args.tokens, temperature=1.0, seed=s).token_ids
                   for s in range(args.samples)]
        half = args.samples // 2
        calib_wins = [np.asarray(s, dtype=np.int64) for s in samples[:half]]
        eval_wins = [np.asarray(s, dtype=np.int64) for s in samples[half:]]
        dense = perplexity(rt, eval_wins, None)
        rows, compared = [], {}
        for criterion in CRITERIA:  # each calibrated alone, so both are evaluated on the held-out half
            teal = calibrate_teal(rt, calib_wins, criteria=(criterion,))
            compared.update(teal["compared"])  # its perplexities on the calibration text
            for target in (0.25, 0.4, 0.5):
                p = perplexity(rt, eval_wins, None, teal=thresholds_for(teal, target), criterion=criterion)
                rows.append({"criterion": criterion, "teal_target": target, "ppl": p,
                             "ppl_increase_pct": 100 * (p / dense - 1)})
        chosen = better_criteria(compared)  # what `calibrate` keeps per target: judged on the calibration text
    out = {"ppl_dense": dense, "eval_tokens": int(sum(len(w) - 1 for w in eval_wins)), "chosen": chosen,
           "teal": rows}
    if args.json:
        print(json.dumps(out))
        return
    print(f"stories260K, {out['eval_tokens']} held-out self-sampled tokens: dense perplexity {dense:.3f}")
    for r in rows:
        print(f"  {r['criterion'].upper():4s} {r['teal_target']:.0%}: perplexity {r['ppl']:.3f} "
              f"({r['ppl_increase_pct']:+.2f} %)")
    print("  criterion calibration keeps: " + ", ".join(f"{t}: {c}" for t, c in chosen.items()))


if __name__ == "__main__":
    main()
