"""A robot's control loop asks the on-board model for a short instruction each cycle, with a hard
deadline so that a slow answer never stalls the loop: whatever was decoded when time is up is used.

    python examples/robot_command_loop.py [--model DIR] [--deadline-ms 150] [--cycles 5]
"""

from __future__ import annotations

import argparse
import time

import edge_runtime

OBSERVATIONS = ["The door ahead is closed.", "A cup is on the table.", "The hallway turns left."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="packed model (default: the embedded one)")
    ap.add_argument("--deadline-ms", type=float, default=150.0)
    ap.add_argument("--cycles", type=int, default=5)
    args = ap.parse_args()
    with edge_runtime.load(args.model, backend="auto") as rt:
        # The device profile's policy picks each layer's predictor setting and re-picks it when the power
        # mode changes; without a calibration there is nothing to pick from, so use the model's stored alpha.
        by_policy = rt.follow_policy()
        if not by_policy and rt.config.relu_family:
            rt.set_sparsity(rt.default_alpha)
        info = rt.health_info()
        source = f"chosen by the {info['profile']} policy" if by_policy else "the model's stored alpha"
        print(f"decode: {info['decode']}, predictor {info['predictor']['in_use']}, {source}")
        for cycle in range(args.cycles):
            obs = OBSERVATIONS[cycle % len(OBSERVATIONS)]
            t0 = time.perf_counter()
            res = rt.generate(f"{obs} The robot should", max_new_tokens=24, deadline_s=args.deadline_ms / 1000,
                              stop=["."])
            ms = 1000 * (time.perf_counter() - t0)
            print(f"cycle {cycle}: {obs!r} -> {res.text.strip()!r} ({res.finish_reason}, {ms:.0f} ms)")


if __name__ == "__main__":
    main()
