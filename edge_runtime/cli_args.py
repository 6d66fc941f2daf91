"""argparse types with ranges, shared by every subcommand: a value out of range, NaN or infinite is
refused by argparse itself (usage line, one error line naming the flag, exit status 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_COUNT = 1 << 24  # tokens, context positions, top-k: far above any model this runtime holds
MAX_SEED = 2**63 - 1


def int_range(low: int, high: int, even: bool = False) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range [{low}, {high}]")
        if even and value % 2:
            raise argparse.ArgumentTypeError(f"{value} must be even")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high], either end open when asked."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range {span}")
        return value

    parse.__name__ = "number"
    return parse


port = int_range(1, 65535)
count = int_range(1, MAX_COUNT)  # how many tokens, positions, repeats: at least one
seed = int_range(0, MAX_SEED)
alpha = float_range(0.0, 10.0, low_open=True)  # SparseInfer's sign-vote scale; the calibrated grid is 0.9..1.3
fraction = float_range(0.0, 1.0, low_open=True, high_open=True)  # a sparsity target
probability = float_range(0.0, 1.0, low_open=True)  # top-p
temperature = float_range(0.0, 100.0)
penalty = float_range(0.0, 100.0, low_open=True)


def description(doc: str) -> str:
    """A script's --help description: its docstring's first paragraph on one line (argparse wraps it again); the
    first line alone stopped mid-sentence."""
    return " ".join(doc.strip().split("\n\n")[0].split())
