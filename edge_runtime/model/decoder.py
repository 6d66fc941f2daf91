"""The decoder, written against the backend contract (backends/base.py) only.

Two entry points. `prefill(ids)`: the prompt as one eager, batched, dense pass that fills the KV cache.
`decode_step()`: one token with fixed shapes; its inputs (token id, position, per-layer knobs) are read
from the backend's decode state and it advances that state itself (samples the next id, moves the
position), so a GPU backend can replay one captured graph per token. The host reads back only the
sampled id; FFN statistics stay in the state until someone asks for them (`stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, NumericalError
from edge_runtime.model.sampling import NO_TOKEN, SamplingParams, finite
from edge_runtime.sparsity.predictor import Rule
from edge_runtime.sparsity.stats import FFNStats
from edge_runtime.sparsity.wina import check_criterion

# Observation points, called as observer(layer, point, activations (T, features)) during batched passes:
# "attn_in" (input of q, k, v), "attn_out" (input of o), "ffn_in" (input of gate, up),
# "ffn_act" (activation(gate x), (T, ffn_dim)), "ffn_hidden" (the input of down, (T, ffn_dim)).
OBSERVATION_POINTS = ("attn_in", "attn_out", "ffn_in", "ffn_act", "ffn_hidden")


class Decoder:
    def __init__(self, backend):
        self.ops = backend
        self.cfg = backend.config
        self.max_context = backend.max_context
        self.pos = 0  # host mirror of state.pos: the host knows how many tokens it has run
        self.rules: list[Rule] | None = None  # per-layer predictor settings; None = dense decode
        self._teal: list[dict[str, float]] | None = None  # per-layer {projection: threshold}; None = off
        self._teal_criterion = "teal"  # "teal" (|x| >= t) or "wina" (|x| * weight column norm >= t)
        self.measure_recall = False
        self.observer: Callable[[int, str, np.ndarray], None] | None = None
        # A prompt engine outside the backend (export.onnx_prefill.OnnxPrefill): run(ids) -> (last logits
        # (vocab,), per layer (k, v) each (n_kv, T, head_dim) float32), whose K/V become the backend's cache.
        self.external_prefill = None

    # ---- settings (written into the backend's state between tokens) ---------------------------------
    def set_sparsity(self, setting: Sequence[float] | float | Sequence[Rule] | None,
                     measure_recall: bool = False) -> None:
        """Per-layer SparseInfer alphas, one alpha for all layers, per-layer Rules (any predictor), or
        None for dense decode. Takes effect at the next token."""
        if setting is not None and not self.cfg.relu_family:
            raise EdgeRuntimeError(f"sparse decode predicts exact zeros of a ReLU-family FFN; this model's "
                                   f"activation is {self.cfg.activation} (TEAL serves it: --sparsity teal on the "
                                   "command line, set_teal in Python; or --sparsity off)")
        if isinstance(setting, (int, float, np.number)):
            setting = [setting] * self.cfg.n_layers
        if setting is not None and len(setting) != self.cfg.n_layers:
            raise EdgeRuntimeError(f"got {len(setting)} per-layer settings for {self.cfg.n_layers} layers")
        # alpha scales the sign vote: 0, negative or NaN would predict nonsense silently
        for r in () if setting is None else setting:
            alpha = r.alpha if isinstance(r, Rule) else r
            if finite("a SparseInfer alpha", alpha) <= 0:
                raise EdgeRuntimeError(f"a SparseInfer alpha must be > 0, got {alpha!r}")
        self._change(rules=None if setting is None else [
            r if isinstance(r, Rule) else Rule("sparseinfer", alpha=float(r), knob=float(r)) for r in setting],
            measure_recall=measure_recall)

    @property
    def teal(self) -> list[dict[str, float]] | None:
        return self._teal

    @teal.setter
    def teal(self, thresholds: list[dict[str, float]] | None) -> None:
        """TEAL: per layer, per projection ("q", "k", "v", "o", "gate", "up", "down") magnitude thresholds;
        inputs with |x| below are zeroed in decode. None = off. With a predictor set (sparse mode) only the
        q, k, v, o thresholds apply; the FFN is the predictor's."""
        self._change(_teal=thresholds)

    @property
    def teal_criterion(self) -> str:
        return self._teal_criterion

    @teal_criterion.setter
    def teal_criterion(self, criterion: str) -> None:
        """Which channels the TEAL thresholds keep: "teal" |x| >= t, or "wina" |x| * ||W[:, i]|| >= t."""
        self._change(_teal_criterion=check_criterion(criterion))

    def set_teal(self, thresholds: list[dict[str, float]] | None, criterion: str = "teal",
                 dense_ffn: bool = False) -> None:
        """Thresholds and the criterion they were calibrated for, in one knob write; dense_ffn drops the FFN
        predictor in the same write (TEAL on every projection), so that a refused write changes neither."""
        more = {"rules": None} if dense_ffn else {}
        self._change(_teal_criterion=check_criterion(criterion), _teal=thresholds, **more)

    def _change(self, **settings) -> None:
        """Set these attributes and write the knobs; a write the backend refuses (backends/room.OutOfRoomError:
        TEAL's weight copies do not fit) leaves the attributes as they were, like the backend's state."""
        before = {name: getattr(self, name) for name in settings}
        self.__dict__.update(settings)
        try:
            self._push_knobs()
        except BaseException:
            self.__dict__.update(before)
            raise

    def _push_knobs(self) -> None:
        self.ops.set_knobs(self.rules, self._teal, self.measure_recall, teal_criterion=self._teal_criterion)

    @property
    def mode(self) -> str:
        """Which decode step runs (a GPU backend keeps one graph per mode): "sparse" (the FFN predictor, and
        TEAL column skipping on q, k, v and o where a layer's threshold is set), "teal" (TEAL thresholds on
        every projection, dense FFN) or "dense"."""
        return "sparse" if self.rules is not None else "teal" if self._teal is not None else "dense"

    @property
    def alphas(self) -> list[float] | None:
        """The per-layer knob values in use (alpha or q), for reports; None when dense."""
        return None if self.rules is None else [r.knob for r in self.rules]

    @property
    def stats(self) -> FFNStats:
        """FFN statistics of the decode steps since the last reset, copied from the backend now."""
        return self.ops.read_stats()

    def reset(self, clear_stats: bool = True) -> None:
        """Start a new sequence at position 0 (the KV cache is overwritten as it fills)."""
        self.pos = 0
        self.ops.set_position(0)
        if clear_stats:
            self.ops.reset_stats()

    # ---- running tokens ------------------------------------------------------------------------------
    def start(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> int:
        """A new sequence: prefill the prompt and sample the first new token (returned)."""
        self.reset()
        self._check_ids(prompt_ids)  # before begin(): it indexes the embedding with the last id
        self.ops.begin(prompt_ids, sampling)
        if self.external_prefill is not None and self.observer is None:
            logits = self._external(prompt_ids)
        else:
            logits = self._batched(prompt_ids, last_only=True, masked=False)
        self.ops.sample(logits)
        return self._sampled()

    def prefill(self, ids: Sequence[int], last_only: bool = False, masked: bool = False) -> np.ndarray:
        """Run tokens at the current position as one batch and advance; logits (T, vocab) float32 on the
        host, or (1, vocab) for the last token. masked applies each token's predicted FFN mask (and TEAL
        thresholds): what token-by-token sparse decode computes, in one pass (evaluation, calibration)."""
        return self.ops.to_host(self._batched(ids, last_only, masked))

    def decode_step(self) -> int:
        """One token: the state's token at the state's position; returns the sampled next id."""
        if self.pos + 1 > self.max_context:
            raise EdgeRuntimeError(f"context full: {self.pos} + 1 tokens exceed the context of {self.max_context}")
        self.ops.run_step(self._step, self.mode)
        self.pos += 1
        return self._sampled()

    def _sampled(self) -> int:
        """The id the step sampled; a NumericalError where its logits held NaN or inf (the backend wrote NO_TOKEN)."""
        token = self.ops.read_token()
        if token == NO_TOKEN:
            raise NumericalError.logits(f"at position {self.pos}")
        return token

    def forward(self, ids: Sequence[int], last_only: bool = False, batched_sparse: bool = False) -> np.ndarray:
        """Logits (T, vocab) for tokens run at the current position. One token runs as a decode step (sparse
        when a setting is in force), several as a batch (masked when batched_sparse)."""
        if len(ids) == 1:
            self._check_ids(ids)  # several run as a batch, which checks its own
            self.ops.set_token(int(ids[0]))
            self.decode_step()
            return self.ops.read_logits()
        return self.prefill(ids, last_only, batched_sparse)

    def _check_ids(self, ids: Sequence[int]) -> None:
        """Every id inside the vocabulary: a compiled step reads embedding row `id` unchecked."""
        a = np.asarray(ids, dtype=np.int64)
        bad = a[(a < 0) | (a >= self.cfg.vocab_size)]
        if bad.size:
            raise EdgeRuntimeError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")

    def _external(self, ids: Sequence[int]):
        """The prompt through the external engine at position 0 (ids checked by start, its only caller); its K/V
        written into the backend's cache."""
        if len(ids) > self.max_context:
            raise EdgeRuntimeError(f"context full: {len(ids)} tokens exceed the context of {self.max_context}")
        last, kv = self.external_prefill.run(list(ids))
        for i, (k, v) in enumerate(kv):
            self.ops.write_kv(i, self.ops.from_host(k, np.float32), self.ops.from_host(v, np.float32), 0)
        self.pos = len(ids)
        self.ops.set_position(self.pos)
        logits = self.ops.from_host(last[None, :], np.float32)
        self.ops.release_scratch()  # the K/V's fp32 and fp16 copies on the way in
        return logits

    def _batched(self, ids: Sequence[int], last_only: bool, masked: bool):
        t = len(ids)
        if t == 0:
            raise EdgeRuntimeError("nothing to run: empty token list")
        self._check_ids(ids)
        if self.pos + t > self.max_context:
            raise EdgeRuntimeError(f"context full: {self.pos} + {t} tokens exceed the context of "
                                   f"{self.max_context}")
        ops = self.ops
        positions = ops.from_host(np.arange(self.pos, self.pos + t), np.int32)
        x = self._layers(ops.from_host(ids, np.int32), positions, masked=masked)
        if last_only:
            x = x[-1:]
        self.pos += t
        ops.set_position(self.pos)
        logits = ops.logits(ops.norm(x, ops.weights.final_norm))
        ops.release_scratch()
        return logits

    def _layers(self, ids, positions, masked: bool):
        """Batched pass over every layer: (T,) ids -> final hidden (T, d), observers called."""
        ops, cfg, obs = self.ops, self.cfg, self.observer or (lambda i, point, a: None)
        teal = masked and self._teal is not None
        x = ops.embed_tokens(ids, positions)
        for i, layer in enumerate(ops.weights.layers):
            h = ops.norm(x, layer.attn_norm)
            obs(i, "attn_in", h)
            q = ops.linear(h, layer.q, teal=(i, "q") if teal else None)
            k = ops.linear(h, layer.k, teal=(i, "k") if teal else None)
            v = ops.linear(h, layer.v, teal=(i, "v") if teal else None)
            a = ops.attention(i, q, k, v, positions, rope=cfg.arch == "llama")
            obs(i, "attn_out", a)
            if layer.attn_post_norm is None:
                ops.linear(a, layer.o, teal=(i, "o") if teal else None, add_to=x)
            else:
                x += ops.norm(ops.linear(a, layer.o, teal=(i, "o") if teal else None), layer.attn_post_norm)
            h = ops.norm(x, layer.ffn_norm)
            obs(i, "ffn_in", h)
            sparse = masked and (self.rules is not None or teal)
            if self.observer is not None or not sparse:
                act, hidden = ops.ffn_parts(h, layer)  # the dense FFN's activations (observed)
                obs(i, "ffn_act", act)
                obs(i, "ffn_hidden", hidden)
            f = ops.ffn_masked(i, h, layer) if sparse else ops.ffn_down(hidden, layer)
            x += f if layer.ffn_post_norm is None else ops.norm(f, layer.ffn_post_norm)
        return x

    def _step(self) -> None:
        """The decode step's ops, in one fixed sequence over preallocated buffers (captured on a GPU)."""
        ops, cfg, st, b = self.ops, self.cfg, self.ops.state, self.ops.buffers
        mode = self.mode
        teal = mode != "dense"  # q, k, v, o read their TEAL thresholds (0 = dense) in both sparse modes
        x = ops.embed_tokens(st.token, st.pos, out=b.x)
        for i, layer in enumerate(ops.weights.layers):
            q, k, v = ops.attention_inputs(i, x, layer, teal)  # attn_norm(x) projected
            a = ops.attention(i, q, k, v, st.pos, out=b.a, rope=cfg.arch == "llama")
            if layer.attn_post_norm is None:
                ops.linear(a, layer.o, teal=(i, "o") if teal else None, add_to=x)
            else:  # the attention output normed, then added (b.h is free once q, k, v are made)
                o = ops.linear(a, layer.o, out=b.h, teal=(i, "o") if teal else None)
                ops.add(x, ops.norm(o, layer.attn_post_norm, out=b.h))
            if layer.ffn_post_norm is None:  # x += FFN(ffn_norm(x))
                ops.ffn_step(i, x, layer, x, mode, norm=True)
            else:  # the FFN output into b.h, normed, then added
                ops.ffn_step(i, x, layer, b.h, mode, accumulate=False, norm=True)
                ops.add(x, ops.norm(b.h, layer.ffn_post_norm, out=b.h))
        ops.logits(x, out=b.logits, norm=ops.weights.final_norm)
        ops.sample(b.logits)
        ops.advance()
