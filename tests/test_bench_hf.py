"""The transformers baseline of the GPU end-to-end benchmark holds the packed model's very weights: built on the
CPU in fp32 here, its logits equal the runtime's on fresh random weights, with layers shared as
random_llama(distinct_layers=...) shares them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_runtime.backends import create_backend
from edge_runtime.bench_hf_cuda import hf_llama
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.model.decoder import Decoder
from edge_runtime.pack.synthetic import random_llama

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

CFG = dataclasses.replace(SHAPES["llama2-7b"], dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                          vocab_size=200, n_layers=3, tie_embeddings=True)


def test_distinct_layers_repeat_the_first_layers_arrays():
    m = random_llama(CFG, "fp16", seed=3, distinct_layers=2)
    assert m.matrices["layers.2.ffn.gate"] is m.matrices["layers.0.ffn.gate"]
    assert m.sign_planes["layers.2.ffn.gate_signs"] is m.sign_planes["layers.0.ffn.gate_signs"]
    assert m.matrices["layers.1.attn.q"] is not m.matrices["layers.0.attn.q"]
    with pytest.raises(ValueError, match="distinct_layers"):
        random_llama(CFG, "fp16", distinct_layers=0)


@pytest.mark.parametrize("distinct", [None, 2])
def test_transformers_baseline_logits_equal_the_runtime(distinct):
    seed = 11 if distinct is None else 12
    model = random_llama(CFG, "fp32", seed=seed, distinct_layers=distinct)
    rng = np.random.default_rng(seed)
    for name, v in model.vectors.items():  # norms of ones would hide a norm given to the wrong place
        if name.endswith("norm.weight"):
            v[...] = 1 + 0.2 * rng.standard_normal(v.shape)
    ids = [int(t) for t in rng.integers(3, CFG.vocab_size, 9)]
    dec = Decoder(create_backend("cpu", model, max_context=16, threads=1))
    ours = dec.prefill(ids)  # (T, vocab) float32
    hf = hf_llama(torch, model, CFG, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours).max() > 0.1  # real logits, not a degenerate model
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 1e-4
    if distinct is not None:  # the shared layers are one tensor in torch too
        assert hf.model.layers[2].mlp.gate_proj.weight is hf.model.layers[0].mlp.gate_proj.weight
