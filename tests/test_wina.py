"""WINA: TEAL's criterion weighted by the weight column norms (sparsity/wina.py), stored at conversion,
applied by the cpu backend, calibrated against plain TEAL."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import edge_runtime
from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.colnorms import COLNORM_NAME, column_norms, packed_column_norms
from edge_runtime.pack.convert import convert
from edge_runtime.pack.quant import quantize
from edge_runtime.sparsity.perplexity import perplexity
from edge_runtime.sparsity.teal import INPUT_OF, calibrate_teal, collect_inputs, criterion_of, thresholds_for
from edge_runtime.sparsity.wina import CRITERIA
from tests.helpers import CORPUS, make_llama

PROJ_HF = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int4"])
def test_packed_column_norms_equal_fp32_norms(encoding):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, 96)).astype(np.float32)  # (N, K), HF orientation
    ref = np.sqrt((w.astype(np.float64) ** 2).sum(axis=0))
    assert np.allclose(column_norms(w), ref, rtol=1e-6)
    tol = {"fp32": 1e-6, "fp16": 1e-3, "int8": 1e-2, "int4": 0.08}[encoding]
    assert np.allclose(packed_column_norms(quantize(w, encoding), transposed=False), ref, rtol=tol)
    # stored transposed (as ffn.down_t): the input channels are its rows
    assert np.allclose(packed_column_norms(quantize(np.ascontiguousarray(w.T), encoding), transposed=True), ref,
                       rtol=tol)


@pytest.fixture(scope="module")
def silu(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("wina")
    model = make_llama(root / "hf", act="silu", seed=81)
    convert(root / "hf", root / "p", "int8", progress=False)
    return root, model


def test_conversion_stores_column_norms_of_every_projection(silu):
    root, model = silu
    rt = edge_runtime.load(root / "p", profile=None, backend="cpu")
    sd = model.state_dict()
    for i, layer in enumerate(rt.backend.weights.layers):
        for p, hf in PROJ_HF.items():
            w = sd[f"model.layers.{i}.{hf}.weight"].numpy()
            stored = rt.model.vectors[f"layers.{i}.{COLNORM_NAME[p]}"]
            assert stored.dtype == np.float32 and np.allclose(stored, np.linalg.norm(w, axis=0), rtol=1e-5)
            assert layer.column_norm(p) is layer.colnorms[p]  # read from the pack, not recomputed


def test_pack_without_norms_computes_them_from_stored_weights(silu, tmp_path):
    """Packs converted before WINA load (the norms are optional) and compute the norms when asked."""
    import shutil

    root, _ = silu
    shutil.copytree(root / "p", tmp_path / "old")
    manifest = yaml.safe_load((tmp_path / "old" / "manifest.yaml").read_text())
    manifest["tensors"] = {n: t for n, t in manifest["tensors"].items() if not n.endswith("_colnorm")}
    (tmp_path / "old" / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    old = edge_runtime.load(tmp_path / "old", profile=None, backend="cpu")
    new = edge_runtime.load(root / "p", profile=None, backend="cpu")
    assert not old.backend.weights.layers[0].colnorms
    for p in PROJ_HF:  # from the int8 weights: within quantisation error of the fp32 norms
        assert np.allclose(old.backend.weights.layers[1].column_norm(p), new.backend.weights.layers[1].colnorms[p],
                           rtol=1e-2)


def test_column_norm_of_wrong_shape_is_refused(silu, tmp_path):
    import shutil

    root, _ = silu
    shutil.copytree(root / "p", tmp_path / "bad")
    path = tmp_path / "bad" / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["tensors"]["layers.0.attn.o_colnorm"]["shape"] = [5]
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(ModelFormatError, match="o_colnorm"):
        edge_runtime.load(tmp_path / "bad", profile=None, backend="cpu")


def test_wina_mask_equals_numpy_reference_and_decode_equals_batched(silu):
    root, _ = silu
    rt = edge_runtime.load(root / "p", profile=None, backend="cpu")
    rng = np.random.default_rng(5)
    layer = rt.backend.weights.layers[1]
    norms = layer.column_norm("q")
    x = rng.standard_normal((3, rt.config.dim)).astype(np.float32)
    score = np.abs(x) * norms
    t = float(np.quantile(score, 0.5))
    rt.decoder.set_teal([{}, {"q": t}], "wina")
    ref = np.where(score >= t, x, 0) @ layer.q.w.dequantize().T
    assert np.allclose(rt.backend.linear(x, layer.q, teal=(1, "q")), ref, rtol=1e-5, atol=1e-5)
    one = np.zeros((1, layer.q.w.shape[0]), np.float32)
    rt.backend.linear(x[:1], layer.q, out=one, teal=(1, "q"))  # the decode step's compiled mask and GEMV
    assert np.allclose(one[0], ref[0], rtol=1e-4, atol=1e-4)
    plain = np.where(np.abs(x) >= t, x, 0) @ layer.q.w.dequantize().T
    assert not np.allclose(ref, plain, rtol=1e-3, atol=1e-3)  # the weighting changed which channels run

    ids = np.asarray(rt.encode(CORPUS)[:40])
    inputs = collect_inputs(rt, [ids])
    setting = [{p: float(np.quantile(np.abs(inputs[i][INPUT_OF[p]]) * lay.column_norm(p), 0.4)) for p in PROJ_HF}
               for i, lay in enumerate(rt.backend.weights.layers)]
    rt.decoder.set_teal(setting, "wina")
    rt.decoder.reset()
    batched = rt.decoder.forward(ids[:24], batched_sparse=True)
    rt.decoder.reset()
    steps = np.concatenate([rt.decoder.forward([int(t)]) for t in ids[:24]])
    assert np.abs(batched - steps).max() <= 1e-4 * np.abs(steps).max()
    rt.decoder.set_teal(setting, "teal")  # the same thresholds read as plain TEAL: another function
    rt.decoder.reset()
    assert np.abs(rt.decoder.forward(ids[:24], batched_sparse=True) - batched).max() > 1e-3 * np.abs(steps).max()


def test_calibration_compares_both_criteria_and_runtime_applies_the_kept_one(silu, tmp_path):
    root, _ = silu
    rt = edge_runtime.load(root / "p", profile=None, backend="cpu")
    ids = np.asarray(rt.encode(CORPUS)[:200])
    fit, judge = [ids[:100]], [ids[100:]]
    teal = calibrate_teal(rt, fit, targets=(0.25,), search_tokens=50, judge=judge)
    assert set(teal["compared"]) == set(CRITERIA)
    ppl = {c: p["0.25"] for c, p in teal["compared"].items()}
    assert teal["criteria"] == {"0.25": min(ppl, key=ppl.get)}  # the one judged better on held-out windows
    # WINA's thresholds reach the byte-weighted target on the fitting tokens, measured by its own criterion
    wina = calibrate_teal(rt, fit, targets=(0.4,), search_tokens=50, criteria=("wina",))
    assert wina["criteria"] == {"0.4": "wina"}
    inputs = collect_inputs(rt, fit)
    setting = thresholds_for(wina, 0.4)
    for i, layer in enumerate(rt.backend.weights.layers):
        mats = {p: layer.projection(p) for p in setting[i]}
        skipped = {p: float((np.abs(inputs[i][INPUT_OF[p]]) * layer.column_norm(p) < setting[i][p]).mean())
                   for p in mats}
        achieved = sum(skipped[p] * mats[p].nbytes for p in mats) / sum(m.nbytes for m in mats.values())
        assert 0.38 <= achieved <= 0.42, (i, achieved)
    # the runtime takes the criterion with the thresholds
    rt.calibration = {"teal": wina}
    rt.set_teal(0.4)
    assert rt.decoder.teal_criterion == "wina" and criterion_of({"targets": {}}, 0.4) == "teal"
    assert np.array_equal(rt.backend.state.teal_scale[0, 0, :rt.config.dim],
                          rt.backend.weights.layers[0].column_norm("q"))
    # turning TEAL off returns to plain thresholds (a policy's attention thresholds are quantiles of |x|)
    rt.set_teal(None)
    assert rt.decoder.teal is None and rt.decoder.teal_criterion == "teal"
    # perplexity under WINA thresholds leaves the decoder's setting as it found it
    perplexity(rt, judge, None, teal=setting, criterion="wina")
    assert rt.decoder.teal is None and rt.decoder.teal_criterion == "teal"


def test_calibrating_teal_reports_progress_to_the_end(silu):
    """A SiLU model's calibration is TEAL alone (minutes on a real model): every greedy walk and perplexity
    ticks, so the counter reaches its total (it stayed at 0 of 0 for the whole run)."""
    from edge_runtime.sparsity.calibrate import calibrate

    root, _ = silu
    rt = edge_runtime.load(root / "p", profile=None, backend="cpu")
    calls = []
    calibrate(rt, CORPUS, window=64, max_tokens=256, teal_targets=(0.25, 0.4), attention_levels=(),
              progress=lambda done, total: calls.append((done, total)))
    total = rt.config.n_layers * len(CRITERIA) + 2 * len(CRITERIA) + 1
    assert [d for d, _ in calls] == list(range(1, total + 1)) and {t for _, t in calls} == {total}
