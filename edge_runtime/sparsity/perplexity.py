"""Perplexity of a runtime over token windows with a sparsity setting applied the way sparse decode applies it
(each token's own predicted FFN mask and TEAL thresholds, in one batched pass per window): what calibration
and its scripts judge settings by."""

from __future__ import annotations

import numpy as np

from edge_runtime.scoring import nll
from edge_runtime.sparsity.predictor import Rule


def perplexity(rt, wins: list[np.ndarray], rules: list[Rule] | None, teal: list[dict] | None = None,
               criterion: str = "teal") -> float:
    """Perplexity over the windows; with rules, each token's FFN uses its own predicted mask; with teal,
    per-layer thresholds of that criterion ("teal" or "wina") mask the projections' inputs. The decoder's
    setting is restored afterwards."""
    dec = rt.decoder
    saved, saved_teal, saved_criterion = dec.rules, dec.teal, dec.teal_criterion
    dec.set_sparsity(rules)
    dec.set_teal(teal, criterion)
    total, n = 0.0, 0
    try:
        for w in wins:
            dec.reset(clear_stats=False)
            total += float(nll(dec.forward(w[:-1], batched_sparse=True), w[1:]).sum())
            n += len(w) - 1
    finally:
        dec.set_teal(saved_teal, saved_criterion)
        dec.set_sparsity(saved)
    return float(np.exp(total / n))
