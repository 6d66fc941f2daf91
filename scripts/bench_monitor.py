"""What the monitor costs: decode tokens/s with the background sampler running at --interval-ms against
without it, alternating runs in one process (medians). Prints the overhead in percent.

  python scripts/bench_monitor.py [--model DIR] [--interval-ms 100] [--tokens 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import edge_runtime
from edge_runtime.cli_args import description
from edge_runtime.monitor.command import default_samplers
from edge_runtime.monitor.recorder import Recorder


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default=None)
    ap.add_argument("--interval-ms", type=float, default=100.0)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rt = edge_runtime.load(args.model, backend="cpu")
    prompt = "The old man looked at the sea and"
    rt.generate(prompt, max_new_tokens=16)
    off, on, samples = [], [], 0
    for _ in range(args.rounds):
        off.append(rt.generate(prompt, max_new_tokens=args.tokens).decode_tokens_per_s)
        rec = Recorder(default_samplers(), interval_s=args.interval_ms / 1000).start()
        rt.token_listeners.append(rec.on_token)
        on.append(rt.generate(prompt, max_new_tokens=args.tokens).decode_tokens_per_s)
        rt.token_listeners.remove(rec.on_token)
        rec.stop()
        samples += len(rec.snapshot())
    a, b = statistics.median(off), statistics.median(on)
    # the direct cost: one sample's duration over the interval (the CPU share the sampler thread takes)
    rec = Recorder(default_samplers(), interval_s=args.interval_ms / 1000)
    costs = []
    for _ in range(200):
        t0 = time.perf_counter()
        rec.sample_once()
        costs.append(time.perf_counter() - t0)
    per_sample = statistics.median(costs)
    print(json.dumps({"tokens_per_s_without": a, "tokens_per_s_with": b, "overhead_pct": 100 * (1 - b / a),
                      "run_to_run_spread_pct": 100 * (max(off) - min(off)) / a,
                      "sample_cost_us": per_sample * 1e6, "sampler_duty_pct": 100 * per_sample / rec.interval_s,
                      "interval_ms": args.interval_ms, "samples_taken": samples,
                      "samplers": [s.name for s in default_samplers()]}))


if __name__ == "__main__":
    main()
