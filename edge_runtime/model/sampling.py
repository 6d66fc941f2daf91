"""Next-token choice from host logits: greedy, temperature, top-k, top-p, repetition penalty, seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import EdgeRuntimeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF semantics: positive logits divided, negative multiplied
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EdgeRuntimeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EdgeRuntimeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EdgeRuntimeError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise EdgeRuntimeError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """logits (vocab,) float32; history: prompt and generated ids (for the repetition penalty)."""
        p = self.p
        logits = np.asarray(logits, dtype=np.float64)
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history))
            vals = logits[seen]
            logits = logits.copy()
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            mask = np.zeros_like(probs)
            mask[order[:cut]] = 1.0
            probs = probs * mask
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
