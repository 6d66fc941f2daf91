"""The model configuration every other module reads: what the network computes, not where it lives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import ModelFormatError

ARCHITECTURES = ("llama", "opt")
ACTIVATIONS = ("silu", "relu", "fatrelu")
# Activations whose zeros the sign-bit predictor can predict (gate <= threshold gives an exact zero).
RELU_FAMILY = ("relu", "fatrelu")


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
        if self.arch not in ARCHITECTURES:
            raise ModelFormatError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.activation not in ACTIVATIONS:
            raise ModelFormatError(f"unknown activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

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
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)
