"""Perplexity of a runtime over token windows with a sparsity setting applied the way sparse decode applies it
(each token's own predicted FFN mask and TEAL thresholds, in one batched pass per window): what calibration
and its scripts judge settings by."""

from __future__ import annotations

import numpy as np

from edge_runtime.scoring import nll
from edge_runtime.sparsity.predictor import Rule


def perplexity(rt, wins: list[np.ndarray], rules: list[Rule] | None, teal: list[dict] | None = None) -> float:
    """Perplexity over the windows; with rules, each token's FFN uses its own predicted mask; with teal,
    per-layer TEAL thresholds mask the projections' inputs."""
    dec = rt.decoder
    saved, saved_teal = dec.rules, dec.teal
    dec.set_sparsity(rules)
    dec.teal = teal
    total, n = 0.0, 0
    try:
        for w in wins:
            dec.reset(clear_stats=False)
            total += float(nll(dec.forward(w[:-1], batched_sparse=True), w[1:]).sum())
            n += len(w) - 1
    finally:
        dec.teal = saved_teal
        dec.set_sparsity(saved)
    return float(np.exp(total / n))
