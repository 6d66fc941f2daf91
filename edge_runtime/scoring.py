"""Scoring text: windows of token ids and their negative log-likelihood under a model's logits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_runtime.errors import NumericalError


def windowed(ids: Sequence[int], window: int, max_tokens: int) -> list[np.ndarray]:
    """The first max_tokens + 1 ids cut into windows of window + 1 (inputs and their next-token targets)."""
    arr = np.asarray(ids[: max_tokens + 1], dtype=np.int64)
    return [arr[s:s + window + 1] for s in range(0, len(arr) - 1, window) if len(arr[s:s + window + 1]) > 1]


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood (float64); logits (T, V), targets (T,) int. Logits with NaN or inf (a
    model whose weights are not finite) stop with a NumericalError: a NaN perplexity would be printed as a result,
    written into calibration.yaml, and is not even valid JSON."""
    if not np.isfinite(logits).all():
        raise NumericalError.logits("on the text")
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]
