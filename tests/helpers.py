"""Builders for tiny random Hugging Face checkpoints and tokenizers (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K-hf"
CORPUS = "the quick brown fox jumps over the lazy dog. a robot walks to the door and opens it. " * 20


def make_tokenizer(out: Path, vocab: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))


def _randomise(model, seed: int, std: float = 0.08) -> None:
    """Weights larger than the default init so that logits and activations are far from zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_llama(out: Path, act: str = "silu", n_kv_heads: int = 2, tie: bool = False, rope: dict | None = None,
               seed: int = 0, fatrelu_threshold: float = 0.05, bias: bool = False, with_tokenizer: bool = True):
    """A 2-layer Llama saved with save_pretrained; returns the torch model for reference runs.
    For fatrelu, HF has no such activation: the reference model gets FATReLU set as its act_fn and
    config.json says hidden_act fatrelu with hidden_act_param, as ProSparse checkpoints do."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=1024,
                      hidden_act="relu" if act == "fatrelu" else act, tie_word_embeddings=tie,
                      rope_scaling=rope, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    _randomise(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if act == "fatrelu":
        conf = json.loads((out / "config.json").read_text())
        conf.update(hidden_act="fatrelu", hidden_act_param=fatrelu_threshold)
        (out / "config.json").write_text(json.dumps(conf))
        for layer in model.model.layers:
            layer.mlp.act_fn = FATReLU(fatrelu_threshold)
    if with_tokenizer:
        make_tokenizer(out)
    return model


def packed_llama(root: Path, dtype: str = "int8", **kw) -> Path:
    """make_llama into root/hf, converted into root/p; returns root/p."""
    from edge_runtime.pack.convert import convert

    make_llama(root / "hf", **kw)
    convert(root / "hf", root / "p", dtype, progress=False)
    return root / "p"


def calibrated_llama(root: Path, calibration: dict, seed: int) -> Path:
    """packed_llama (relu) with `calibration` and a projection-thresholds file written by write_calibration, as
    calibrate would leave it (checksums recorded): for tests of the calibration files, not of calibration."""
    import numpy as np

    from edge_runtime.sparsity.calibration_files import write_calibration

    path = packed_llama(root, act="relu", seed=seed)
    write_calibration(path, calibration, {"layers.0.q": np.linspace(0.1, 0.9, 160, dtype=np.float32)})
    return path


def make_opt(out: Path, seed: int = 0, with_tokenizer: bool = True, tie: bool = True):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                    tie_word_embeddings=tie)
    model = OPTForCausalLM(cfg).eval()
    _randomise(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if with_tokenizer:
        make_tokenizer(out)
    return model


def _fatrelu_module():
    import torch

    class _FATReLU(torch.nn.Module):
        def __init__(self, threshold: float):
            super().__init__()
            self.threshold = threshold

        def forward(self, x):
            return torch.where(x >= self.threshold, x, torch.zeros_like(x))

    return _FATReLU


def FATReLU(threshold: float):
    return _fatrelu_module()(threshold)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: one number per comparison, scale-free."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def load_script(name: str):
    """scripts/<name>.py as a module (its main() not run), for tests that call main(argv)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
