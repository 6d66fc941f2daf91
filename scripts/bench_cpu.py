"""CPU (numpy backend) decode benchmark: tokens/s dense and sparse, weight bytes, peak RSS of generate.

  python scripts/bench_cpu.py --model DIR [--tokens 256] [--repeats 3]
  python scripts/bench_cpu.py --hf ../shared/models/stories260K-hf --dtype fp32   (converts first)

Decode tokens/s is timed over the decode steps only (the prompt's batched prefill excluded), median of
--repeats runs after one warm-up. Peak RSS is measured on a separate `edge-runtime generate` process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_runtime.bench import decode_rate, print_report
from edge_runtime.pack.convert import convert
from edge_runtime.runtime import load


def peak_rss_mb(model: Path, prompt: str, tokens: int) -> float:
    """ru_maxrss of a child `edge-runtime generate` (kilobytes on Linux)."""
    cmd = [sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(model), "--prompt", prompt,
           "--max-new-tokens", str(tokens), "--backend", "cpu"]
    subprocess.run(cmd, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--hf", type=Path, help="Hugging Face directory to convert first")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=None, help="also time sparse decode at this alpha")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.hf:
            model = Path(tmp) / "packed"
            convert(args.hf, model, args.dtype, progress=False)
        if model is None:
            ap.error("give --model or --hf")
        rt = load(model, profile=None, backend="cpu")
        dense, _ = decode_rate(rt, args.prompt, args.tokens, args.repeats)
        row = {"model": str(args.hf or model), "encoding": rt.model.manifest["encoding"],
               "weight_mb": rt.model.weight_bytes / 1e6, "decode_tokens_per_s_dense": dense}
        if args.alpha is not None and rt.config.relu_family:
            rt.set_sparsity(args.alpha)
            sparse, stats = decode_rate(rt, args.prompt, args.tokens, args.repeats)
            row.update(decode_tokens_per_s_sparse=sparse, sparse_over_dense=sparse / dense,
                       ffn_bytes_fraction=stats["ffn_bytes_fraction"])
        row["peak_rss_mb"] = peak_rss_mb(model, args.prompt, args.tokens)
        row["rss_over_weights_mb"] = row["peak_rss_mb"] - row["weight_mb"]
    if args.json:
        print(json.dumps(row))
    else:
        print_report(row, 28)


if __name__ == "__main__":
    main()
