"""The model's weights as every backend sees them: host-side views of a packed model, grouped per layer.

Backends import these and upload what they need; the decoder walks `layers` without looking inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_runtime.pack.colnorms import COLNORM_NAME, packed_column_norms
from edge_runtime.pack.loader import PackedModel
from edge_runtime.pack.quant import PackedTensor

# TEAL thresholds are kept per layer in this order (one float per projection input); 0 = off.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("q", "k", "v", "o")  # the projections a sparse step may TEAL-skip columns of
TEAL_THRESHOLD_BYTES = 4  # one fp32 threshold read per projection a step skips columns of


COLUMN_ENCODINGS = ("fp32", "fp16", "int8")  # kept column-major for TEAL as stored (int4, compressed: read dense)


def column_layout(t: PackedTensor) -> tuple[int, int] | None:
    """(bytes per kept input channel, bytes read whatever is kept) of an (N, K) weight stored column-major
    (W^T, one row per input channel) for TEAL column skipping: fp32 and fp16 as stored; int8 as stored, its
    per-output-row fp16 scales applied after the sum (N scales read once). None for int4 and compressed
    rows, whose TEAL products mask the input and read every byte."""
    n = t.shape[0]
    if t.encoding not in COLUMN_ENCODINGS:
        return None
    if t.encoding == "int8":
        return n, 2 * n
    return (4 if t.encoding == "fp32" else 2) * n, 0


def linear_read_bytes(t: PackedTensor, kept: float | None, steps: float = 1) -> float:
    """Weight bytes of `steps` one-token products with t: every stored byte when kept is None (dense,
    row-major) or t has no column layout, else `kept` input channels in all (column-major) plus each step's
    fixed bytes and its threshold."""
    layout = column_layout(t)
    if kept is None or layout is None:
        return steps * t.nbytes
    per, fixed = layout
    return kept * per + steps * (fixed + TEAL_THRESHOLD_BYTES)


@dataclass
class Linear:
    w: PackedTensor  # (N, K) logical, in its stored encoding
    b: np.ndarray | None  # (N,) float32


@dataclass
class Norm:
    w: np.ndarray  # (d,) float32
    b: np.ndarray | None  # (d,) float32, LayerNorm only (None = RMSNorm)
    eps: float


@dataclass
class Layer:
    attn_norm: Norm
    q: Linear  # (n_heads * head_dim, d)
    k: Linear  # (n_kv_heads * head_dim, d)
    v: Linear  # (n_kv_heads * head_dim, d)
    o: Linear  # (d, n_heads * head_dim)
    ffn_norm: Norm
    gate: Linear  # (ffn_dim, d); OPT's fc1
    up: Linear | None  # (ffn_dim, d); None for OPT
    down_t: PackedTensor  # (ffn_dim, d): down_proj transposed, one row per FFN neuron
    down_b: np.ndarray | None  # (d,)
    gate_signs: np.ndarray  # (ffn_dim, ceil(d/32)) uint32, bit set = weight negative
    attn_post_norm: Norm | None = None  # of the attention output before its residual add (config post_norms)
    ffn_post_norm: Norm | None = None  # of the FFN output before its residual add
    # projection -> (K,) float32 L2 norms of its weight columns (WINA), from the pack or computed when first asked
    colnorms: dict[str, np.ndarray] = field(default_factory=dict)

    def ffn_dense_bytes(self) -> int:
        n = self.gate.w.nbytes + self.down_t.nbytes
        return n + (self.up.w.nbytes if self.up else 0)

    def ffn_row_bytes(self) -> tuple[float, float, float, float]:
        """(sign plane, one gate row, one up row, one down row) in bytes: what a sparse step's reads are made of."""
        up = self.up.w.row_bytes() if self.up else 0.0
        return float(self.gate_signs.nbytes), self.gate.w.row_bytes(), up, self.down_t.row_bytes()

    def ffn_read_bytes(self, steps: float, predicted: float, kept: float, projection_steps: float = 0,
                       up_dropped: float = 0) -> float:
        """FFN weight bytes of `steps` sparse steps that computed `predicted` gate rows and kept `kept` rows
        for down in all; up was read for the kept rows and for `up_dropped` more (dReLU: rows whose up value
        was not positive, dropped before down). The projection predictor's steps also read one fp32 threshold
        per neuron."""
        signs, gate_row, up_row, down_row = self.ffn_row_bytes()
        return (steps * signs + projection_steps * 4 * self.gate.w.shape[0] + predicted * gate_row
                + (kept + up_dropped) * up_row + kept * down_row)

    def attn_dense_bytes(self) -> int:
        return sum(getattr(self, p).w.nbytes for p in ATTENTION)

    def attn_read_bytes(self, kept: dict[str, float | None], steps: float = 1) -> float:
        """Attention weight bytes of `steps` steps: per projection, input channels kept in all (None = dense)."""
        return sum(linear_read_bytes(getattr(self, p).w, kept.get(p), steps) for p in ATTENTION)

    def projection(self, name: str) -> PackedTensor | None:
        """The weight a TEAL projection name refers to (down: the transposed matrix)."""
        if name == "down":
            return self.down_t
        lin = getattr(self, name)
        return None if lin is None else lin.w

    def column_norm(self, name: str) -> np.ndarray | None:
        """(K,) float32 norms of the input columns of a TEAL projection's weight (None: no such projection)."""
        if name not in self.colnorms:
            t = self.projection(name)
            if t is None:
                return None
            self.colnorms[name] = packed_column_norms(t, transposed=name == "down")
        return self.colnorms[name]


