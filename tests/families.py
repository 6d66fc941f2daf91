"""Tiny random checkpoints of every convertible family, built with transformers' own config classes (tests
only). Each is a 2-layer model with GQA (where the family has it) and the family's particulars switched on:
Qwen2's q/k/v biases, Mistral's and Gemma-2's sliding windows (8 positions, shorter than the test prompts),
Phi-3's fused projections, Gemma's (1 + w) norms and embedding scale, Gemma-2's soft-capping (caps small
enough that tanh bends the values) and extra norms. dReLU is a Llama whose MLP applies ReLU to up as well,
marked "hidden_act": "drelu" in config.json."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import _randomise, make_tokenizer

FAMILIES = ("qwen2", "mistral", "phi3", "gemma", "gemma2", "drelu")
TEAL_FAMILIES = ("qwen2", "mistral", "phi3", "gemma", "gemma2")  # the SiLU / GELU ones
WINDOW = 8
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def _config(family: str):
    import transformers as tf

    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=WINDOW)
    if family == "phi3":
        return tf.Phi3Config(**COMMON)
    if family == "gemma":
        return tf.GemmaConfig(**COMMON, head_dim=16, hidden_act="gelu_pytorch_tanh")
    if family == "gemma2":
        return tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                               attn_logit_softcapping=1.5, final_logit_softcapping=4.0)
    if family == "drelu":
        return tf.LlamaConfig(**COMMON, hidden_act="relu")
    raise ValueError(family)


def _drelu_mlp(mlp):
    """The same projections computing down(relu(gate x) * relu(up x))."""
    import torch

    class DReLUMLP(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = inner.gate_proj, inner.up_proj, inner.down_proj

        def forward(self, x):
            return self.down_proj(torch.relu(self.gate_proj(x)) * torch.relu(self.up_proj(x)))

    return DReLUMLP(mlp)


def make_family(out: Path, family: str, seed: int = 0):
    """Save a tiny `family` checkpoint (weights, config.json, tokenizer, chat template) into out; returns the
    transformers model to run as the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager").eval()
    _randomise(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if family == "drelu":
        conf = json.loads((out / "config.json").read_text())
        conf["hidden_act"] = "drelu"
        (out / "config.json").write_text(json.dumps(conf))
        for layer in model.model.layers:
            layer.mlp = _drelu_mlp(layer.mlp)
    make_tokenizer(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>",
                                                           "eos_token": "</s>"}))
    return model
