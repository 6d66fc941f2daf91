"""Logits of converted checkpoints against Hugging Face transformers in fp32."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.pack.convert import convert
from edge_runtime.runtime import load
from tests.helpers import hf_logits, make_llama, make_opt, rel_err

pytest.importorskip("torch")
pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
VARIANTS = {
    "silu-gqa-untied": {"act": "silu"},
    "relu-gqa-tied": {"act": "relu", "tie": True},
    "fatrelu-mha": {"act": "fatrelu", "n_kv_heads": 4},
    "silu-llama3-rope": {"act": "silu", "rope": LLAMA3_ROPE},
    "relu-linear-rope-bias": {"act": "relu", "rope": {"rope_type": "linear", "factor": 2.0}, "bias": True},
}
# fp32: max |diff| / max |ref| <= 1e-4. Quantised storage against the fp32 original, as the relative
# L2 error of the logits. Rounding noise per weight, relative to the weights' spread, is about
# fp16 2^-11 / sqrt(3) ~ 3e-4, int8 (2.6 sigma / 127) / sqrt(12) ~ 6e-3, int4 (2.6 sigma / 7) / sqrt(12) ~ 0.1
# for Gaussian rows (2.6 sigma: a typical row or group maximum). These random, unstructured 2-layer models
# amplify it about 2-3x (measured: fp16 6e-4..9e-4, 2.5e-3 with FATReLU's jump at its threshold;
# int8 1.0e-2..1.9e-2; int4 0.18..0.35). The bounds sit above those with margin; that the arithmetic
# itself is exact is checked on dequantised weights in test_quantised_arithmetic_is_exact.
L2_BOUNDS = {"fp16": 5e-3, "int8": 4e-2, "int4": 0.5}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _ids(n: int = 24, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, size=n).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {name: (root / name, make_llama(root / name, **kw)) for name, kw in VARIANTS.items()}
    out["opt"] = (root / "opt", make_opt(root / "opt"))
    # an untied OPT fine-tune: its own lm_head (the embedding was used in its place)
    out["opt-untied"] = (root / "opt-untied", make_opt(root / "opt-untied", tie=False))
    return out


@pytest.mark.parametrize("variant", [*VARIANTS, "opt", "opt-untied"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_logits_match_transformers(checkpoints, tmp_path, variant, dtype):
    hf_dir, model = checkpoints[variant]
    convert(hf_dir, tmp_path / "packed", dtype, progress=False)
    rt = load(tmp_path / "packed", backend="cpu")
    ids = _ids()
    ref = hf_logits(model, ids)
    ours = rt.decoder.forward(ids)
    assert ours.shape == ref.shape
    if dtype == "fp32":
        assert rel_err(ours, ref) <= 1e-4
    else:
        assert rel_l2(ours, ref) <= L2_BOUNDS[dtype]


@pytest.mark.parametrize("variant", ["relu-gqa-tied", "opt", "fatrelu-mha"])
def test_decode_steps_match_prefill(checkpoints, tmp_path, variant):
    """Token-by-token decode through the KV cache gives the batched prefill's logits."""
    hf_dir, model = checkpoints[variant]
    convert(hf_dir, tmp_path / "packed", "fp32", progress=False)
    rt = load(tmp_path / "packed", backend="cpu")
    ids = _ids(16, seed=3)
    ref = hf_logits(model, ids)
    rt.decoder.reset()
    steps = np.concatenate([rt.decoder.forward(ids[:5])] + [rt.decoder.forward([t]) for t in ids[5:]])
    assert rel_err(steps, ref) <= 1e-4


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_quantised_arithmetic_is_exact(checkpoints, tmp_path, dtype):
    """The engine on quantised weights equals transformers run on the same weights dequantised."""
    import torch

    hf_dir, model = checkpoints["relu-gqa-tied"]
    convert(hf_dir, tmp_path / "packed", dtype, progress=False)
    rt = load(tmp_path / "packed", backend="cpu")
    sd = model.state_dict()
    for i, layer in enumerate(rt.backend.layers):
        pre = f"model.layers.{i}."
        for s in "qkvo":
            sd[f"{pre}self_attn.{s}_proj.weight"] = torch.from_numpy(getattr(layer, s).w.dequantize())
        sd[pre + "mlp.gate_proj.weight"] = torch.from_numpy(layer.gate.w.dequantize())
        sd[pre + "mlp.up_proj.weight"] = torch.from_numpy(layer.up.w.dequantize())
        sd[pre + "mlp.down_proj.weight"] = torch.from_numpy(np.ascontiguousarray(layer.down_t.dequantize().T))
        sd[pre + "input_layernorm.weight"] = torch.from_numpy(layer.attn_norm.w)
        sd[pre + "post_attention_layernorm.weight"] = torch.from_numpy(layer.ffn_norm.w)
    sd["model.embed_tokens.weight"] = torch.from_numpy(rt.backend.embed.dequantize())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sd["model.norm.weight"] = torch.from_numpy(rt.backend.final_norm.w)
    model_q = type(model)(model.config).eval()
    model_q.load_state_dict(sd)
    ids = _ids()
    assert rel_err(rt.decoder.forward(ids), hf_logits(model_q, ids)) <= 1e-4
