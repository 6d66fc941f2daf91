"""The numpy backend: reference semantics for every op, and a usable decoder on a CPU.

Activations are float32 row-major (T, features). Weights stay in their packed encoding (mmapped) and
are dequantised per call, only the rows that are used: what a sparse step skips is never read. Small
models (KEEP_F32_BYTES) keep one fp32 copy instead, from which rows are selected the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.model.config import ModelConfig
from edge_runtime.model.rope import rope_tables
from edge_runtime.pack.loader import PackedModel
from edge_runtime.pack.quant import PackedTensor
from edge_runtime.sparsity.predictor import Rule, keep_after_gate


@dataclass
class Linear:
    w: PackedTensor  # (N, K) logical
    b: np.ndarray | None  # (N,) float32


@dataclass
class Norm:
    w: np.ndarray  # (d,) float32
    b: np.ndarray | None  # (d,) float32, LayerNorm only
    eps: float


@dataclass
class Layer:
    attn_norm: Norm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ffn_norm: Norm
    gate: Linear  # (ffn_dim, d); OPT's fc1
    up: Linear | None  # (ffn_dim, d); None for OPT
    down_t: PackedTensor  # (ffn_dim, d): down_proj transposed, one row per FFN neuron
    down_b: np.ndarray | None  # (d,)
    gate_signs: np.ndarray  # (ffn_dim, ceil(d/32)) uint32

    def ffn_dense_bytes(self) -> int:
        n = self.gate.w.nbytes + self.down_t.nbytes
        return n + (self.up.w.nbytes if self.up else 0)


@dataclass
class FFNCounts:
    predicted: int
    kept: int
    bytes_read: int
    bytes_dense: int
    true_active: int = -1
    hits: int = -1


def _vec(model: PackedModel, name: str) -> np.ndarray | None:
    v = model.vectors.get(name)
    return None if v is None else np.asarray(v, dtype=np.float32)


def _linear(model: PackedModel, name: str) -> Linear:
    return Linear(model.matrices[name], _vec(model, name + "_bias"))


# Models whose matrices take at most this much as fp32 are dequantised once at load: numpy has no int8 or
# int4 GEMV, and re-dequantising every call costs more than reading. Larger models dequantise per call.
KEEP_F32_BYTES = 256 << 20


class CpuBackend:
    name = "cpu"

    def __init__(self, model: PackedModel, max_context: int):
        cfg = self.cfg = model.config
        if sum(4 * m.shape[0] * m.shape[1] for m in model.matrices.values()) <= KEEP_F32_BYTES:
            for m in model.matrices.values():
                m.keep_f32()
        self.max_context = max_context
        self.embed = model.matrices["embed"]  # (vocab, d)
        self.pos_embed = model.matrices.get("pos_embed")  # (max_positions + offset, d), OPT
        self.lm_head = self.embed if cfg.tie_embeddings else model.matrices["lm_head"]  # (vocab, d)
        self.final_norm = self._norm(model, "final_norm")
        self.layers = [self._layer(model, i) for i in range(cfg.n_layers)]
        self.cos, self.sin = rope_tables(cfg, max_context)  # (ctx, head_dim/2) float32
        # KV cache (layer, kv_head, position, head_dim) float32; np.zeros pages arrive on first write.
        shape = (cfg.n_layers, cfg.n_kv_heads, max_context, cfg.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.float32)
        self.v_cache = np.zeros(shape, dtype=np.float32)

    def _norm(self, model: PackedModel, prefix: str) -> Norm:
        return Norm(_vec(model, prefix + ".weight"), _vec(model, prefix + ".bias"), self.cfg.norm_eps)

    def _layer(self, model: PackedModel, i: int) -> Layer:
        p = f"layers.{i}."
        return Layer(
            attn_norm=self._norm(model, p + "attn_norm"),
            q=_linear(model, p + "attn.q"), k=_linear(model, p + "attn.k"),
            v=_linear(model, p + "attn.v"), o=_linear(model, p + "attn.o"),
            ffn_norm=self._norm(model, p + "ffn_norm"),
            gate=_linear(model, p + "ffn.gate"),
            up=_linear(model, p + "ffn.up") if self.cfg.gated else None,
            down_t=model.matrices[p + "ffn.down_t"], down_b=_vec(model, p + "ffn.down_bias"),
            gate_signs=np.asarray(model.sign_planes[p + "ffn.gate_signs"]),
        )

    # ---- ops -----------------------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids, positions (T,) int -> (T, d) float32."""
        x = self.embed.dequantize(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed.dequantize(positions + self.cfg.pos_offset)
        return x

    def norm(self, x: np.ndarray, n: Norm) -> np.ndarray:
        if n.b is None:  # RMSNorm
            return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + n.eps)) * n.w
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        return xc / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + n.eps) * n.w + n.b

    @staticmethod
    def teal_mask(x: np.ndarray, threshold: float | None) -> np.ndarray:
        """TEAL: input channels with |x| < threshold are zero, i.e. their weight columns are skipped."""
        return x if threshold is None else np.where(np.abs(x) >= threshold, x, 0.0).astype(np.float32)

    def linear(self, x: np.ndarray, lin: Linear, teal: float | None = None) -> np.ndarray:
        """(T, K) @ W^T (+ b) -> (T, N). One token on compressed weights reads the row segments."""
        x = self.teal_mask(x, teal)
        y = lin.w.matvec(x[0])[None, :] if (x.shape[0] == 1 and lin.w.sparse) else x @ lin.w.dequantize().T
        return y if lin.b is None else y + lin.b

    def rope(self, x: np.ndarray, positions: np.ndarray, n_heads: int) -> np.ndarray:
        """(T, n_heads * head_dim) rotated per head; HF rotate_half convention."""
        t, hd = x.shape[0], self.cfg.head_dim
        x = x.reshape(t, n_heads, hd)
        c, s = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(t, n_heads * hd)

    def attention(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int) -> np.ndarray:
        """Write k, v (T, n_kv*hd) at positions pos0.., attend causally; q (T, n_heads*hd) -> same shape."""
        cfg = self.cfg
        t, hd, nkv = q.shape[0], cfg.head_dim, cfg.n_kv_heads
        end = pos0 + t
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # (n_kv, ctx, hd)
        kc[:, pos0:end] = k.reshape(t, nkv, hd).transpose(1, 0, 2)
        vc[:, pos0:end] = v.reshape(t, nkv, hd).transpose(1, 0, 2)
        group = cfg.n_heads // nkv
        qh = q.reshape(t, nkv, group, hd).transpose(1, 2, 0, 3).reshape(nkv, group * t, hd)
        scores = (qh @ kc[:, :end].transpose(0, 2, 1)) * (1.0 / np.sqrt(hd))  # (n_kv, group*T, end)
        if t > 1:
            qpos = np.tile(np.arange(pos0, end), group)
            scores = np.where(np.arange(end)[None, :] > qpos[:, None], -np.inf, scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out = (probs @ vc[:, :end]).reshape(nkv, group, t, hd)  # (n_kv, group, T, hd)
        return out.transpose(2, 0, 1, 3).reshape(t, cfg.n_heads * hd)

    def _activate(self, g: np.ndarray) -> np.ndarray:
        act = self.cfg.activation
        if act == "silu":
            return g / (1.0 + np.exp(-g))
        if act == "fatrelu":
            return np.where(g >= self.cfg.act_threshold, g, 0.0).astype(np.float32)
        return np.maximum(g, 0.0)

    def ffn(self, x: np.ndarray, layer: Layer, teal: tuple | None = None) -> np.ndarray:
        """Dense FFN, (T, d) -> (T, d); with TEAL thresholds (gate, up, down) for the three inputs."""
        tg, tu, td = teal or (None, None, None)
        h = self._activate(self.linear(x, layer.gate, tg))
        if layer.up is not None:
            h = h * self.linear(x, layer.up, tu)
        h = self.teal_mask(h, td)
        if h.shape[0] == 1 and layer.down_t.sparse:
            rows = np.flatnonzero(h[0])
            y = layer.down_t.rows_weighted_sum(h[0, rows], rows)[None, :]
        else:
            y = h @ layer.down_t.dequantize()
        return y if layer.down_b is None else y + layer.down_b

    def ffn_sparse(self, x: np.ndarray, layer: Layer, rule: Rule, recall: bool = False
                   ) -> tuple[np.ndarray, FFNCounts]:
        """One decode token, x (1, d). Predict from the sign plane, gate over predicted rows, drop rows
        whose gate does not survive the activation, then up and down over the survivors only."""
        xv = x[0]
        active = rule.active(xv, layer.gate_signs)
        idx = np.flatnonzero(active)
        g = layer.gate.w.matvec(xv, idx)
        if layer.gate.b is not None:
            g += layer.gate.b[idx]
        keep = keep_after_gate(g, self.cfg.act_threshold)
        rows, h = idx[keep], g[keep]
        if layer.up is not None:
            u = layer.up.w.matvec(xv, rows)
            h = h * (u if layer.up.b is None else u + layer.up.b[rows])
        y = layer.down_t.rows_weighted_sum(h, rows)
        if layer.down_b is not None:
            y = y + layer.down_b
        read = (layer.gate_signs.nbytes + (rule.theta.nbytes if rule.theta is not None else 0)
                + layer.gate.w.row_bytes() * idx.size
                + (layer.up.w.row_bytes() if layer.up else 0) * rows.size + layer.down_t.row_bytes() * rows.size)
        counts = FFNCounts(int(idx.size), int(rows.size), int(read), layer.ffn_dense_bytes())
        if recall:
            g_all = self.linear(x, layer.gate)[0]
            truth = keep_after_gate(g_all, self.cfg.act_threshold)
            counts.true_active, counts.hits = int(truth.sum()), int((truth & active).sum())
        return y[None, :].astype(np.float32, copy=False), counts

    def ffn_predicted(self, x: np.ndarray, layer: Layer, rule: Rule) -> np.ndarray:
        """(T, d) -> (T, d): every token's FFN with its own predicted mask, computed densely and masked.
        Same function as ffn_sparse token by token; for evaluation, not a fast path."""
        active = rule.active(x, layer.gate_signs)  # (T, N) bool
        g = self.linear(x, layer.gate)
        h = np.where(active & keep_after_gate(g, self.cfg.act_threshold), g, 0.0).astype(np.float32)
        if layer.up is not None:
            h = h * self.linear(x, layer.up)
        y = h @ layer.down_t.dequantize()
        return y if layer.down_b is None else y + layer.down_b

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(T, d) final hidden (already normed) -> (T, vocab) float32."""
        return x @ self.lm_head.dequantize().T

    @property
    def config(self) -> ModelConfig:
        return self.cfg
