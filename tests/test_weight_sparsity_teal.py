"""Weight pruning with the compressed row format, and TEAL magnitude activation sparsity."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.convert import convert
from edge_runtime.pack.quant import quantize
from edge_runtime.pack.sparse_weights import compress, prune_mask
from edge_runtime.sparsity.predictor import Rule
from edge_runtime.sparsity.teal import INPUT_OF, calibrate_teal, collect_inputs, thresholds_for
from edge_runtime.sparsity.wanda import input_norms
from tests.helpers import CORPUS, make_llama


def test_prune_mask_keeps_largest_per_row():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    m = prune_mask(w, 0.75)
    assert (m.sum(axis=1) == 16).all()
    for r in range(8):
        assert np.abs(w[r, m[r]]).min() >= np.abs(w[r, ~m[r]]).max()
    norms = np.ones(64, dtype=np.float32)
    norms[:8] = 1e6  # Wanda: channels with large activations win
    assert prune_mask(w, 0.75, norms)[:, :8].all()


@pytest.mark.parametrize("encoding", ["sparse-int8", "sparse-fp16"])
def test_compressed_gemv_equals_dense_of_same_values(encoding):
    """matvec and rows_weighted_sum read the segments; they equal the dense product of the same values."""
    from edge_runtime.pack.quant import PackedTensor

    rng = np.random.default_rng(1)
    w = rng.standard_normal((50, 96)).astype(np.float32)
    t = PackedTensor(encoding, w.shape, compress(w, prune_mask(w, 0.6), encoding))
    dense = t.dequantize()
    assert (dense == 0).mean() == pytest.approx(0.6, abs=0.02)
    x = rng.standard_normal(96).astype(np.float32)
    rows = np.array([3, 0, 17, 49, 20])
    assert np.allclose(t.matvec(x, rows), dense[rows] @ x, rtol=1e-5, atol=1e-6)
    h = rng.standard_normal(5).astype(np.float32)
    assert np.allclose(t.rows_weighted_sum(h, rows), h @ dense[rows], rtol=1e-5, atol=1e-6)
    pruned = np.where(prune_mask(w, 0.6), w, 0)  # kept values as the dense encoding of the pruned matrix
    ref = quantize(pruned, "int8").dequantize() if encoding == "sparse-int8" else pruned.astype(np.float16)
    assert np.array_equal(dense, ref.astype(np.float32))


def test_packed_size_at_half_sparsity_int8():
    """Bar: FFN/attention at 50 % weight sparsity with int8 values <= 0.33 x their fp16 size."""
    w = np.random.default_rng(2).standard_normal((1024, 1024)).astype(np.float32)
    packed = sum(a.nbytes for a in compress(w, prune_mask(w, 0.5), "sparse-int8").values())
    assert packed / (w.size * 2) <= 0.33


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("ws")
    make_llama(root / "hf", act="relu", seed=71)
    make_llama(root / "silu", act="silu", seed=72)
    return root


@pytest.mark.parametrize(("dtype", "prune"), [("int8", "magnitude"), ("int8", "wanda"), ("fp16", "magnitude")])
def test_weight_sparse_model_equals_decompressed_reference(models, tmp_path, dtype, prune):
    """Same values, same function: the compressed model's logits (decode on segments) equal a dense
    run over its own decompressed weights."""
    norms = input_norms(models / "hf", CORPUS) if prune == "wanda" else None
    convert(models / "hf", tmp_path / "ws", dtype, weight_sparsity=0.5, prune=prune, input_norms=norms,
            progress=False)
    rt = edge_runtime.load(tmp_path / "ws", profile=None, backend="cpu")
    assert rt.model.matrices["layers.0.ffn.up"].encoding == f"sparse-{dtype}"
    ids = rt.encode("the quick brown fox")
    rt.decoder.reset()
    steps = np.concatenate([rt.decoder.forward([t]) for t in ids])  # one token at a time: segment GEMVs
    rt.decoder.reset()
    batched = rt.decoder.forward(ids)  # prefill: dense over the decompressed rows
    assert np.abs(steps - batched).max() <= 1e-4 * np.abs(batched).max()
    rt.set_sparsity([Rule("sparseinfer", alpha=1e9)] * rt.config.n_layers)  # sparse path, every row
    rt.decoder.reset()
    sparse = np.concatenate([rt.decoder.forward([t]) for t in ids])
    assert np.abs(sparse - batched).max() <= 1e-4 * np.abs(batched).max()


HF_NAME = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
           "attn.o": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
           "ffn.down_t": "mlp.down_proj"}


def test_wanda_prunes_by_weight_times_input_norm(tmp_path):
    """Wanda against torch: every projection's input-channel norms over the calibration windows, taken with
    forward hooks on the transformers model, and the kept weights of the converted model: per output row the
    half with the largest |W| * norm (not the largest |W|, which magnitude pruning keeps)."""
    import torch

    from edge_runtime.model.tokenizer import Tokenizer

    seed = int(np.random.SeedSequence().entropy % 1000)
    print(f"seed {seed}")  # shown with a failure
    model = make_llama(tmp_path / "hf", act="relu", seed=seed)
    norms = input_norms(tmp_path / "hf", CORPUS, window=64)
    ids = Tokenizer(tmp_path / "hf" / "tokenizer.json").encode(CORPUS)[:2048]  # the ids input_norms reads
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, hf in HF_NAME.items():
            def pre(_mod, args, key=f"layers.{i}.{name}"):
                sq[key] = sq.get(key, 0) + (args[0][0].double() ** 2).sum(dim=0)
            hooks.append(layer.get_submodule(hf).register_forward_pre_hook(pre))
    with torch.no_grad():
        for s in range(0, len(ids), 64):
            model(torch.tensor([ids[s:s + 64]]))
    for h in hooks:
        h.remove()
    ref = {k: v.sqrt().numpy() for k, v in sq.items()}
    assert set(norms) == set(ref)
    for k in ref:  # the pass behind input_norms holds the weights as fp16
        assert np.abs(norms[k] - ref[k]).max() <= 2e-3 * ref[k].max(), k
    convert(tmp_path / "hf", tmp_path / "ws", "fp16", weight_sparsity=0.5, prune="wanda", input_norms=norms,
            progress=False)
    rt = edge_runtime.load(tmp_path / "ws", profile=None, backend="cpu")
    unlike = []
    for i, layer in enumerate(model.model.layers):
        for name, hf in HF_NAME.items():
            w = layer.get_submodule(hf).weight.detach().numpy()  # (N, K) HF orientation
            score = np.abs(w) * ref[f"layers.{i}.{name}"]
            want = score >= np.quantile(score, 0.5, axis=1, keepdims=True)
            stored = rt.model.matrices[f"layers.{i}.{name}"].dequantize()
            stored = stored.T if name == "ffn.down_t" else stored
            kept = stored != 0
            assert np.array_equal(stored[kept], w[kept].astype(np.float16).astype(np.float32)), (i, name)
            assert (kept == want).mean() >= 0.99, (i, name)  # a score at the median may fall either side
            magnitude = np.abs(w) >= np.quantile(np.abs(w), 0.5, axis=1, keepdims=True)
            unlike.append((kept != magnitude).mean())
    assert np.mean(unlike) > 0.03, unlike  # the norms moved the choice (one matrix alone may move only 4 %)
    rt.close()


def test_pruning_needs_fp16_or_int8_and_wanda_needs_text(models, tmp_path):
    with pytest.raises(EdgeRuntimeError, match="fp16 or int8"):
        convert(models / "hf", tmp_path / "a", "int4", weight_sparsity=0.5, progress=False)
    with pytest.raises(EdgeRuntimeError, match="calib-text"):
        convert(models / "hf", tmp_path / "b", "int8", weight_sparsity=0.5, prune="wanda", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_teal_on_silu_model(models, tmp_path):
    convert(models / "silu", tmp_path / "p", "fp32", progress=False)
    rt = edge_runtime.load(tmp_path / "p", profile=None, backend="cpu")
    ids = np.asarray(rt.encode(CORPUS)[:200])
    teal = calibrate_teal(rt, [ids[:100], ids[100:]], targets=(0.25, 0.5), search_tokens=100, criteria=("teal",))
    lo, hi = thresholds_for(teal, 0.25), thresholds_for(teal, 0.5)
    assert len(lo) == rt.config.n_layers and set(lo[0]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(hi[i][p] >= lo[i][p] for i in range(len(lo)) for p in lo[i])  # one greedy walk: monotone
    # the achieved sparsity on the calibration tokens: the byte-weighted share of skipped input channels
    inputs = collect_inputs(rt, [ids[:100], ids[100:]])
    for target, setting in ((0.25, lo), (0.5, hi)):
        for i, layer in enumerate(rt.backend.weights.layers):
            mats = {p: layer.projection(p) for p in setting[i]}
            skipped = {p: float((np.abs(inputs[i][INPUT_OF[p]]) < setting[i][p]).mean()) for p in mats}
            achieved = sum(skipped[p] * mats[p].nbytes for p in mats) / sum(m.nbytes for m in mats.values())
            assert target - 0.02 <= achieved <= target + 0.02, (target, i, achieved)  # the walk stops on the target
    rt.decoder.teal = hi
    rt.decoder.reset()
    batched = rt.decoder.forward(ids[:30], batched_sparse=True)
    rt.decoder.reset()
    steps = np.concatenate([rt.decoder.forward([int(t)]) for t in ids[:30]])
    assert np.abs(batched - steps).max() <= 1e-4 * np.abs(steps).max()
    rt.decoder.teal = None
    rt.decoder.reset()
    dense = rt.decoder.forward(ids[:30])
    assert np.abs(dense - steps).max() > 1e-3 * np.abs(dense).max()  # TEAL really changed the function
    with pytest.raises(EdgeRuntimeError, match="0.4"):
        thresholds_for(teal, 0.4)
