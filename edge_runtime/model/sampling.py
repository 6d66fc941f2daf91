"""Next-token choice from host logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

Numerically safe for every valid parameter: logits are shifted so that their maximum is 0 before the
division by the temperature, so a denormal temperature sends the others to -inf (exp 0) instead of
computing inf - inf; NaN logits count as -inf and +inf logits share the mass between them. The backends do not
sample from such logits at all: their sample step writes NO_TOKEN, and the decoder stops with a NumericalError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import EdgeRuntimeError

MAX_SEED = 2**63 - 1
# The id a backend's sample step writes when a logit is NaN or infinite: a model whose weights or activations are
# not finite (damaged, or converted from a checkpoint that held NaN) would otherwise answer token 0 over and over
# when greedy, or a plausible-looking random draw when sampling.
NO_TOKEN = -1


def finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise EdgeRuntimeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF semantics: positive logits divided, negative multiplied
    seed: int | None = None

    def __post_init__(self) -> None:
        if finite("temperature", self.temperature) < 0:
            raise EdgeRuntimeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < finite("top_p", self.top_p) <= 1:
            raise EdgeRuntimeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise EdgeRuntimeError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if finite("repetition_penalty", self.repetition_penalty) <= 0:
            raise EdgeRuntimeError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise EdgeRuntimeError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")


def _shifted(logits: np.ndarray) -> np.ndarray:
    """logits (vocab,) float64 -> the same minus their maximum: values in [-inf, 0], at least one 0."""
    logits = np.where(np.isnan(logits), -np.inf, logits)
    top = logits.max()
    if top == np.inf:  # only the +inf tokens can win
        return np.where(logits == np.inf, 0.0, -np.inf)
    if top == -np.inf:  # nothing finite at all: every token equally likely
        return np.zeros_like(logits)
    return logits - top


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """logits (vocab,) float32; history: prompt and generated ids (for the repetition penalty)."""
        p = self.p
        logits = np.asarray(logits, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if p.repetition_penalty != 1.0 and len(history):
                seen = np.unique(np.asarray(history))
                vals = logits[seen]
                logits = logits.copy()
                logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            z = _shifted(logits)  # (vocab,) in [-inf, 0]
            if p.temperature == 0:
                return int(np.argmax(z))
            z = z / p.temperature  # 0 stays 0, negatives grow towards -inf: never NaN
        if 0 < p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z)  # the maximum is exp(0) = 1, so the sum is >= 1
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            cut = min(int(np.searchsorted(cum, p.top_p)) + 1, probs.size)
            mask = np.zeros_like(probs)
            mask[order[:cut]] = 1.0
            probs = probs * mask
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
