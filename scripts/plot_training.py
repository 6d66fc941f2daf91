"""Loss curves of the default model and its no-L1 baseline from their train_log.json files -> a PNG.

  python scripts/plot_training.py runs2/l1/train_log.json runs2/base/train_log.json --out docs/training.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from edge_runtime.cli_args import description

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit("plot_training.py: error: needs matplotlib: pip install '.[train]'") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.logs:
        log = json.loads(path.read_text())["log"]
        label = path.parent.name
        steps = [r["step"] for r in log]
        ce = [r["ce"] for r in log]
        k = 20  # moving average over 20 steps
        smooth = [sum(ce[max(0, i - k + 1):i + 1]) / len(ce[max(0, i - k + 1):i + 1]) for i in range(len(ce))]
        a1.plot(steps, smooth, label=f"{label} train CE (20-step mean)")
        held = [(r["step"], r["heldout_ppl"]) for r in log if "heldout_ppl" in r]
        if held:
            a1.plot([s for s, _ in held], [math.log(p) for _, p in held], "o--", label=f"{label} held-out")
        a2.plot(steps, [r["sparsity"] for r in log], label=label)
    a1.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    a2.set(xlabel="step", ylabel="fraction of relu(gate) == 0", title="FFN activation sparsity (train batch)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
