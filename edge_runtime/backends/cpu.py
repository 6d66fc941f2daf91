"""The numpy backend: reference semantics for every op of the contract (backends/base.py), and a usable
decoder on a CPU.

Activations are float32 row-major (T, features). Weights stay in their packed encoding (mmapped) and
are dequantised per call, only the rows that are used: what a sparse step skips is never read. Small
models (KEEP_F32_BYTES) keep one fp32 copy instead, from which rows are selected the same way.
The decode state is numpy; a step writes into `buffers` and advances `state` like a device would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np

from edge_runtime.backends.base import PROJECTION, SPARSEINFER, DecodeState, knob_arrays, teal_array
from edge_runtime.backends.weights import PROJECTIONS, Layer, Linear, Norm, weights_of
from edge_runtime.model.rope import rope_tables
from edge_runtime.model.sampling import Sampler, SamplingParams
from edge_runtime.pack.loader import PackedModel
from edge_runtime.sparsity.predictor import Rule, keep_after_gate
from edge_runtime.sparsity.stats import FIELDS, FFNStats

# Models whose matrices take at most this much as fp32 are dequantised once at load: numpy has no int8 or
# int4 GEMV, and re-dequantising every call costs more than reading. Larger models dequantise per call.
KEEP_F32_BYTES = 256 << 20
C = {name: j for j, name in enumerate(FIELDS)}  # counter rows
TEAL_SLOT = {p: j for j, p in enumerate(PROJECTIONS)}


class CpuBackend:
    name = "cpu"

    def __init__(self, model: PackedModel, max_context: int):
        cfg = self.config = model.config
        if sum(4 * m.shape[0] * m.shape[1] for m in model.matrices.values()) <= KEEP_F32_BYTES:
            for m in model.matrices.values():
                m.keep_f32()
        self.max_context = max_context
        self.weights = weights_of(model)
        # the weights by name, for tests and tools that compare against other engines
        self.embed, self.layers, self.final_norm = self.weights.embed, self.weights.layers, self.weights.final_norm
        self.cos, self.sin = rope_tables(cfg, max_context)  # (ctx, head_dim/2) float32
        # KV cache (layer, kv_head, position, head_dim) float32; np.zeros pages arrive on first write.
        shape = (cfg.n_layers, cfg.n_kv_heads, max_context, cfg.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.float32)
        self.v_cache = np.zeros(shape, dtype=np.float32)
        self.state = DecodeState.allocate(np, cfg)
        d, hq, hkv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        f32 = np.float32
        self.buffers = SimpleNamespace(x=np.zeros((1, d), f32), h=np.zeros((1, d), f32), q=np.zeros((1, hq), f32),
                                       k=np.zeros((1, hkv), f32), v=np.zeros((1, hkv), f32),
                                       a=np.zeros((1, hq), f32), logits=np.zeros((1, cfg.vocab_size), f32))
        self._sampler = Sampler(SamplingParams())
        self._history: list[int] = []
        self.stats_reads = 0  # how often the counters were copied out (tests: never per token)

    # ---- ops shared by prefill and the decode step ----------------------------------------------------
    def embed_tokens(self, ids: np.ndarray, positions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x = self.weights.embed.dequantize(ids)
        if self.weights.pos_embed is not None:
            x += self.weights.pos_embed.dequantize(positions + self.config.pos_offset)
        if out is None:
            return x
        out[...] = x
        return out

    def norm(self, x: np.ndarray, n: Norm, out: np.ndarray | None = None) -> np.ndarray:
        if n.b is None:  # RMSNorm
            y = np.multiply(x, 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + n.eps), out=out)
            y *= n.w
            return y
        xc = x - x.mean(axis=-1, keepdims=True)
        y = np.multiply(xc, 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + n.eps), out=out)
        y *= n.w
        y += n.b
        return y

    def _teal_mask(self, x: np.ndarray, teal: tuple[int, str] | None) -> np.ndarray:
        """TEAL: input channels with |x| under the layer's threshold are zero, i.e. skipped weight columns."""
        if teal is None:
            return x
        t = self.state.teal[teal[0], TEAL_SLOT[teal[1]]]
        return x if t <= 0 else np.where(np.abs(x) >= t, x, np.float32(0.0))

    def linear(self, x: np.ndarray, lin: Linear, out: np.ndarray | None = None, teal: tuple[int, str] | None = None,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """(T, K) @ W^T (+ b) -> (T, N). One token on compressed weights reads the row segments."""
        x = self._teal_mask(x, teal)
        if x.shape[0] == 1 and lin.w.sparse:
            y = lin.w.matvec(x[0])[None, :]
        else:
            y = np.matmul(x, lin.w.dequantize().T, out=out if add_to is None else None)
        if lin.b is not None:
            y += lin.b
        if add_to is not None:
            add_to += y
            return add_to
        if out is not None and y is not out:
            out[...] = y
            return out
        return y

    def rope(self, x: np.ndarray, positions: np.ndarray, n_heads: int) -> np.ndarray:
        """(T, n_heads * head_dim) rotated in place per head; HF rotate_half convention."""
        t, hd = x.shape[0], self.config.head_dim
        half = hd // 2
        xv = x.reshape(t, n_heads, hd)
        c, s = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x1 = xv[..., :half].copy()
        x2 = xv[..., half:]
        xv[..., :half] = x1 * c - x2 * s
        xv[..., half:] = x2 * c + x1 * s
        return x

    def attention(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Write k, v (T, n_kv*hd) at positions (consecutive), attend causally; q (T, n_heads*hd) -> same."""
        cfg = self.config
        t, hd, nkv = q.shape[0], cfg.head_dim, cfg.n_kv_heads
        pos0 = int(positions[0])
        end = pos0 + t
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # (n_kv, ctx, hd)
        kc[:, pos0:end] = k.reshape(t, nkv, hd).transpose(1, 0, 2)
        vc[:, pos0:end] = v.reshape(t, nkv, hd).transpose(1, 0, 2)
        group = cfg.n_heads // nkv
        qh = q.reshape(t, nkv, group, hd).transpose(1, 2, 0, 3).reshape(nkv, group * t, hd)
        scores = qh @ kc[:, :end].transpose(0, 2, 1)  # (n_kv, group*T, end)
        scores *= np.float32(1.0 / np.sqrt(hd))
        if t > 1:
            qpos = np.tile(np.arange(pos0, end), group)
            scores = np.where(np.arange(end)[None, :] > qpos[:, None], -np.inf, scores).astype(np.float32)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        a = (scores @ vc[:, :end]).reshape(nkv, group, t, hd).transpose(2, 0, 1, 3).reshape(t, cfg.n_heads * hd)
        if out is None:
            return a
        out[...] = a
        return out

    def logits(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul(x, self.weights.lm_head.dequantize().T, out=out)

    # ---- prefill and evaluation ---------------------------------------------------------------------
    def _activate(self, g: np.ndarray) -> np.ndarray:
        act = self.config.activation
        if act == "silu":
            return g / (1.0 + np.exp(-g))
        if act == "fatrelu":
            return np.where(g >= self.config.act_threshold, g, np.float32(0.0))
        return np.maximum(g, np.float32(0.0))

    def ffn_parts(self, x: np.ndarray, layer: Layer, teal_layer: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(T, d) -> (act, hidden) (T, N); with teal_layer, that layer's TEAL thresholds mask the inputs."""
        slot = (lambda p: None) if teal_layer is None else (lambda p: (teal_layer, p))
        act = self._activate(self.linear(x, layer.gate, teal=slot("gate")))
        hidden = act * self.linear(x, layer.up, teal=slot("up")) if layer.up is not None else act
        return act, hidden

    def ffn_down(self, hidden: np.ndarray, layer: Layer, bias: bool = True) -> np.ndarray:
        """(T, N) -> (T, d) over the rows of W_down^T; one token on compressed rows reads its segments."""
        if hidden.shape[0] == 1 and layer.down_t.sparse:
            rows = np.flatnonzero(hidden[0])
            y = layer.down_t.rows_weighted_sum(hidden[0, rows], rows)[None, :]
        else:
            y = hidden @ layer.down_t.dequantize()
        return y + layer.down_b if (bias and layer.down_b is not None) else y

    def _ffn_teal(self, i: int, x: np.ndarray, layer: Layer) -> np.ndarray:
        _, hidden = self.ffn_parts(x, layer, teal_layer=i)
        return self.ffn_down(self._teal_mask(hidden, (i, "down")), layer)

    def _rule(self, i: int) -> Rule | None:
        kind = int(self.state.predictor[i])
        if kind == SPARSEINFER:
            return Rule("sparseinfer", alpha=float(self.state.alpha[i]))
        if kind == PROJECTION:
            return Rule("projection", theta=self.state.theta[i])
        return None

    def ffn_masked(self, i: int, x: np.ndarray, layer: Layer) -> np.ndarray:
        """(T, d) -> (T, d): every token's FFN with its own predicted mask (and TEAL thresholds), dense
        arithmetic masked. Same function as ffn_step token by token; for evaluation, not a fast path."""
        if self.state.teal[i].any():
            return self._ffn_teal(i, x, layer)
        rule = self._rule(i)
        if rule is None:
            return self.ffn_down(self.ffn_parts(x, layer)[1], layer)
        active = rule.active(x, layer.gate_signs)  # (T, N) bool
        g = self.linear(x, layer.gate)
        h = np.where(active & keep_after_gate(g, self.config.act_threshold), g, np.float32(0.0))
        if layer.up is not None:
            h = h * self.linear(x, layer.up)
        return self.ffn_down(h, layer)

    def write_kv(self, layer: int, k: np.ndarray, v: np.ndarray, pos0: int) -> None:
        t = k.shape[1]
        self.k_cache[layer][:, pos0:pos0 + t] = k
        self.v_cache[layer][:, pos0:pos0 + t] = v

    # ---- decode step ---------------------------------------------------------------------------------
    def ffn_step(self, i: int, x: np.ndarray, layer: Layer, add_to: np.ndarray, mode: str) -> None:
        if mode == "teal":
            add_to += self._ffn_teal(i, x, layer)
            return
        rule = self._rule(i) if mode == "sparse" else None
        if rule is None:
            add_to += self.ffn_down(self.ffn_parts(x, layer)[1], layer)
            return
        add_to += self._ffn_sparse(i, x[0], layer, rule)

    def _ffn_sparse(self, i: int, xv: np.ndarray, layer: Layer, rule: Rule) -> np.ndarray:
        """x (d,) -> (d,). Predict from the sign plane, gate over predicted rows, drop rows whose gate does
        not survive the activation, then up and down over the survivors only; counters advanced."""
        active = rule.active(xv, layer.gate_signs)
        idx = np.flatnonzero(active)
        g = layer.gate.w.matvec(xv, idx)
        if layer.gate.b is not None:
            g += layer.gate.b[idx]
        keep = keep_after_gate(g, self.config.act_threshold)
        rows, h = idx[keep], g[keep]
        if layer.up is not None:
            u = layer.up.w.matvec(xv, rows)
            h = h * (u if layer.up.b is None else u + layer.up.b[rows])
        y = layer.down_t.rows_weighted_sum(h, rows)
        if layer.down_b is not None:
            y += layer.down_b
        c = self.state.counters
        c[C["steps"], i] += 1
        c[C["predicted"], i] += idx.size
        c[C["kept"], i] += rows.size
        c[C["bytes_read"], i] += int(layer.gate_signs.nbytes + (rule.theta.nbytes if rule.theta is not None else 0)
                                     + layer.gate.w.row_bytes() * idx.size
                                     + ((layer.up.w.row_bytes() if layer.up else 0) + layer.down_t.row_bytes())
                                     * rows.size)
        c[C["bytes_dense"], i] += layer.ffn_dense_bytes()
        if self.state.measure_recall:
            truth = keep_after_gate(layer.gate.w.matvec(xv) + (0 if layer.gate.b is None else layer.gate.b),
                                    self.config.act_threshold)
            c[C["true_active"], i] += int(truth.sum())
            c[C["hits"], i] += int((truth & active).sum())
            c[C["recall_steps"], i] += 1
        return y

    def sample(self, logits: np.ndarray) -> None:
        tok = self._sampler(logits[0], self._history)
        self.state.token[0] = tok
        self.state.seen[tok] = 1
        self._history.append(tok)

    def advance(self) -> None:
        self.state.pos[0] += 1

    def run_step(self, body: Callable[[], None], mode: str) -> None:
        body()

    # ---- host interface ------------------------------------------------------------------------------
    def from_host(self, a, dtype) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self.state.pos[0] = 0
        self.state.seen[:] = 0
        self.state.seen[np.asarray(prompt_ids, dtype=np.int64)] = 1
        self._sampler = Sampler(sampling)
        self._history = list(prompt_ids)

    def set_position(self, pos: int) -> None:
        self.state.pos[0] = pos

    def set_token(self, token: int) -> None:
        self.state.token[0] = token

    def read_token(self) -> int:
        return int(self.state.token[0])

    def read_logits(self) -> np.ndarray:
        return self.buffers.logits.copy()

    def set_knobs(self, rules: Sequence[Rule] | None, teal: Sequence[dict[str, float]] | None,
                  measure_recall: bool = False) -> None:
        cfg = self.config
        self.state.predictor[:], self.state.alpha[:], self.state.theta[:] = knob_arrays(rules, cfg.n_layers,
                                                                                        cfg.ffn_dim)
        self.state.teal[:] = teal_array(teal, cfg.n_layers)
        self.state.measure_recall = measure_recall

    def read_stats(self) -> FFNStats:
        self.stats_reads += 1
        return FFNStats(self.config.n_layers, self.config.ffn_dim, counts=self.state.counters.copy())

    def reset_stats(self) -> None:
        self.state.counters[:] = 0
