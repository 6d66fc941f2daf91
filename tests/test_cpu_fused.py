"""The fused cpu decode step (backends/cpu_fused.py) against the decoder's op-by-op step on the same backend:
greedy ids, every step's logits and the statistic counters, in dense mode and sparse mode with both predictors
and with attention thresholds, on one thread and with every product split over two, on the default model (int8)
and on tiny random models of the families whose step it covers (biases, windows, embedding scale, gelu_tanh,
dReLU). And where it must stand aside: TEAL mode, recall measurement, post norms."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.sparsity.predictor import Rule

STEPS = 24


def _run(rt, fused: bool, prompt: list[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Greedy decode of STEPS tokens after prompt: (ids, logits (STEPS, V), counters)."""
    be = rt.backend
    keep = be.fused
    if not fused:
        be.fused = None
    try:
        d = rt.decoder
        ids = [d.start(prompt, SamplingParams())]
        logits = []
        for _ in range(STEPS):
            ids.append(d.decode_step())
            logits.append(be.buffers.logits[0].copy())
        return ids, np.array(logits), be.state.counters.copy()
    finally:
        be.fused = keep


def _settings(rt, rng) -> list:
    """Dense, SparseInfer at two alphas, and projection thresholds around the median score."""
    n, f = rt.config.n_layers, rt.config.ffn_dim
    theta = rng.standard_normal(f).astype(np.float32) * 0.3
    return [None, [Rule("sparseinfer", alpha=1.0)] * n, [Rule("sparseinfer", alpha=1.3)] * n,
            [Rule("projection", theta=theta)] * n]


def _compare(rt, prompt, rng) -> None:
    assert rt.backend.fused is not None
    for setting in _settings(rt, rng):
        rt.decoder.set_sparsity(setting)
        fused_ids, fused_logits, fused_counts = _run(rt, True, prompt)
        ids, logits, counts = _run(rt, False, prompt)
        assert fused_ids == ids
        assert np.abs(fused_logits - logits).max() <= 1e-5 * np.abs(logits).max()
        assert np.array_equal(fused_counts, counts)
        if setting is not None:  # the sparse steps counted something, and skipped rows
            assert counts.any() and rt.ffn_stats()["ffn_bytes_fraction"] < 1


def test_default_model_fused_equals_op_by_op():
    rt = edge_runtime.load(None, profile=None, backend="cpu", threads=1)
    _compare(rt, rt.encode("Once upon a time"), np.random.default_rng(0))


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_attention_thresholds_beside_the_predictor_fused_equals_op_by_op(criterion):
    """Sparse mode with q, k, v, o input thresholds (column skipping over W^T), per projection."""
    rt = edge_runtime.load(None, profile=None, backend="cpu", threads=1)
    n = rt.config.n_layers
    levels = {"q": 0.02, "k": 0.03, "v": 0.01, "o": 0.05} if criterion == "teal" else {"q": 0.01, "o": 0.02}
    rt.decoder.set_teal([dict(levels) for _ in range(n - 1)] + [{}], criterion)  # the last layer dense
    rt.decoder.set_sparsity([Rule("sparseinfer", alpha=1.0)] * n)
    prompt = rt.encode("Once upon a time")
    fused_ids, fused_logits, fused_counts = _run(rt, True, prompt)
    ids, logits, counts = _run(rt, False, prompt)
    assert fused_ids == ids
    assert np.abs(fused_logits - logits).max() <= 1e-5 * np.abs(logits).max()
    assert np.array_equal(fused_counts, counts)
    stats = rt.ffn_stats()
    assert 0 < stats["attn_bytes_fraction"] < 1  # channels were skipped, and counted


