"""Held-out evaluation: perplexity dense and sparse, FFN sparsity, predictor density and recall."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.runtime import Runtime
from edge_runtime.scoring import nll, windowed


def evaluate_text(rt: Runtime, text: str, setting: Sequence | float | None, window: int = 256,
                  max_tokens: int = 4096) -> dict:
    """Dense logits come from batched prefill of each window, sparse ones from token-by-token decode
    with the predictor (the decode path is where sparsity applies); both see the same windows."""
    if not text.strip():
        raise EdgeRuntimeError("the evaluation text is empty")
    window = min(window, rt.decoder.max_context - 1)
    ids = rt.encode(text)
    wins = windowed(ids, window, max_tokens)
    if not wins:
        raise EdgeRuntimeError("the evaluation text is too short (needs at least 2 tokens)")
    dec = rt.decoder
    nll_dense, nll_sparse, agree, n = 0.0, 0.0, 0, 0
    teal, criterion = dec.teal, dec.teal_criterion
    sparse = setting is not None or teal is not None
    saved = dec.rules
    dec.set_sparsity(None)
    dec.set_teal(None)
    dense_logits = []
    for w in wins:
        dec.reset()
        dense_logits.append(dec.forward(w[:-1]))
    if sparse:
        dec.set_sparsity(setting, measure_recall=True)
        dec.set_teal(teal, criterion)
    dec.reset()
    for w, dl in zip(wins, dense_logits, strict=True):
        targets = w[1:]
        nll_dense += float(nll(dl, targets).sum())
        n += len(targets)
        if not sparse:
            continue
        dec.reset(clear_stats=False)  # statistics accumulate over all windows
        sl = np.concatenate([dec.forward([int(t)]) for t in w[:-1]])
        nll_sparse += float(nll(sl, targets).sum())
        agree += int((sl.argmax(-1) == dl.argmax(-1)).sum())
    stats = dec.stats if sparse else None  # read once, after every window
    dec.set_sparsity(saved)
    out = {"tokens": n, "ppl_dense": float(np.exp(nll_dense / n))}
    if teal is not None and setting is None:
        out.update({"ppl_teal": float(np.exp(nll_sparse / n)), "top1_agreement": agree / n})
    elif sparse:
        s = stats.summary()
        out.update({
            "ppl_sparse": float(np.exp(nll_sparse / n)),
            # recall and the true density need the dense gate beside the sparse one: counted by the cpu backend
            "ffn_sparsity": (1.0 - float(np.mean([r["true_density"] for r in s["per_layer"]]))
                             if "recall" in s else None),
            "predicted_density": s["predicted_density"], "recall": s.get("recall"),
            "top1_agreement": agree / n, "ffn_bytes_fraction": s["ffn_bytes_fraction"],
            # rows down read (gate and, for dReLU, up survived); rows dropped by up alone (dReLU)
            "actual_density": s["actual_density"], "up_dropped_density": s["up_dropped_density"],
            "per_layer": [{"layer": r["layer"], "ffn_sparsity": 1.0 - r["true_density"] if "recall" in r else None,
                           "predicted_density": r["predicted_density"], "actual_density": r["actual_density"],
                           "up_dropped_density": r["up_dropped_density"],
                           "recall": r.get("recall"), "ffn_bytes_fraction": r["ffn_bytes_fraction"]}
                          for r in s["per_layer"]],
        })
        out.update(step_bytes(s, rt.backend.weights.lm_head.nbytes))
    return out


def step_bytes(summary: dict, head_bytes: int) -> dict:
    """Weight bytes per decode token from FFN statistics: the layers' (attention, FFN with its sign planes
    and thresholds, TEAL thresholds) and the whole step's (the layers and the LM head, read dense)."""
    if "layer_bytes_fraction" not in summary:
        return {}
    layer, dense = summary["layer_bytes_per_token"], summary["layer_dense_bytes_per_token"]
    return {"attn_bytes_fraction": summary["attn_bytes_fraction"], "layer_bytes_fraction": layer / dense,
            "layer_bytes_per_token": layer, "lm_head_bytes_per_token": float(head_bytes),
            "step_bytes_per_token": layer + head_bytes,
            "step_bytes_fraction": (layer + head_bytes) / (dense + head_bytes)}
