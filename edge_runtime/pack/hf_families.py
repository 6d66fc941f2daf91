"""Per-family Hugging Face config.json -> ModelConfig, and where each family keeps its tensors (HFLayout).

Every family here is a Llama-shaped decoder (RMSNorm, RoPE, gated FFN) to the runtime; what differs lives in
ModelConfig fields (biases, embedding scale, post norms, soft-capping, sliding windows) and in conversion (fused
projections split, Gemma's (1 + w) norm weights folded). The runtime never learns the family's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.config import ModelConfig
from edge_runtime.errors import ModelFormatError, UnsupportedModelError

# A line naming what convert takes (UnsupportedModelError messages end with it).
SUPPORTED = ("llama (hidden_act silu, relu, fatrelu or drelu), mistral and qwen2/qwen2.5 (silu or drelu), "
             "phi3 (silu, default/linear/llama3 rope, full rotary), gemma and gemma2 (gelu_pytorch_tanh), "
             "opt (relu)")
ROPE_TYPES = ("default", "linear", "llama3")
# dReLU (TurboSparse: relu(W_gate x) * relu(W_up x)) has no transformers class: its config.json says
# "hidden_act": "drelu" (this project's marker; TurboSparse's own files use custom modelling code).
# "gelu" is accepted for Gemma only, where transformers reads it as the tanh approximation (a legacy value).
GATED_ACTS = {"silu": "silu", "relu": "relu", "fatrelu": "fatrelu", "drelu": "drelu",
              "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}


def unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported model: {what}; supported: {SUPPORTED}")


@dataclass(frozen=True)
class HFLayout:
    """Names of one decoder layer's tensors in a family's checkpoint (after `model.layers.{i}.`)."""

    attn_norm: str = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"
    attn_post_norm: str = "post_attention_layernorm"  # the attention output's norm (config post_norms)
    ffn_post_norm: str = "post_feedforward_layernorm"  # the FFN output's norm (config post_norms)
    fused_qkv: str | None = None  # Phi-3: q, k, v stacked in one matrix, split at conversion
    fused_gate_up: str | None = None  # Phi-3: gate then up stacked in one matrix
    norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (offset + w); folded into the stored weight


LLAMA = HFLayout()
PHI3 = HFLayout(fused_qkv="self_attn.qkv_proj", fused_gate_up="mlp.gate_up_proj")
GEMMA = HFLayout(norm_offset=1.0)
GEMMA2 = HFLayout(ffn_norm="pre_feedforward_layernorm", norm_offset=1.0)


def need(cfg: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ModelFormatError(f"config.json is missing {', '.join(missing)}")
    return [cfg[k] for k in keys]


def flag(cfg: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false field; bool("false") is True, so a string (or a number) is refused, not read as true."""
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ModelFormatError(f"config.json: {key} must be true or false, not {v!r}")
    return v


def eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope(cfg: dict[str, Any], family: str) -> tuple[float, dict[str, Any] | None]:
    """transformers >= 5 writes rope_parameters (theta inside); 4.x writes rope_theta and rope_scaling."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise unsupported(f"{family} with partial_rotary_factor {partial} (rotary over part of each head)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise unsupported(f"{family} rope scaling {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, params


def _sliding(cfg: dict[str, Any], family: str, default_types: Callable[[int], bool] | None) -> dict[str, Any]:
    """sliding_window and the layers that use it, as transformers decides: layer_types when config.json has
    them, else default_types(i) (None: every layer when a window is set). A config without the key gets the
    family's class default (FAMILY_DEFAULTS); null means no window."""
    n_layers = cfg.get("num_hidden_layers", 0)
    window = setting(cfg, family, "sliding_window")
    if not window:
        return {}
    types = cfg.get("layer_types")
    if types:
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        layers = tuple(i for i in range(n_layers) if default_types is None or default_types(i))
    return {"sliding_window": int(window), "sliding_layers": layers} if layers else {}


def _dtype_round(x: float, cfg: dict[str, Any]) -> float:
    """x as the model's dtype holds it (transformers casts Gemma's embedding scale to the weights' dtype)."""
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if dtype == "bfloat16":
        bits = np.array([x], np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even, as torch
        return float(bits.view(np.float32)[0])
    return float(np.float16(x) if dtype == "float16" else np.float32(x))


# transformers' class defaults (5.x) for keys a config.json may leave out, where they are not derived from
# other keys (head_dim, KV heads: from the attention heads) or the same everywhere (rope_theta 10000);
# tests/test_families.py checks them against the config classes.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "num_key_value_heads": 8,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "num_key_value_heads": 32,
              "sliding_window": 4096, "max_window_layers": 28},  # the window with use_sliding_window only
    "phi3": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "gemma": {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "num_key_value_heads": 16, "head_dim": 256},
    "gemma2": {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "num_key_value_heads": 4, "head_dim": 256,
               "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
}


def setting(cfg: dict[str, Any], family: str, key: str, fallback: Any = None) -> Any:
    """config.json's value; when the key is left out, the family's transformers default, else fallback. An
    explicit null stays null (a window or a soft-cap turned off)."""
    return cfg[key] if key in cfg else FAMILY_DEFAULTS[family].get(key, fallback)


