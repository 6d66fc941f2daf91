"""Pack, calibrate and evaluate the trained default model into edge_runtime/data/default-model.

  python scripts/package_default_model.py --hf runs2/l1 --corpus ../shared/corpora/gutenberg \
      [--calibration-book austen-persuasion.txt] [--holdout carroll-alice.txt]

Writes the int8 packed model (with its default alpha), calibration.yaml and the projection thresholds,
and the prepared held-out text under docs/ (what `edge-runtime eval` is run on for the model card).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from corpus_text import prepared

from edge_runtime.cli_args import description
from edge_runtime.pack.convert import convert
from edge_runtime.pack.format import atomic_directory
from edge_runtime.paths import DEFAULT_MODEL_DIR
from edge_runtime.runtime import load
from edge_runtime.sparsity.calibrate import calibrate
from edge_runtime.sparsity.calibration_files import write_calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--hf", type=Path, required=True, help="the exported Hugging Face directory")
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--calibration-book", default="austen-persuasion.txt", help="a training book")
    ap.add_argument("--holdout", default="carroll-alice.txt")
    ap.add_argument("--default-alpha", type=float, default=1.15)
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    args = ap.parse_args()
    with atomic_directory(args.out, overwrite=True) as staged:  # the old model stays until this succeeds
        convert(args.hf, staged, "int8", default_alpha=args.default_alpha, overwrite=True)
        rt = load(staged, profile=None, backend="cpu")
        calib, thresholds = calibrate(rt, prepared(args.corpus / args.calibration_book), source=args.calibration_book)
        write_calibration(staged, calib, thresholds)
    args.docs.mkdir(exist_ok=True)
    (args.docs / "heldout-alice.txt").write_text(prepared(args.corpus / args.holdout), encoding="utf-8")
    print(f"packed and calibrated into {args.out}")


if __name__ == "__main__":
    main()
