"""The decoder: one forward pass over the layers, written against the backend op set only.

Prefill runs the prompt as one batch (dense FFN); decode runs one token, with the sparse FFN when a
per-layer alpha is set. The decoder owns the position; the backend owns weights and the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.sparsity.predictor import Rule
from edge_runtime.sparsity.stats import FFNStats


class Decoder:
    def __init__(self, backend):
        self.ops = backend
        self.cfg = backend.config
        self.max_context = backend.max_context
        self.pos = 0
        self.rules: list[Rule] | None = None  # per-layer predictor settings; None = dense decode
        self.measure_recall = False
        self.stats = FFNStats(self.cfg.n_layers, self.cfg.ffn_dim)
        # Called with (layer, point, activations (T, features)) on every forward, point one of
        # "attn_in" (input of q, k, v), "attn_out" (input of o), "ffn_in" (input of gate, up). None = off.
        self.observer: Callable[[int, str, np.ndarray], None] | None = None
        # TEAL: per layer, per projection ("q", "k", "v", "o", "gate", "up", "down") magnitude thresholds;
        # inputs with |x| below are zeroed in decode. None = off.
        self.teal: list[dict[str, float]] | None = None

    def set_sparsity(self, setting: Sequence[float] | float | Sequence[Rule] | None,
                     measure_recall: bool = False) -> None:
        """Per-layer SparseInfer alphas, one alpha for all layers, per-layer Rules (any predictor), or
        None for dense decode. Takes effect at the next token."""
        if setting is not None and not self.cfg.relu_family:
            raise EdgeRuntimeError(f"sparse decode predicts exact zeros of a ReLU-family FFN; this model's "
                                   f"activation is {self.cfg.activation}")
        if isinstance(setting, (int, float)):
            setting = [float(setting)] * self.cfg.n_layers
        if setting is not None and len(setting) != self.cfg.n_layers:
            raise EdgeRuntimeError(f"got {len(setting)} per-layer settings for {self.cfg.n_layers} layers")
        if setting is None:
            self.rules = None
        else:
            self.rules = [r if isinstance(r, Rule) else Rule("sparseinfer", alpha=float(r), knob=float(r))
                          for r in setting]
        self.measure_recall = measure_recall

    @property
    def alphas(self) -> list[float] | None:
        """The per-layer knob values in use (alpha or q), for reports; None when dense."""
        return None if self.rules is None else [r.knob for r in self.rules]

    def reset(self, clear_stats: bool = True) -> None:
        """Start a new sequence at position 0 (the KV cache is overwritten as it fills)."""
        self.pos = 0
        if clear_stats:
            self.stats = FFNStats(self.cfg.n_layers, self.cfg.ffn_dim)

    def forward(self, ids: Sequence[int], last_only: bool = False, batched_sparse: bool = False) -> np.ndarray:
        """Run tokens at the current position and advance; logits (T, vocab) float32, or (1, vocab)
        for the last token when last_only (generation needs no more).

        With alphas set, a single token takes the sparse FFN. batched_sparse applies the same
        per-token prediction to every token of a batch (the dense arithmetic masked by the predictor):
        what token-by-token sparse decode computes, in one pass; evaluation and calibration use it."""
        t = len(ids)
        if t == 0:
            raise EdgeRuntimeError("nothing to run: empty token list")
        if self.pos + t > self.max_context:
            raise EdgeRuntimeError(f"context full: {self.pos} + {t} tokens exceed the context of "
                                   f"{self.max_context}")
        ops, cfg = self.ops, self.cfg
        positions = np.arange(self.pos, self.pos + t)
        x = ops.embed_tokens(np.asarray(ids, dtype=np.int64), positions)
        rules = self.rules  # one snapshot per token: a change lands between tokens, never inside one
        sparse = rules is not None and t == 1
        masked = rules is not None and t > 1 and batched_sparse
        teal = self.teal if (t == 1 or batched_sparse) else None  # TEAL is a decode-time technique
        obs = self.observer
        for i, layer in enumerate(ops.layers):
            tl = teal[i] if teal is not None else {}
            h = ops.norm(x, layer.attn_norm)
            if obs is not None:
                obs(i, "attn_in", h)
            q = ops.linear(h, layer.q, tl.get("q"))
            k, v = ops.linear(h, layer.k, tl.get("k")), ops.linear(h, layer.v, tl.get("v"))
            if cfg.arch == "llama":
                q, k = ops.rope(q, positions, cfg.n_heads), ops.rope(k, positions, cfg.n_kv_heads)
            a = ops.attention(i, q, k, v, self.pos)
            if obs is not None:
                obs(i, "attn_out", a)
            x = x + ops.linear(a, layer.o, tl.get("o"))
            h = ops.norm(x, layer.ffn_norm)
            if obs is not None:
                obs(i, "ffn_in", h)
            if tl:
                y = ops.ffn(h, layer, (tl.get("gate"), tl.get("up"), tl.get("down")))
            elif sparse:
                y, c = ops.ffn_sparse(h, layer, rules[i], self.measure_recall)
                self.stats.record(i, c.predicted, c.kept, c.bytes_read, c.bytes_dense, c.true_active, c.hits)
            elif masked:
                y = ops.ffn_predicted(h, layer, rules[i])
            else:
                y = ops.ffn(h, layer)
            x = x + y
        self.pos += t
        if last_only:
            x = x[-1:]
        return ops.logits(ops.norm(x, ops.final_norm))
