"""The model configuration every other module reads (a leaf: pack/ and model/ both import it): what the network
computes, not where it lives."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import ModelFormatError

ARCHITECTURES = ("llama", "opt")
ACTIVATIONS = ("silu", "relu", "fatrelu")
# Activations whose zeros the sign-bit predictor can predict (gate <= threshold gives an exact zero).
RELU_FAMILY = ("relu", "fatrelu")
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
        for name in ("tie_embeddings", "attn_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bos_token_id is not None:
            _int("bos_token_id", self.bos_token_id, 0)
        for t in self.eos_token_ids:
            _int("eos_token_ids[]", t, 0)

    @property
    def gated(self) -> bool:
        """Llama-style FFN relu(W_gate x) * (W_up x); OPT's is relu(W_1 x + b) with no up projection."""
        return self.arch == "llama"

    @property
    def relu_family(self) -> bool:
        return self.activation in RELU_FAMILY

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
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
        return cls(**d)
