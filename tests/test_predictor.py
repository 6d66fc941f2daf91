"""SparseInfer predictor semantics and the sparse FFN against the dense one (cpu backend)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.pack.convert import convert
from edge_runtime.pack.signbits import count_negative_products, pack_signs
from edge_runtime.runtime import load
from edge_runtime.sparsity.predictor import Rule, alpha_for_density, predict_active
from tests.helpers import make_llama, make_opt


@pytest.mark.parametrize("d", [32, 64, 100, 4096])
def test_popcount_equals_direct_count(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal(d).astype(np.float32)
    w = rng.standard_normal((37, d)).astype(np.float32)
    direct = ((x[None, :] * w) < 0).sum(axis=1)
    assert np.array_equal(count_negative_products(pack_signs(x), pack_signs(w)), direct)


def test_sign_plane_bit_layout():
    """bit j of word c is element 32c + j, LSB first."""
    m = np.ones((1, 64), dtype=np.float32)
    m[0, [0, 5, 33]] = -1.0
    words = pack_signs(m)
    assert words.dtype == np.uint32 and words.shape == (1, 2)
    assert words[0, 0] == (1 << 0) | (1 << 5) and words[0, 1] == 1 << 1


def test_larger_alpha_gives_superset():
    rng = np.random.default_rng(7)
    d = 256
    signs = pack_signs(rng.standard_normal((512, d)))
    for _ in range(5):
        x = rng.standard_normal(d).astype(np.float32)
        previous = None
        for alpha in (0.8, 0.95, 1.0, 1.05, 1.2, 1.5):
            active = predict_active(x, signs, alpha)
            if previous is not None:
                assert not (previous & ~active).any()
            previous = active
        assert active.sum() > predict_active(x, signs, 0.8).sum()


@pytest.mark.parametrize("d, n", [(64, 128), (256, 1000), (4096, 2000)])
def test_alpha_for_density_lets_through_the_smallest_ratios(d, n):
    """The rows let through are the ceil(density * n) of smallest N_neg / N_pos and the rows tying with the
    last of them, whether the predictor reads alpha as float64 or as the kernels' float32."""
    rng = np.random.default_rng(d + n)
    signs = pack_signs(rng.standard_normal((n, d)))
    x = rng.standard_normal(d).astype(np.float32)
    n_neg = count_negative_products(pack_signs(x), signs)
    ratio = np.sort(n_neg / (d - n_neg))
    for density in (1.0, 0.5, 0.25, 0.1, 0.05, 0.001):
        alpha = alpha_for_density(x, signs, density)
        want = int((ratio <= ratio[int(np.ceil(density * n)) - 1]).sum())
        assert predict_active(x, signs, alpha).sum() == want >= density * n
        assert predict_active(x, signs, float(np.float32(alpha))).sum() == want


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("relu")
    make_llama(root / "hf", act="relu", seed=3)
    convert(root / "hf", root / "packed", "fp32", progress=False)
    make_opt(root / "hf-opt", seed=4)
    convert(root / "hf-opt", root / "packed-opt", "fp32", progress=False)
    return root


def _sparse_step(be, i: int, x: np.ndarray, rule: Rule, recall: bool = False):
    """Layer i's FFN through the decode-step op with `rule` in the state: (y (1, d), that step's counters)."""
    be.set_knobs([rule] * be.config.n_layers, None, measure_recall=recall)
    be.reset_stats()
    y = np.zeros((1, be.config.dim), dtype=np.float32)
    be.ffn_step(i, x, be.weights.layers[i], y, "sparse")
    s = be.read_stats()
    return y, {f: int(getattr(s, f)[i]) for f in ("steps", "predicted", "kept", "true_active", "hits")}


@pytest.mark.parametrize("packed", ["packed", "packed-opt"])
def test_all_rows_predicted_active_equals_dense(relu_model, packed):
    rt = load(relu_model / packed, backend="cpu")
    be = rt.backend
    rng = np.random.default_rng(11)
    for i, layer in enumerate(be.weights.layers):
        x = rng.standard_normal((1, rt.config.dim)).astype(np.float32)
        y, counts = _sparse_step(be, i, x, Rule("sparseinfer", alpha=1e9))  # every row predicted active
        assert counts["steps"] == 1 and counts["predicted"] == rt.config.ffn_dim
        dense = be.ffn_down(be.ffn_parts(x, layer)[1], layer)
        assert np.abs(y - dense).max() <= 1e-5 * np.abs(dense).max()


def test_truly_active_predicted_rows_are_exact(relu_model):
    """On a ReLU model the sparse FFN equals the dense FFN restricted to the predicted rows."""
    rt = load(relu_model / "packed", backend="cpu")
    be = rt.backend
    rng = np.random.default_rng(5)
    for i, layer in enumerate(be.weights.layers):
        x = rng.standard_normal((1, rt.config.dim)).astype(np.float32)
        active = predict_active(x[0], layer.gate_signs, 1.0)
        assert 0 < active.sum() < rt.config.ffn_dim  # the test must exercise a real subset
        g = x[0] @ layer.gate.w.dequantize().T
        u = x[0] @ layer.up.w.dequantize().T
        h = np.where(active, np.maximum(g, 0) * u, 0.0)
        expected = h @ layer.down_t.dequantize()
        y, counts = _sparse_step(be, i, x, Rule("sparseinfer", alpha=1.0), recall=True)
        assert counts["predicted"] == active.sum()
        assert counts["kept"] == int((active & (g > 0)).sum())
        assert np.abs(y[0] - expected).max() <= 1e-5 * np.abs(expected).max()
        assert counts["true_active"] == int((g > 0).sum())
        assert counts["hits"] == int((active & (g > 0)).sum())


def test_decoder_statistics(relu_model):
    rt = load(relu_model / "packed", backend="cpu")
    rt.set_sparsity(1.0, measure_recall=True)
    res = rt.generate([1, 20, 30, 40], max_new_tokens=8)
    s = rt.ffn_stats()
    assert s["decode_steps"] == len(res.token_ids) - 1
    assert 0 < s["actual_density"] <= s["predicted_density"] <= 1
    assert 0 < s["ffn_bytes_fraction"] < 1
    assert 0 <= s["recall"] <= 1
    assert len(s["per_layer"]) == rt.config.n_layers
