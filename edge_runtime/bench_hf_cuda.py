"""Hugging Face transformers eager fp16 on a CUDA GPU, holding the very weights of a packed Llama (the baseline
of scripts/bench_decode_e2e.py: the same weights in every engine). torch and transformers are imported only
here, when the benchmark asks for the baseline.

Layers that share host arrays (pack/synthetic.random_llama's distinct_layers) share one device tensor here too;
every shared layer is still read in full at its turn, and each is far larger than any L2."""

from __future__ import annotations

import time

import numpy as np

from edge_runtime.config import ModelConfig
from edge_runtime.pack.loader import PackedModel


def torch_cuda():
    """torch when it and transformers are installed and torch sees a CUDA device, else None (the benchmark then
    says so)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def hf_llama(torch, model: PackedModel, cfg: ModelConfig, device: str = "cuda", dtype=None):
    """LlamaForCausalLM (eager attention; fp16 unless dtype says otherwise; on `device`) with the packed model's
    weights, dequantised once."""
    dtype = dtype or torch.float16
    from transformers import LlamaConfig, LlamaForCausalLM

    if (cfg.arch, cfg.activation, cfg.rope_scaling, cfg.rope_theta) != ("llama", "relu", None, 10000.0):
        raise ValueError("the transformers baseline covers plain ReLU Llamas with the default RoPE")
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="relu",
                         max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
                         tie_word_embeddings=cfg.tie_embeddings, mlp_bias=True)
    hf_cfg._attn_implementation = "eager"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    on_device: dict[int, object] = {}

    def param(host, transpose: bool = False):
        """A PackedTensor or fp32 vector -> one Parameter (dtype, on device) per host object."""
        if id(host) not in on_device:
            a = host if isinstance(host, np.ndarray) else host.dequantize()
            a = np.ascontiguousarray(a.T if transpose else a)
            on_device[id(host)] = torch.nn.Parameter(torch.from_numpy(a).to(device, dtype),
                                                     requires_grad=False)
        return on_device[id(host)]

    mats, vecs = model.matrices, model.vectors
    zeros_n, zeros_d = np.zeros(cfg.ffn_dim, np.float32), np.zeros(cfg.dim, np.float32)
    hf.model.embed_tokens.weight = param(mats["embed"])
    hf.lm_head.weight = param(mats.get("lm_head", mats["embed"]))
    hf.model.norm.weight = param(vecs["final_norm.weight"])
    for i, layer in enumerate(hf.model.layers):
        p = f"layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        att.q_proj.weight, att.k_proj.weight = param(mats[p + "attn.q"]), param(mats[p + "attn.k"])
        att.v_proj.weight, att.o_proj.weight = param(mats[p + "attn.v"]), param(mats[p + "attn.o"])
        mlp.gate_proj.weight, mlp.up_proj.weight = param(mats[p + "ffn.gate"]), param(mats[p + "ffn.up"])
        mlp.down_proj.weight = param(mats[p + "ffn.down_t"], transpose=True)  # stored (ffn, d); HF holds (d, ffn)
        mlp.gate_proj.bias = param(vecs.get(p + "ffn.gate_bias", zeros_n))
        mlp.up_proj.bias, mlp.down_proj.bias = param(zeros_n), param(zeros_d)
        layer.input_layernorm.weight = param(vecs[p + "attn_norm.weight"])
        layer.post_attention_layernorm.weight = param(vecs[p + "ffn_norm.weight"])
    with torch.device(device):  # its inverse frequencies are buffers, still on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers baseline: no weights for {', '.join(left[:5])}")
    return hf.eval()


def hf_decode(model: PackedModel, cfg: ModelConfig, prompt_ids: list[int], tokens: int, energy) -> dict | None:
    """Greedy decode with transformers' KV cache after a prefill of prompt_ids: tokens/s, J/token (energy(): the
    GPU's energy counter in J, or None) and the ids. None without torch on a CUDA device."""
    torch = torch_cuda()
    if torch is None:
        return None
    hf = hf_llama(torch, model, cfg)
    ids = []
    with torch.inference_mode():
        out = hf(input_ids=torch.tensor([prompt_ids], device="cuda"), use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        ids.append(int(tok))
        for _ in range(3):  # warm-up
            out = hf(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            ids.append(int(tok))
        torch.cuda.synchronize()
        e0, t0 = energy(), time.perf_counter()
        for _ in range(tokens):
            out = hf(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        secs, e1 = time.perf_counter() - t0, energy()
    del hf, past, out
    torch.cuda.empty_cache()
    return {"tokens_per_s": tokens / secs, "joules_per_token": None if e0 is None else (e1 - e0) / tokens,
            "first_ids": ids}
