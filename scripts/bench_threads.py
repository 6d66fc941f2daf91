"""Decode tokens/s of one packed model on 1 and on N threads, alternating rounds in one process, so the ratio
comes from one run on the same machine state (decode steps only, greedy, after one warm-up each).

  python scripts/bench_threads.py --model /tmp/edge-runtime-bench/llama-110m-int8 [--threads 2] [--rounds 4]

(bench_cpu.py --synthetic builds that model.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import edge_runtime
from edge_runtime.cli_args import description
from edge_runtime.model.sampling import SamplingParams

PROMPT_IDS = [1, 450, 2030, 338, 263]


def rate(rt, tokens: int) -> float:
    d = rt.decoder
    d.start(PROMPT_IDS, SamplingParams())
    t = time.perf_counter()
    for _ in range(tokens):
        d.decode_step()
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    rts = {t: edge_runtime.load(args.model, profile=None, backend="cpu", threads=t) for t in (1, args.threads)}
    for rt in rts.values():
        rate(rt, 8)
    runs: dict[int, list[float]] = {t: [] for t in rts}
    for _ in range(args.rounds):
        for t, rt in rts.items():
            runs[t].append(rate(rt, args.tokens))
    for t, v in runs.items():
        print(f"{t} thread(s): median {statistics.median(v):.1f} tokens/s, rounds {[round(x, 1) for x in v]}")
    print(f"ratio {args.threads}/1: {statistics.median(runs[args.threads]) / statistics.median(runs[1]):.3f}")


if __name__ == "__main__":
    main()