def test_products_over_two_threads_fused_equals_op_by_op(monkeypatch):
    """Every matrix split over the threads (the parallel kernels called from the fused layer)."""
    import edge_runtime.backends.jit as jit

    monkeypatch.setattr(jit, "PARALLEL_MIN_BYTES", 0)
    rt = edge_runtime.load(None, profile=None, backend="cpu", threads=2)
    assert all(k.threads == 2 for k in rt.backend.kernels.values())
    _compare(rt, rt.encode("Once upon a time"), np.random.default_rng(2))
    n = rt.config.n_layers
    rt.decoder.set_teal([{"q": 0.02, "k": 0.03, "v": 0.01, "o": 0.05}] * n)
    rt.decoder.set_sparsity([Rule("sparseinfer", alpha=1.0)] * n)
    fused = _run(rt, True, rt.encode("Once upon a time"))
    ref = _run(rt, False, rt.encode("Once upon a time"))
    assert fused[0] == ref[0] and np.abs(fused[1] - ref[1]).max() <= 1e-5 * np.abs(ref[1]).max()
    assert np.array_equal(fused[2], ref[2])


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edge_runtime.pack.convert import convert
    from tests.families import make_family

    root = tmp_path_factory.mktemp("fused")
    out = {}
    for fam, dtype in (("qwen2", "fp16"), ("mistral", "int8"), ("gemma", "fp32"), ("drelu", "int8"),
                       ("gemma2", "fp32")):
        make_family(root / fam / "hf", fam)
        convert(root / fam / "hf", root / fam / "p", dtype, progress=False)
        out[fam] = root / fam / "p"
    return out


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "drelu"])
def test_family_fused_equals_op_by_op(families, family):
    rt = edge_runtime.load(families[family], profile=None, backend="cpu", threads=1)
    prompt = np.random.default_rng(3).integers(3, 300, size=12).tolist()  # past mistral's 8-token window
    rng = np.random.default_rng(1)
    assert rt.backend.fused is not None  # else both runs below would be op-by-op
    if rt.config.relu_family:
        _compare(rt, prompt, rng)
    else:  # SiLU / GELU: dense only
        fused_ids, fused_logits, _ = _run(rt, True, prompt)
        ids, logits, _ = _run(rt, False, prompt)
        assert fused_ids == ids and np.abs(fused_logits - logits).max() <= 1e-5 * np.abs(logits).max()


def test_fused_step_stands_aside_where_it_does_not_cover(families):
    rt = edge_runtime.load(None, profile=None, backend="cpu", threads=1)
    f = rt.backend.fused
    assert f.covers("dense") and not f.covers("teal")
    rt.decoder.set_sparsity(1.0)
    assert f.covers("sparse")
    rt.decoder.set_teal([{"q": 0.05}] * rt.config.n_layers)  # attention column skipping beside the predictor
    assert f.covers("sparse") and not f.covers("teal")
    rt.decoder.set_teal(None)
    rt.decoder.set_sparsity(1.0, measure_recall=True)
    assert not f.covers("sparse")
    assert edge_runtime.load(families["gemma2"], profile=None, backend="cpu", threads=1).backend.fused is None


@pytest.mark.parametrize("ids", [[4096], [-1], [5, 9, 4096, 7]])
def test_token_ids_outside_the_vocabulary_are_refused_before_any_step(ids):
    """The fused step reads embedding row `id` unchecked, so the decoder checks ids first (one token runs as a
    decode step, several as a batch)."""
    from edge_runtime.errors import EdgeRuntimeError
    rt = edge_runtime.load(None, profile=None, backend="cpu", threads=1)
    assert rt.config.vocab_size == 4096
    rt.decoder.start(rt.encode("Once upon a time"), SamplingParams())
    pos = rt.decoder.pos
    with pytest.raises(EdgeRuntimeError, match="outside the vocabulary"):
        rt.decoder.forward(ids)
    assert rt.decoder.pos == pos  # nothing ran


def test_address_table_refuses_arrays_it_would_misread():
    """The table reinterprets each slot's bytes as one dtype and rank: anything else is an error at bind, not a
    silent misread; non-contiguous arrays are copied (and kept alive) rather than read with the wrong strides."""
    from edge_runtime.backends.cpu_fused import ATTN_NORM, SIGNS, WQ, FusedStep
    rt = edge_runtime.load(None, profile=None, backend="cpu", threads=1)
    f = rt.backend.fused
    arrays = f._layer_arrays(0)
    assert [a.ctypes.data for a in f._slot_arrays(arrays, arrays)] == [a.ctypes.data for a in arrays]  # no copies
    for slot, wrong in [(ATTN_NORM, arrays[ATTN_NORM].astype(np.float16)), (SIGNS, arrays[SIGNS].view(np.int32)),
                        (WQ, arrays[WQ].astype(np.float32)), (ATTN_NORM, arrays[ATTN_NORM][None, :])]:
        bad = list(arrays)
        bad[slot] = wrong
        with pytest.raises(ValueError, match=f"slot {slot}"):
            FusedStep._slot_arrays(bad, arrays)
    strided = list(arrays)
    strided[ATTN_NORM] = np.repeat(arrays[ATTN_NORM], 2)[::2]
    got = FusedStep._slot_arrays(strided, arrays)[ATTN_NORM]
    assert got.flags.c_contiguous and np.array_equal(got, arrays[ATTN_NORM])
