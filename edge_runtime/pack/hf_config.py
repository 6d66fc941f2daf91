"""Hugging Face config.json -> ModelConfig, and which HF tensor becomes which packed tensor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.config import ModelConfig
from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.hf_families import FAMILIES, LLAMA, SUPPORTED, HFLayout, eos_ids, flag, need, unsupported

__all__ = ["SUPPORTED", "HFLayout", "TensorSource", "hf_layout", "model_config_from_hf", "read_hf_config",
           "tensor_plan"]


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
    generation_eos = _generation_eos(hf_dir)
    if generation_eos:  # an instruct model's end-of-turn token is often listed there only (Phi-3's <|end|>)
        own = cfg.get("eos_token_id")
        own = own if isinstance(own, list) else [] if own is None else [own]
        cfg = {**cfg, "eos_token_id": list(dict.fromkeys([*own, *generation_eos]))}
    return cfg


def _generation_eos(hf_dir: Path) -> list:
    """generation_config.json's eos_token_id as a list (empty when absent); transformers' generate stops at
    these as well as config.json's."""
    path = hf_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ModelFormatError(f"{path} is not a valid JSON object: {e}") from None
    return eos if isinstance(eos, list) else [] if eos is None else [eos]


def _opt(cfg: dict[str, Any]) -> ModelConfig:
    dim, n_layers, n_heads, ffn, vocab = need(
        cfg, "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size")
    if cfg.get("activation_function", "relu") != "relu":
        raise unsupported(f"opt with activation_function {cfg.get('activation_function')!r}")
    if not cfg.get("do_layer_norm_before", True):
        raise unsupported("opt with do_layer_norm_before=false (OPT-350m's post-norm layout)")
    if cfg.get("word_embed_proj_dim", dim) != dim:
        raise unsupported("opt with word_embed_proj_dim != hidden_size (project_in/out layers)")
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise unsupported("opt without biases or without affine layer norms")
    return ModelConfig(
        arch="opt", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
        head_dim=dim // n_heads, ffn_dim=ffn, activation="relu",
        max_positions=cfg.get("max_position_embeddings", 2048), norm_eps=1e-5,
        tie_embeddings=flag(cfg, "tie_word_embeddings", True),
        attn_bias=True, mlp_bias=True, pos_offset=2, bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg))


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    model_type = cfg.get("model_type")
    quant = cfg.get("quantization_config")
    if quant:  # its integer tensors would be read as the weights themselves
        method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else "unnamed"
        raise unsupported(f"a pre-quantised checkpoint (quantization_config, method {method!r}); convert the "
                          f"original fp16, bf16 or fp32 weights: --dtype int8 or int4 quantises them here")
    try:
        if model_type in FAMILIES:
            return FAMILIES[model_type][0](cfg)
        if model_type == "opt":
            return _opt(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelFormatError(f"config.json has a malformed value: {e}") from None
    raise unsupported(f"model_type {model_type!r}")


def hf_layout(cfg: dict[str, Any]) -> HFLayout:
    """Where the checkpoint of this config.json keeps a layer's tensors (OPT: unused)."""
    return FAMILIES.get(cfg.get("model_type"), (None, LLAMA))[1]


@dataclass(frozen=True)
class TensorSource:
    """One packed tensor and where it comes from in the HF checkpoint."""

    name: str  # packed logical name
    hf_name: str
    kind: str  # "matrix" (quantised, (N, K)), "matrix_t" (stored transposed), "vector", "embedding"
    rows: tuple[int, int] | None = None  # rows [a, b) of the HF tensor (a fused projection's part); None = all
    offset: float = 0.0  # added to the HF values (Gemma's norms compute (1 + w) x)

    def read(self, reader) -> np.ndarray:
        """This tensor's values as float32 from a CheckpointReader."""
        w = reader.get(self.hf_name)
        if self.rows is not None:
            w = np.ascontiguousarray(w[self.rows[0]:self.rows[1]])
        return w + np.float32(self.offset) if self.offset else w


def _llama_layer(cfg: ModelConfig, lay: HFLayout, i: int) -> list[TensorSource]:
    lp, q = f"model.layers.{i}.", f"layers.{i}."
    out = [TensorSource(q + "attn_norm.weight", lp + lay.attn_norm + ".weight", "vector", offset=lay.norm_offset)]
    hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    qkv_rows = {"q": (0, hq), "k": (hq, hq + hkv), "v": (hq + hkv, hq + 2 * hkv)}
    for s in "qkvo":
        if lay.fused_qkv and s != "o":
            out.append(TensorSource(f"{q}attn.{s}", f"{lp}{lay.fused_qkv}.weight", "matrix", rows=qkv_rows[s]))
        else:
            out.append(TensorSource(f"{q}attn.{s}", f"{lp}self_attn.{s}_proj.weight", "matrix"))
        if cfg.attn_bias or (cfg.qkv_bias and s != "o"):
            out.append(TensorSource(f"{q}attn.{s}_bias", f"{lp}self_attn.{s}_proj.bias", "vector"))
    if cfg.post_norms:
        out.append(TensorSource(q + "attn_post_norm.weight", lp + lay.attn_post_norm + ".weight", "vector",
                                offset=lay.norm_offset))
    out.append(TensorSource(q + "ffn_norm.weight", lp + lay.ffn_norm + ".weight", "vector", offset=lay.norm_offset))
    n = cfg.ffn_dim
    if lay.fused_gate_up:
        out.append(TensorSource(q + "ffn.gate", f"{lp}{lay.fused_gate_up}.weight", "matrix", rows=(0, n)))
        out.append(TensorSource(q + "ffn.up", f"{lp}{lay.fused_gate_up}.weight", "matrix", rows=(n, 2 * n)))
    else:
        out.append(TensorSource(q + "ffn.gate", lp + "mlp.gate_proj.weight", "matrix"))
        out.append(TensorSource(q + "ffn.up", lp + "mlp.up_proj.weight", "matrix"))
    out.append(TensorSource(q + "ffn.down_t", lp + "mlp.down_proj.weight", "matrix_t"))
    if cfg.mlp_bias:
        for s in ("gate", "up", "down"):
            out.append(TensorSource(f"{q}ffn.{s}_bias", f"{lp}mlp.{s}_proj.bias", "vector"))
    if cfg.post_norms:
        out.append(TensorSource(q + "ffn_post_norm.weight", lp + lay.ffn_post_norm + ".weight", "vector",
                                offset=lay.norm_offset))
    return out


def tensor_plan(cfg: ModelConfig, layout: HFLayout = LLAMA) -> list[TensorSource]:
    """Every tensor the packed model holds, in file order. The packed names depend on cfg alone; layout says
    where a Llama-shaped family keeps them. OPT's fc1 is called the gate: it is the projection whose ReLU
    decides which FFN neurons are active."""
    plan: list[TensorSource] = []
    if cfg.arch == "llama":
        plan.append(TensorSource("embed", "model.embed_tokens.weight", "embedding"))
        for i in range(cfg.n_layers):
            plan += _llama_layer(cfg, layout, i)
        plan.append(TensorSource("final_norm.weight", "model.norm.weight", "vector", offset=layout.norm_offset))
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
    if not cfg.tie_embeddings:
        plan.append(TensorSource("lm_head", "lm_head.weight", "matrix"))
    return plan