def _base(cfg: dict[str, Any], family: str, act: str, **extra: Any) -> ModelConfig:
    """The fields every family shares; a key config.json leaves out gets the transformers class default."""
    dim, n_layers, n_heads, ffn, vocab = need(
        cfg, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    threshold = float(cfg.get("hidden_act_param", cfg.get("fatrelu_threshold", 0.0))) if act == "fatrelu" else 0.0
    theta, scaling = _rope(cfg, family)
    fields: dict[str, Any] = dict(
        arch="llama", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=setting(cfg, family, "num_key_value_heads") or n_heads,
        head_dim=setting(cfg, family, "head_dim") or dim // n_heads, ffn_dim=ffn, activation=act,
        act_threshold=threshold, max_positions=setting(cfg, family, "max_position_embeddings"),
        norm_eps=float(setting(cfg, family, "rms_norm_eps")), tie_embeddings=flag(cfg, "tie_word_embeddings", False),
        rope_theta=theta, rope_scaling=scaling, attn_bias=flag(cfg, "attention_bias", False),
        mlp_bias=flag(cfg, "mlp_bias", False), bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg))
    fields.update(extra)
    return ModelConfig(**fields)


def _act(cfg: dict[str, Any], family: str, allowed: tuple[str, ...], key: str = "hidden_act") -> str:
    act = cfg.get(key) or cfg.get("hidden_act", "silu")
    if act not in allowed:
        raise unsupported(f"{family} with {key} {act!r} (supported: {', '.join(allowed)})")
    return GATED_ACTS[act]


def llama(cfg: dict[str, Any]) -> ModelConfig:
    return _base(cfg, "llama", _act(cfg, "llama", ("silu", "relu", "fatrelu", "drelu")))


def mistral(cfg: dict[str, Any]) -> ModelConfig:
    """Every layer attends within sliding_window when config.json sets one (Mistral 7B v0.1: 4096)."""
    return _base(cfg, "mistral", _act(cfg, "mistral", ("silu", "drelu")), **_sliding(cfg, "mistral", None))


def qwen2(cfg: dict[str, Any]) -> ModelConfig:
    """q, k, v carry biases, o does not. Sliding only with use_sliding_window, on layers >= max_window_layers."""
    sliding = {}
    if flag(cfg, "use_sliding_window", False):
        start = setting(cfg, "qwen2", "max_window_layers")
        sliding = _sliding(cfg, "qwen2", lambda i: i >= start)
    return _base(cfg, "qwen2", _act(cfg, "qwen2", ("silu", "drelu")), qkv_bias=True, attn_bias=False, **sliding)


def phi3(cfg: dict[str, Any]) -> ModelConfig:
    """Fused qkv_proj and gate_up_proj (split at conversion); LongRoPE ("longrope", "su") is refused by name."""
    return _base(cfg, "phi3", _act(cfg, "phi3", ("silu",)), **_sliding(cfg, "phi3", None))


def gemma(cfg: dict[str, Any]) -> ModelConfig:
    """GeGLU with the tanh GELU (legacy "gelu" means it too, as transformers says), embeddings scaled by
    sqrt(hidden_size) in the model's dtype, (1 + w) norms (folded at conversion), tied embeddings."""
    return _base(cfg, "gemma", _act(cfg, "gemma", ("gelu_pytorch_tanh", "gelu"), key="hidden_activation"),
                 tie_embeddings=flag(cfg, "tie_word_embeddings", True),
                 embed_scale=_dtype_round(math.sqrt(cfg["hidden_size"]), cfg))


def gemma2(cfg: dict[str, Any]) -> ModelConfig:
    """Gemma plus post-attention and post-FFN norms, attention and logit soft-capping, queries scaled by
    query_pre_attn_scalar ** -0.5, and a sliding window on alternate layers (even ones, by default)."""
    act = _act(cfg, "gemma2", ("gelu_pytorch_tanh",), key="hidden_activation")
    return _base(cfg, "gemma2", act, tie_embeddings=flag(cfg, "tie_word_embeddings", True),
                 embed_scale=_dtype_round(math.sqrt(cfg["hidden_size"]), cfg), post_norms=True,
                 query_pre_attn_scalar=float(setting(cfg, "gemma2", "query_pre_attn_scalar")),
                 attn_softcap=float(setting(cfg, "gemma2", "attn_logit_softcapping") or 0.0),
                 logit_softcap=float(setting(cfg, "gemma2", "final_logit_softcapping") or 0.0),
                 **_sliding(cfg, "gemma2", lambda i: (i + 1) % 2 == 1))


# model_type -> (config builder, tensor layout)
FAMILIES: dict[str, tuple[Callable[[dict[str, Any]], ModelConfig], HFLayout]] = {
    "llama": (llama, LLAMA), "mistral": (mistral, LLAMA), "qwen2": (qwen2, LLAMA), "phi3": (phi3, PHI3),
    "gemma": (gemma, GEMMA), "gemma2": (gemma2, GEMMA2),
}
