"""The model configuration every other module reads (a leaf: pack/ and model/ both import it): what the network
computes, not where it lives."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import ModelFormatError

ARCHITECTURES = ("llama", "opt")
# silu: silu(g) * u; relu, fatrelu: relu(g) * u (FATReLU: g below act_threshold is 0); gelu_tanh: HF
# gelu_pytorch_tanh(g) * u (GeGLU, Gemma); drelu: relu(g) * relu(u) (dReLU, TurboSparse).
ACTIVATIONS = ("silu", "relu", "fatrelu", "gelu_tanh", "drelu")
# Activations whose zeros the sign-bit predictor can predict (gate <= threshold gives an exact zero).
RELU_FAMILY = ("relu", "fatrelu", "drelu")
# Every size must be a positive integer below this: products of two stay exact in int64, and the
# loader then checks each against the tensors that hold it (so against the files' sizes).
MAX_SIZE = 2**31 - 1
SIZES = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_positions")
ROPE_TYPES = ("linear", "llama3")


def _bad(msg: str) -> ModelFormatError:
    return ModelFormatError(f"model config: {msg}")


def _int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_SIZE:
        raise _bad(f"{name} must be an integer in [{low}, {MAX_SIZE}], got {v!r}")


def _num(name: str, v: Any, low: float | None = None, positive: bool = False) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if not ok or (low is not None and v < low) or (positive and v <= 0):
        need = "> 0" if positive else (f">= {low}" if low is not None else "finite")
        raise _bad(f"{name} must be a finite number {need}, got {v!r}")


def _check_rope_scaling(sc: Any) -> None:
    """HF rope_scaling as rope.inverse_frequencies reads it."""
    if sc is None:
        return
    if not isinstance(sc, dict) or sc.get("rope_type") not in ROPE_TYPES:
        raise _bad(f"rope_scaling must be null or a mapping with rope_type in {ROPE_TYPES}, got {sc!r}")
    _num("rope_scaling.factor", sc.get("factor"), positive=True)
    if sc["rope_type"] == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _num(f"rope_scaling.{key}", sc.get(key), positive=True)
        if sc["high_freq_factor"] <= sc["low_freq_factor"]:
            raise _bad("rope_scaling.high_freq_factor must be above low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (RMSNorm, RoPE, gated FFN) or "opt" (LayerNorm, learned positions, plain FFN)
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    activation: str  # one of ACTIVATIONS
    max_positions: int
    norm_eps: float = 1e-5
    act_threshold: float = 0.0  # FATReLU: gate values below this are zero; 0 for plain ReLU
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict ("linear" or "llama3"), or None
    attn_bias: bool = False  # q/k/v/o projections carry a bias (OPT, some Llamas)
    mlp_bias: bool = False
    pos_offset: int = 0  # OPT's learned positions start at index 2
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    qkv_bias: bool = False  # q, k, v carry a bias and o does not (Qwen2); attn_bias covers all four
    embed_scale: float = 1.0  # the token embedding is multiplied by this (Gemma: sqrt(dim) in the model dtype)
    post_norms: bool = False  # RMSNorm of the attention and FFN outputs before each residual add (Gemma-2)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by this ** -0.5, not head_dim ** -0.5
    attn_softcap: float = 0.0  # scores -> c * tanh(scores / c) before the softmax (Gemma-2); 0 = off
    logit_softcap: float = 0.0  # final logits -> c * tanh(logits / c) (Gemma-2); 0 = off
    sliding_window: int = 0  # a sliding layer's query at p sees keys p - sliding_window < t <= p; 0 = none
    sliding_layers: tuple[int, ...] = field(default_factory=tuple)  # the layers that use sliding_window

    def __post_init__(self) -> None:
        """Types and ranges only; the loader checks the sizes against the stored tensors."""
        if not isinstance(self.arch, str) or self.arch not in ARCHITECTURES:
            raise ModelFormatError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ModelFormatError(f"unknown activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in SIZES:
            _int(name, getattr(self, name), 1)
        _int("pos_offset", self.pos_offset, 0)
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.arch == "llama" and self.head_dim % 2:
            raise _bad(f"head_dim {self.head_dim} must be even (rotary embeddings rotate half of each head)")
        _num("norm_eps", self.norm_eps, low=0.0)
        _num("act_threshold", self.act_threshold)
        _num("rope_theta", self.rope_theta, positive=True)
        _check_rope_scaling(self.rope_scaling)
        _num("embed_scale", self.embed_scale, positive=True)
        if self.query_pre_attn_scalar is not None:
            _num("query_pre_attn_scalar", self.query_pre_attn_scalar, positive=True)
        _num("attn_softcap", self.attn_softcap, low=0.0)
        _num("logit_softcap", self.logit_softcap, low=0.0)
        _int("sliding_window", self.sliding_window, 0)
        for i in self.sliding_layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers:
                raise _bad(f"sliding_layers must hold layer indices below {self.n_layers}, got {i!r}")
        if self.sliding_layers and not self.sliding_window:
            raise _bad("sliding_layers given without a sliding_window")
        if self.arch == "opt" and self.activation != "relu":
            raise _bad(f"opt has a plain relu FFN, not {self.activation}")
        for name in ("tie_embeddings", "attn_bias", "mlp_bias", "qkv_bias", "post_norms"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        # ids the decoder feeds (BOS: warm-up, prompts) or waits for (EOS: a stop that could never come)
        for name, t in [("bos_token_id", self.bos_token_id)] + [("eos_token_ids[]", t) for t in self.eos_token_ids]:
            if t is not None:
                _int(name, t, 0)
                if t >= self.vocab_size:
                    raise _bad(f"{name} {t} is outside the vocabulary of {self.vocab_size} tokens")

    @property
    def gated(self) -> bool:
        """Llama-style FFN relu(W_gate x) * (W_up x); OPT's is relu(W_1 x + b) with no up projection."""
        return self.arch == "llama"

    @property
    def relu_family(self) -> bool:
        return self.activation in RELU_FAMILY

    @property
    def up_relu(self) -> bool:
        """dReLU: the up projection goes through a ReLU too, so a row with up <= 0 is an exact zero."""
        return self.activation == "drelu"

    @property
    def attn_scale(self) -> float:
        """What q k^T is multiplied by before the softmax."""
        return float((self.query_pre_attn_scalar or self.head_dim) ** -0.5)

    def window(self, layer: int) -> int:
        """Layer's sliding window (its query at p attends to keys t with p - window < t <= p); 0 = full."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def extra_features(self) -> list[str]:
        """Names of what this config uses beyond a plain Llama/OPT forward (for paths that refuse them)."""
        return [name for name, on in (
            (f"activation {self.activation}", self.activation in ("gelu_tanh", "drelu")),
            ("embed_scale", self.embed_scale != 1.0), ("post_norms", self.post_norms),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar is not None),
            ("attn_softcap", self.attn_softcap > 0), ("logit_softcap", self.logit_softcap > 0),
            ("sliding_window", bool(self.sliding_layers))) if on]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ModelFormatError(f"model config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ModelFormatError(f"model config is missing {', '.join(missing)}")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelFormatError(f"model config has unknown keys {', '.join(unknown)}")
        d = dict(d)
        eos = d.get("eos_token_ids") or ()
        if not isinstance(eos, (list, tuple)):
            raise _bad(f"eos_token_ids must be a list of token ids, got {eos!r}")
        d["eos_token_ids"] = tuple(eos)
        layers = d.get("sliding_layers") or ()
        if not isinstance(layers, (list, tuple)):
            raise _bad(f"sliding_layers must be a list of layer indices, got {layers!r}")
        d["sliding_layers"] = tuple(layers)
        return cls(**d)
