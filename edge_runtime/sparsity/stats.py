"""Per-layer FFN (and attention) statistics accumulated over decode steps.

The counters live in one (len(FIELDS), n_layers) int64 array so that a backend can keep them in device
memory, advance them inside a decode step and copy them to the host only when someone asks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIELDS = ("steps", "predicted", "kept", "true_active", "hits", "recall_steps", "bytes_read", "bytes_dense",
          "up_dropped", "attn_bytes_read", "attn_bytes_dense")


@dataclass
class FFNStats:
    """Counters per layer, summed over decode steps. "true" counts need the dense gate (recall=True)."""

    n_layers: int
    ffn_dim: int
    counts: np.ndarray | None = None  # (len(FIELDS), n_layers) int64; the fields below are its rows
    steps: np.ndarray = field(init=False)
    predicted: np.ndarray = field(init=False)  # rows the predictor let through
    kept: np.ndarray = field(init=False)  # rows whose computed gate survived: the actual active count
    true_active: np.ndarray = field(init=False)  # dense-gate active rows (recall steps only)
    hits: np.ndarray = field(init=False)  # truly active rows that were predicted active
    recall_steps: np.ndarray = field(init=False)
    bytes_read: np.ndarray = field(init=False)  # FFN weight bytes read, sign planes included
    bytes_dense: np.ndarray = field(init=False)  # what the dense FFN would have read
    up_dropped: np.ndarray = field(init=False)  # dReLU: rows whose gate survived but whose up was not positive
    attn_bytes_read: np.ndarray = field(init=False)  # q, k, v, o weight bytes read (TEAL-skipped columns not)
    attn_bytes_dense: np.ndarray = field(init=False)  # what the dense q, k, v, o would have read

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros((len(FIELDS), self.n_layers), dtype=np.int64)
        for row, name in zip(self.counts, FIELDS, strict=True):
            setattr(self, name, row)

    def per_layer(self) -> list[dict]:
        out = []
        for i in range(self.n_layers):
            steps = max(int(self.steps[i]), 1)
            row = {
                "layer": i,
                "predicted_density": float(self.predicted[i]) / (steps * self.ffn_dim),
                "actual_density": float(self.kept[i]) / (steps * self.ffn_dim),
                "ffn_bytes_fraction": float(self.bytes_read[i]) / max(int(self.bytes_dense[i]), 1),
                "up_dropped_density": float(self.up_dropped[i]) / (steps * self.ffn_dim),
            }
            if self.recall_steps[i]:
                row["recall"] = float(self.hits[i]) / max(int(self.true_active[i]), 1)
                row["true_density"] = float(self.true_active[i]) / (int(self.recall_steps[i]) * self.ffn_dim)
            out.append(row)
        return out

    def summary(self) -> dict:
        if not self.steps.any():
            return {"decode_steps": 0}
        rows = self.per_layer()
        out = {
            "decode_steps": int(self.steps[0]),
            "predicted_density": float(np.mean([r["predicted_density"] for r in rows])),
            "actual_density": float(np.mean([r["actual_density"] for r in rows])),
            "ffn_bytes_fraction": float(self.bytes_read.sum()) / max(int(self.bytes_dense.sum()), 1),
            "ffn_bytes_per_token": float(self.bytes_read.sum()) / max(int(self.steps[0]), 1),
            "up_dropped_density": float(np.mean([r["up_dropped_density"] for r in rows])),
        }
        if self.attn_bytes_dense.any():  # the layers' weight bytes: attention and FFN (sign planes, thresholds)
            out["attn_bytes_fraction"] = float(self.attn_bytes_read.sum()) / int(self.attn_bytes_dense.sum())
            out["layer_bytes_fraction"] = (float(self.bytes_read.sum() + self.attn_bytes_read.sum())
                                           / int(self.bytes_dense.sum() + self.attn_bytes_dense.sum()))
            steps = max(int(self.steps[0]), 1)
            out["layer_bytes_per_token"] = float(self.bytes_read.sum() + self.attn_bytes_read.sum()) / steps
            out["layer_dense_bytes_per_token"] = float(self.bytes_dense.sum() + self.attn_bytes_dense.sum()) / steps
        if self.recall_steps.any():
            out["recall"] = float(self.hits.sum()) / max(int(self.true_active.sum()), 1)
        out["per_layer"] = rows
        return out
