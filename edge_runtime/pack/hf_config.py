"""Hugging Face config.json -> ModelConfig, and which HF tensor becomes which packed tensor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import ModelConfig
from edge_runtime.errors import ModelFormatError, UnsupportedModelError

SUPPORTED = "llama (hidden_act silu, relu or fatrelu) and opt (relu)"
_ROPE_TYPES = ("default", "linear", "llama3")


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported model: {what}; supported architectures are {SUPPORTED}")


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ModelFormatError(f"{hf_dir} is not a directory")
    if not path.is_file():
        raise ModelFormatError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return cfg


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """transformers >= 5 writes rope_parameters (theta inside); 4.x writes rope_theta and rope_scaling."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise _unsupported(f"rope scaling {rope_type!r} (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, params


def _need(cfg: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ModelFormatError(f"config.json is missing {', '.join(missing)}")
    return [cfg[k] for k in keys]


def _llama(cfg: dict[str, Any]) -> ModelConfig:
    dim, n_layers, n_heads, ffn, vocab = _need(
        cfg, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "relu", "fatrelu"):
        raise _unsupported(f"llama with hidden_act {act!r}")
    threshold = float(cfg.get("hidden_act_param", cfg.get("fatrelu_threshold", 0.0))) if act == "fatrelu" else 0.0
    theta, scaling = _rope(cfg)
    return ModelConfig(
        arch="llama", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or dim // n_heads, ffn_dim=ffn, activation=act,
        act_threshold=threshold, max_positions=cfg.get("max_position_embeddings", 2048),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta, rope_scaling=scaling, attn_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg))


def _opt(cfg: dict[str, Any]) -> ModelConfig:
    dim, n_layers, n_heads, ffn, vocab = _need(
        cfg, "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size")
    if cfg.get("activation_function", "relu") != "relu":
        raise _unsupported(f"opt with activation_function {cfg.get('activation_function')!r}")
    if not cfg.get("do_layer_norm_before", True):
        raise _unsupported("opt with do_layer_norm_before=false (OPT-350m's post-norm layout)")
    if cfg.get("word_embed_proj_dim", dim) != dim:
        raise _unsupported("opt with word_embed_proj_dim != hidden_size (project_in/out layers)")
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise _unsupported("opt without biases or without affine layer norms")
    return ModelConfig(
        arch="opt", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
        head_dim=dim // n_heads, ffn_dim=ffn, activation="relu",
        max_positions=cfg.get("max_position_embeddings", 2048), norm_eps=1e-5, tie_embeddings=True,
        attn_bias=True, mlp_bias=True, pos_offset=2, bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg))


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    model_type = cfg.get("model_type")
    try:
        if model_type == "llama":
            return _llama(cfg)
        if model_type == "opt":
            return _opt(cfg)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"config.json has a malformed value: {e}") from None
    raise _unsupported(f"model_type {model_type!r}")


@dataclass(frozen=True)
class TensorSource:
    """One packed tensor and where it comes from in the HF checkpoint."""

    name: str  # packed logical name
    hf_name: str
    kind: str  # "matrix" (quantised, (N, K)), "matrix_t" (stored transposed), "vector", "embedding"


def tensor_plan(cfg: ModelConfig) -> list[TensorSource]:
    """Every tensor the packed model holds, in file order. OPT's fc1 is called the gate: it is the
    projection whose ReLU decides which FFN neurons are active."""
    plan: list[TensorSource] = []
    if cfg.arch == "llama":
        p = "model."
        plan.append(TensorSource("embed", p + "embed_tokens.weight", "embedding"))
        for i in range(cfg.n_layers):
            lp, q = f"{p}layers.{i}.", f"layers.{i}."
            plan.append(TensorSource(q + "attn_norm.weight", lp + "input_layernorm.weight", "vector"))
            for s in "qkvo":
                plan.append(TensorSource(f"{q}attn.{s}", f"{lp}self_attn.{s}_proj.weight", "matrix"))
                if cfg.attn_bias:
                    plan.append(TensorSource(f"{q}attn.{s}_bias", f"{lp}self_attn.{s}_proj.bias", "vector"))
            plan.append(TensorSource(q + "ffn_norm.weight", lp + "post_attention_layernorm.weight", "vector"))
            plan.append(TensorSource(q + "ffn.gate", lp + "mlp.gate_proj.weight", "matrix"))
            plan.append(TensorSource(q + "ffn.up", lp + "mlp.up_proj.weight", "matrix"))
            plan.append(TensorSource(q + "ffn.down_t", lp + "mlp.down_proj.weight", "matrix_t"))
            if cfg.mlp_bias:
                for s in ("gate", "up", "down"):
                    plan.append(TensorSource(f"{q}ffn.{s}_bias", f"{lp}mlp.{s}_proj.bias", "vector"))
        plan.append(TensorSource("final_norm.weight", p + "norm.weight", "vector"))
        if not cfg.tie_embeddings:
            plan.append(TensorSource("lm_head", "lm_head.weight", "matrix"))
        return plan
    p = "model.decoder."
    plan.append(TensorSource("embed", p + "embed_tokens.weight", "embedding"))
    plan.append(TensorSource("pos_embed", p + "embed_positions.weight", "embedding"))
    for i in range(cfg.n_layers):
        lp, q = f"{p}layers.{i}.", f"layers.{i}."
        for ours, theirs in (("attn_norm", "self_attn_layer_norm"), ("ffn_norm", "final_layer_norm")):
            plan.append(TensorSource(f"{q}{ours}.weight", f"{lp}{theirs}.weight", "vector"))
            plan.append(TensorSource(f"{q}{ours}.bias", f"{lp}{theirs}.bias", "vector"))
        for s, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            plan.append(TensorSource(f"{q}attn.{s}", f"{lp}self_attn.{theirs}.weight", "matrix"))
            plan.append(TensorSource(f"{q}attn.{s}_bias", f"{lp}self_attn.{theirs}.bias", "vector"))
        plan.append(TensorSource(q + "ffn.gate", lp + "fc1.weight", "matrix"))
        plan.append(TensorSource(q + "ffn.gate_bias", lp + "fc1.bias", "vector"))
        plan.append(TensorSource(q + "ffn.down_t", lp + "fc2.weight", "matrix_t"))
        plan.append(TensorSource(q + "ffn.down_bias", lp + "fc2.bias", "vector"))
    plan.append(TensorSource("final_norm.weight", p + "final_layer_norm.weight", "vector"))
    plan.append(TensorSource("final_norm.bias", p + "final_layer_norm.bias", "vector"))
    return plan