@dataclass
class Weights:
    embed: PackedTensor  # (vocab, d)
    pos_embed: PackedTensor | None  # (max_positions + offset, d), OPT only
    lm_head: PackedTensor  # (vocab, d); the embedding itself when tied
    final_norm: Norm
    layers: list[Layer]


def _vec(model: PackedModel, name: str) -> np.ndarray | None:
    v = model.vectors.get(name)
    return None if v is None else np.asarray(v, dtype=np.float32)


def _linear(model: PackedModel, name: str) -> Linear:
    return Linear(model.matrices[name], _vec(model, name + "_bias"))


def _norm(model: PackedModel, prefix: str) -> Norm:
    return Norm(_vec(model, prefix + ".weight"), _vec(model, prefix + ".bias"), model.config.norm_eps)


def _layer(model: PackedModel, i: int) -> Layer:
    p = f"layers.{i}."
    return Layer(
        attn_norm=_norm(model, p + "attn_norm"),
        q=_linear(model, p + "attn.q"), k=_linear(model, p + "attn.k"),
        v=_linear(model, p + "attn.v"), o=_linear(model, p + "attn.o"),
        ffn_norm=_norm(model, p + "ffn_norm"),
        gate=_linear(model, p + "ffn.gate"),
        up=_linear(model, p + "ffn.up") if model.config.gated else None,
        down_t=model.matrices[p + "ffn.down_t"], down_b=_vec(model, p + "ffn.down_bias"),
        gate_signs=np.asarray(model.sign_planes[p + "ffn.gate_signs"]),
        attn_post_norm=_norm(model, p + "attn_post_norm") if model.config.post_norms else None,
        ffn_post_norm=_norm(model, p + "ffn_post_norm") if model.config.post_norms else None,
        colnorms={proj: _vec(model, p + name) for proj, name in COLNORM_NAME.items() if p + name in model.vectors},
    )


def weights_of(model: PackedModel) -> Weights:
    cfg = model.config
    embed = model.matrices["embed"]
    return Weights(embed=embed, pos_embed=model.matrices.get("pos_embed"),
                   lm_head=embed if cfg.tie_embeddings else model.matrices["lm_head"],
                   final_norm=_norm(model, "final_norm"), layers=[_layer(model, i) for i in range(cfg.n_layers)])
