"""Sparse decode with TEAL column skipping on the attention projections (q, k, v share an input; o), beside
the FFN predictor: the column kernel against numpy, the combined step against its batched twin, the byte
accounting against tensor sizes (7B-shaped), and calibration paths that move both kinds of knob."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edge_runtime
from edge_runtime.backends.cpu_dispatch import ColumnKernels
from edge_runtime.backends.room import OutOfRoomError, RoomWarning
from edge_runtime.backends.weights import ATTENTION, Layer, Linear, Norm, column_layout, linear_read_bytes
from edge_runtime.cli import main
from edge_runtime.devices.profile import load_profile
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.devices.sizes import model_bytes
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.evaluate import step_bytes
from edge_runtime.pack.quant import PackedTensor, quantize
from edge_runtime.sparsity.calibrate import (
    ATTN_GROUPS,
    attention_bytes,
    attention_teal,
    attention_thresholds,
    calibrate,
)
from edge_runtime.sparsity.calibration_files import write_calibration
from edge_runtime.sparsity.policy import Objective, select_knobs
from edge_runtime.sparsity.teal import calibrate_teal
from tests.helpers import CORPUS, packed_llama, rel_err


@pytest.mark.parametrize("enc", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_column_kernel_matches_numpy(enc, criterion):
    rng = np.random.default_rng(7)
    n, k = 72, 96
    t = quantize(rng.standard_normal((n, k)).astype(np.float32), enc)
    cols = ColumnKernels(t, threads=2)
    w = t.dequantize()
    bias = rng.standard_normal(n).astype(np.float32)
    # the criterion's channel factors: ones (TEAL) or positive weights like WINA's column norms
    scale = np.ones(k, np.float32) if criterion == "teal" else rng.uniform(0.2, 3.0, k).astype(np.float32)
    for thr in (0.0, 0.4, 1.0, 10.0):
        x = rng.standard_normal(k).astype(np.float32)
        keep = np.abs(x) * scale >= thr
        out = np.full(n, np.nan, np.float32)  # poisoned
        kept = cols.gemv(x, scale, np.float32(thr), out, bias=bias)
        ref = w @ np.where(keep, x, 0) + bias
        assert kept == int(keep.sum())
        assert rel_err(out, ref) < 1e-5  # the reference multiplies the same stored values


def test_column_layout_is_the_transposed_tensor():
    """The bytes a column-skipping product reads with every channel kept are W^T's stored bytes."""
    rng = np.random.default_rng(1)
    for enc in ("fp32", "fp16", "int8"):
        t = quantize(rng.standard_normal((40, 24)).astype(np.float32), enc)
        cols = ColumnKernels(t, threads=1)
        stored = cols.wt.nbytes + (2 * t.shape[0] if enc == "int8" else 0)  # int8 keeps its fp16 row scales
        assert linear_read_bytes(t, kept=t.shape[1]) == stored + 4  # and one fp32 threshold
        assert linear_read_bytes(t, kept=None) == t.nbytes
    assert column_layout(quantize(rng.standard_normal((8, 64)).astype(np.float32), "int4")) is None


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    pytest.importorskip("torch")
    return packed_llama(tmp_path_factory.mktemp("attn_teal"), act="relu", seed=52)


def _teal(rt, level: float, criterion: str = "teal"):
    """Thresholds at a quantile of the criterion's scores of the dense model's attention inputs on the corpus:
    |x|, shared by q, k, v (TEAL), or |x| * each projection's column norms (WINA)."""
    dec = rt.decoder
    seen = {"attn_in": [], "attn_out": []}
    dec.observer = lambda i, p, a: seen[p].append((i, a)) if p in seen else None
    dec.reset()
    dec.forward(rt.encode(CORPUS)[:60])
    dec.observer = None
    out = []
    for i in range(rt.config.n_layers):
        xin = np.concatenate([a for j, a in seen["attn_in"] if j == i])
        xo = np.concatenate([a for j, a in seen["attn_out"] if j == i])
        layer = rt.backend.weights.layers[i]
        out.append({p: float(np.quantile(_score(layer, p, xo if p == "o" else xin, criterion), level))
                    for p in ATTENTION})
    return out


def _score(layer, p: str, x: np.ndarray, criterion: str) -> np.ndarray:
    return np.abs(x) * (layer.column_norm(p) if criterion == "wina" else 1.0)


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_combined_step_equals_batched_and_counts_bytes(relu_model, criterion):
    rt = edge_runtime.load(relu_model, profile=None, backend="cpu")
    dec = rt.decoder
    ids = np.random.default_rng(4).integers(3, 300, size=30).tolist()
    rt.set_sparsity([1.05, 0.95])
    dec.reset()
    ffn_only = np.concatenate([dec.forward([t]) for t in ids])
    dec.teal = [{p: 0.0 for p in ATTENTION}] * 2  # thresholds of 0: today's sparse mode exactly
    dec.reset()
    assert np.array_equal(np.concatenate([dec.forward([t]) for t in ids]), ffn_only)
    s = dec.stats.summary()
    assert s["attn_bytes_fraction"] == 1.0

    teal = _teal(rt, 0.4, criterion)
    dec.set_teal(teal, criterion)
    assert dec.mode == "sparse" and dec.teal_criterion == criterion
    dec.reset()
    batched = dec.forward(ids, batched_sparse=True)
    # the inputs of q/k/v and o the steps see, to count the kept channels with numpy
    seen = {}
    points = ("attn_in", "attn_out")
    dec.observer = lambda i, p, a: seen.setdefault((i, p), []).append(a.copy()) if p in points else None
    dec.reset()
    dec.forward(ids, batched_sparse=True)
    dec.observer = None
    dec.reset()
    steps = np.concatenate([dec.forward([t]) for t in ids])
    assert rel_err(steps, batched) < 1e-4
    assert rel_err(steps, ffn_only) > 1e-3  # the thresholds changed the function
    stats = dec.stats
    for i, layer in enumerate(rt.backend.weights.layers):
        xin, xo = np.concatenate(seen[(i, "attn_in")]), np.concatenate(seen[(i, "attn_out")])
        kept = {p: float((_score(layer, p, xo if p == "o" else xin, criterion) >= teal[i][p]).sum())
                for p in ATTENTION}
        if criterion == "wina":  # the column norms differ: q, k and v keep different channels of one input
            masks = [_score(layer, p, xin, criterion) >= teal[i][p] for p in ("q", "k", "v")]
            assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])
        expect = sum(len(ids) * 4 + kept[p] * getattr(layer, p).w.shape[0]  # int8: one byte a weight, scales
                     + len(ids) * 2 * getattr(layer, p).w.shape[0] for p in ATTENTION)
        assert abs(int(stats.attn_bytes_read[i]) - expect) <= 4 * 192  # a channel at a threshold may flip
        assert int(stats.attn_bytes_dense[i]) == len(ids) * layer.attn_dense_bytes()
    s = stats.summary()
    assert s["attn_bytes_fraction"] < 0.75
    head = rt.backend.weights.lm_head.nbytes
    b = step_bytes(s, head)
    layer_dense = sum(L.attn_dense_bytes() + L.ffn_dense_bytes() for L in rt.backend.weights.layers)
    assert b["layer_bytes_fraction"] == pytest.approx(b["layer_bytes_per_token"] / layer_dense)
    assert b["step_bytes_fraction"] == pytest.approx((b["layer_bytes_per_token"] + head) / (layer_dense + head))


def _broadcast(shape, dtype):
    """A read-only array of `shape` that takes no memory but reports the full size (nbytes)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def _layer_7b(enc: str) -> tuple[Layer, object]:
    cfg = SHAPES["llama2-7b"]
    d, n, hq, hkv = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def mat(rows, cols):
        if enc == "int8":
            return PackedTensor("int8", (rows, cols), {"q": _broadcast((rows, cols), np.int8),
                                                       "scale": _broadcast((rows,), np.float16)})
        return PackedTensor("fp16", (rows, cols), {"w": _broadcast((rows, cols), np.float16)})

    norm = Norm(np.ones(d, np.float32), None, 1e-5)
    layer = Layer(attn_norm=norm, q=Linear(mat(hq, d), None), k=Linear(mat(hkv, d), None),
                  v=Linear(mat(hkv, d), None), o=Linear(mat(d, hq), None), ffn_norm=norm,
                  gate=Linear(mat(n, d), None), up=Linear(mat(n, d), None), down_t=mat(n, d), down_b=None,
                  gate_signs=_broadcast((n, -(-d // 32)), np.uint32))
    return layer, cfg


@pytest.mark.parametrize("enc", ["fp16", "int8"])
def test_byte_accounting_7b_shape(enc):
    """A 7B-shaped ReLU layer (tensors that report their size without memory): the bytes a step is charged
    are the tensor sizes numpy gives for that shape and encoding, dense and at TEAL levels."""
    layer, cfg = _layer_7b(enc)
    d, n = cfg.dim, cfg.ffn_dim
    sizes = model_bytes(cfg, enc)
    assert layer.attn_dense_bytes() * cfg.n_layers == sizes["attention"]
    assert layer.ffn_dense_bytes() * cfg.n_layers == sizes["ffn"]
    assert layer.gate_signs.nbytes * cfg.n_layers == sizes["sign_planes"]
    assert attention_bytes(layer, [0.0] * 4) == layer.attn_dense_bytes()
    # q, k, v at 50 %, o at 25 %: kept channels x one column of W (its N values), plus int8's N scales and
    # a threshold per projection, every column of W^T being K = d input channels (o: n_heads * head_dim)
    per = {"fp16": 2, "int8": 1}[enc]
    scales = 2 if enc == "int8" else 0
    expect = 0
    for p, kept in (("q", 0.5), ("k", 0.5), ("v", 0.5), ("o", 0.75)):
        rows, cols = getattr(layer, p).w.shape
        expect += kept * cols * rows * per + rows * scales + 4
    assert attention_bytes(layer, [0.5, 0.5, 0.5, 0.25]) == pytest.approx(expect)
    assert attention_bytes(layer, [0.5, 0.25], LEGACY_GROUPS) == pytest.approx(expect)  # one qkv level
    # each projection its own level: q at 50 % alone saves half of q's weight columns, nothing else
    rows, cols = layer.q.w.shape
    saved = layer.attn_dense_bytes() - attention_bytes(layer, [0.5, 0, 0, 0])
    assert saved == pytest.approx(0.5 * cols * rows * per - 4)
    # FFN: the sign plane, 10 % of gate rows computed, 5 % of up + down rows kept
    ffn = layer.ffn_read_bytes(1, 0.1 * n, 0.05 * n)
    row = d * per + scales
    assert ffn == pytest.approx(n * (-(-d // 32)) * 4 + 0.1 * n * row + 0.05 * n * 2 * row)


LEGACY_GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",)}  # calibrations written before q, k, v moved apart


def test_attention_teal_reads_the_sections_groups():
    """A path point's levels map to thresholds through the groups its calibration names: per projection now,
    q/k/v together in calibrations written before (their one threshold serves all three)."""
    th = {p: [0.0, 0.1 + j, 0.2 + j] for j, p in enumerate("qkvo")}
    now = {"levels": [0.0, 0.1, 0.2], "groups": {p: [p] for p in "qkvo"}, "thresholds": [th]}
    assert attention_teal(now, [[0.1, 0.0, 0.2, 0.1]]) == [{"q": 0.1, "v": 2.2, "o": 3.1}]
    assert attention_teal(now, [[0.0] * 4]) is None
    old = {"levels": [0.0, 0.1, 0.2], "groups": {g: list(ps) for g, ps in LEGACY_GROUPS.items()},
           "thresholds": [{"qkv": [0.0, 0.5, 0.7], "o": [0.0, 0.3, 0.4]}]}
    assert attention_teal(old, [[0.2, 0.1]]) == [{"q": 0.7, "k": 0.7, "v": 0.7, "o": 0.3}]
    assert attention_teal(old, [[0.0, 0.2]]) == [{"o": 0.4}]


def test_teal_copies_that_do_not_fit_change_nothing(relu_model, monkeypatch):
    """TEAL's transposed copies are built when a threshold is first set, beside weights the load plan counted:
    with less memory free than they need, the setting is refused and the decoder keeps its dense step."""
    rt = edge_runtime.load(relu_model, profile=None, backend="cpu")
    dec = rt.decoder
    ids = np.random.default_rng(7).integers(3, 300, size=12).tolist()
    teal = _teal(rt, 0.4)
    dec.reset()
    dense = np.concatenate([dec.forward([t]) for t in ids])
    weights = [getattr(layer, p).w for layer in rt.backend.weights.layers for p in ATTENTION]
    copies = sum(w.arrays["q"].nbytes for w in weights)  # int8 (K, N) each; the row scales are not copied
    monkeypatch.setattr("edge_runtime.backends.cpu.available_memory_bytes", lambda: copies)  # short of the headroom
    with pytest.raises(OutOfRoomError, match=rf"need {copies:,} bytes more memory but {copies:,} bytes is free"):
        dec.set_teal(teal)
    assert dec.teal is None and dec.mode == "dense" and not rt.backend.columns
    assert not rt.backend.state.teal.any()
    dec.reset()
    assert np.array_equal(np.concatenate([dec.forward([t]) for t in ids]), dense)
    # the same through the runtime (a fresh one: calibrating made copies), from a sparse setting: a refused
    # set_teal keeps the FFN predictor too
    calibration = {"teal": calibrate_teal(rt, [np.asarray(rt.encode(CORPUS)[:96])], targets=(0.4,),
                                          search_tokens=48, criteria=("teal",))}
    monkeypatch.setattr("edge_runtime.backends.cpu.available_memory_bytes", lambda: 1)
    with edge_runtime.load(relu_model, profile=None, backend="cpu") as fresh:
        fresh.calibration = calibration
        fresh.set_sparsity(1.0)
        with pytest.raises(OutOfRoomError):
            fresh.set_teal(0.4)
        assert fresh.decoder.mode == "sparse" and [r.alpha for r in fresh.decoder.rules] == [1.0, 1.0]
        assert fresh.decoder.teal is None and not fresh.backend.columns
    monkeypatch.setattr("edge_runtime.backends.cpu.available_memory_bytes", lambda: 2 * copies)
    dec.set_teal(teal)
    assert dec.mode == "teal" and len(rt.backend.columns) == len(ATTENTION) * rt.config.n_layers
    dec.reset()
    assert rel_err(np.concatenate([dec.forward([t]) for t in ids]), dense) > 1e-3
    rt.close()


def test_calibration_path_moves_both_and_policy_walks_it(relu_model, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m"
    shutil.copytree(relu_model, model)
    rt = edge_runtime.load(model, profile=None, backend="cpu")
    calib, thresholds = calibrate(rt, CORPUS * 3, source="corpus", window=64, max_tokens=256,
                                  predictors=("sparseinfer",), attention_levels=(0.0, 0.2, 0.4))
    write_calibration(model, calib, thresholds)
    sec = calib["predictors"]["sparseinfer"]
    path = sec["path"]
    # every move: one layer's knob one grid step, or one projection's (q, k, v, o) level one step; bytes only fall
    assert len(path) == 1 + rt.config.n_layers * (len(sec["grid"]) - 1 + len(ATTN_GROUPS) * 2)
    for a, b in zip(path, path[1:], strict=False):
        knob_moves = sum(x != y for x, y in zip(a["knobs"], b["knobs"], strict=True))
        attn_moves = sum(x != y for la, lb in zip(a["attention"], b["attention"], strict=True)
                         for x, y in zip(la, lb, strict=True))
        assert knob_moves + attn_moves == 1
        assert b["layer_bytes_fraction"] <= a["layer_bytes_fraction"]
    assert list(ATTN_GROUPS) == ["q", "k", "v", "o"] and sec["attention"]["groups"] == {p: [p] for p in "qkvo"}
    assert path[0]["attention"] == [[0.0] * 4] * rt.config.n_layers and path[0]["attn_bytes_fraction"] == 1.0
    assert any(any(lv) for p in path for lv in p["attention"])
    # a point's thresholds: each projection its own, the level-quantile of its input (q, k, v share theirs);
    # levels at 0 leave the projection dense (absent)
    ths = sec["attention"]["thresholds"]
    for mixed in path:
        teal = attention_teal(sec["attention"], mixed["attention"])
        if teal is None:
            assert not any(any(lv) for lv in mixed["attention"])
            continue
        for i, (lv, th) in enumerate(zip(mixed["attention"], teal, strict=True)):
            assert set(th) == {p for p, s in zip("qkvo", lv, strict=True) if s > 0}
            for p, s in zip("qkvo", lv, strict=True):
                if s > 0:
                    assert th[p] == ths[i][p][[0.0, 0.2, 0.4].index(s)] > 0
        for i in range(rt.config.n_layers):  # q, k, v read one input: equal levels, equal thresholds
            assert ths[i]["q"] == ths[i]["k"] == ths[i]["v"] and ths[i]["q"][2] > ths[i]["q"][1] > 0
    # the policy over a mixed path: a slower mode never gets a more conservative setting in any layer
    prof = load_profile("jetson-orin-nano-8gb")
    modes = sorted(prof.power_modes, key=lambda m: prof.effective_bandwidth(m.name))
    checked = 0
    for target in np.linspace(0.001, 50, 25):
        sels = [select_knobs(sec, "sparseinfer", rt.config, "int8", prof, m.name, Objective(latency_ms=float(target)))
                for m in modes]
        for slow, fast in zip(sels, sels[1:], strict=False):
            assert slow.path_index >= fast.path_index
            assert all(a <= b for a, b in zip(slow.knobs, fast.knobs, strict=True))
            assert all(x >= y for la, lb in zip(slow.attention, fast.attention, strict=True)
                       for x, y in zip(la, lb, strict=True))
            checked += 1
    assert checked > 20

    # eval --json at the cap of a generous budget (a speed target no point meets): the policy's point, both
    # kinds of knob in force, the whole step's bytes reported
    text = tmp_path / "t.txt"
    text.write_text(CORPUS)
    assert main(["eval", "--model", str(model), "--text", str(text), "--json", "--backend", "cpu", "--max-tokens", "64",
                 "--window", "32", "--profile", "jetson-orin-nano-8gb", "--latency-ms", "0.001",
                 "--quality-budget", "1000"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["knobs"] == path[-1]["knobs"]
    assert res["attn_bytes_fraction"] < 1 and res["layer_bytes_fraction"] < res["step_bytes_fraction"] < 1
    head = rt.backend.weights.lm_head.nbytes
    dense = sum(L.attn_dense_bytes() + L.ffn_dense_bytes() for L in rt.backend.weights.layers)
    assert res["lm_head_bytes_per_token"] == head
    assert res["layer_bytes_per_token"] == pytest.approx(res["layer_bytes_fraction"] * dense)
    assert res["step_bytes_fraction"] == pytest.approx((res["layer_bytes_per_token"] + head) / (dense + head))

    # the policy's point again, on a board whose free memory cannot take attention TEAL's weight copies: the
    # runtime loads with the FFN's knobs and dense attention, and says so
    monkeypatch.setattr("edge_runtime.backends.cpu.available_memory_bytes", lambda: 1)
    with pytest.warns(RoomWarning, match="attention TEAL is off"):
        low = edge_runtime.load(model, profile="jetson-orin-nano-8gb", backend="cpu",
                                objective=Objective(latency_ms=0.001, quality_budget_pct=1000))
    assert low.selection.knobs == path[-1]["knobs"] and any(any(lv) for lv in low.selection.attention)
    assert low.decoder.teal is None and low.decoder.mode == "sparse" and not low.backend.columns
    health = low.health_info()
    assert not health["attention_teal"] and "attention TEAL off" in health["selection"]["note"]
    assert [r.knob for r in low.decoder.rules] == path[-1]["knobs"]
    low.close()


class _Norms:
    """A layer stand-in with the column norms WINA reads."""

    def __init__(self, norms: dict[str, np.ndarray]):
        self.norms = norms

    def column_norm(self, p: str) -> np.ndarray:
        return self.norms[p]


def test_attention_thresholds_per_criterion():
    """TEAL: the level-quantile of |x|, one value for q, k and v; WINA: of |x| * each projection's column
    norms, so q, k, v get their own; a group of several projections has no single WINA score."""
    rng = np.random.default_rng(3)
    x, xo = rng.standard_normal((50, 16)), rng.standard_normal((50, 24))
    norms = {p: rng.uniform(0.1, 4.0, 24 if p == "o" else 16) for p in ATTENTION}
    inputs = {"attn_in": x, "attn_out": xo}
    teal = attention_thresholds(inputs, (0.0, 0.3), layer=_Norms(norms))
    assert teal["q"] == teal["k"] == teal["v"] == [0.0, pytest.approx(np.quantile(np.abs(x), 0.3))]
    wina = attention_thresholds(inputs, (0.0, 0.3), layer=_Norms(norms), criterion="wina")
    for p in ATTENTION:
        assert wina[p] == [0.0, pytest.approx(np.quantile(np.abs(xo if p == "o" else x) * norms[p], 0.3))]
    assert len({wina[p][1] for p in ("q", "k", "v")}) == 3
    with pytest.raises(EdgeRuntimeError, match="WINA"):
        attention_thresholds(inputs, (0.0, 0.3), LEGACY_GROUPS, layer=_Norms(norms), criterion="wina")


def test_wina_calibration_reaches_the_decoder(relu_model, tmp_path, capsys):
    """A calibration whose attention thresholds are WINA's records the criterion, and a policy selection on
    its path applies the thresholds with that criterion (plain |x| >= t would keep other channels)."""
    model = tmp_path / "m"
    shutil.copytree(relu_model, model)
    rt = edge_runtime.load(model, profile=None, backend="cpu")
    calib, thresholds = calibrate(rt, CORPUS * 3, source="corpus", window=64, max_tokens=256,
                                  predictors=("sparseinfer",), attention_levels=(0.0, 0.3),
                                  attention_criterion="wina")
    sec = calib["predictors"]["sparseinfer"]
    assert sec["attention"]["criterion"] == "wina"
    assert all(len({th[p][1] for p in ("q", "k", "v")}) == 3 for th in sec["attention"]["thresholds"])
    write_calibration(model, calib, thresholds)
    rt = edge_runtime.load(model, profile="jetson-orin-nano-8gb", backend="cpu",
                           objective=Objective(latency_ms=0.001, quality_budget_pct=1000))
    assert rt.selection is not None and rt.selection.attention == sec["path"][-1]["attention"]
    assert rt.follow_policy()
    assert rt.decoder.teal_criterion == "wina"
    assert rt.decoder.teal == attention_teal(sec["attention"], sec["path"][-1]["attention"])
    capsys.readouterr()
    assert main(["profile", "select", "--model", str(model), "--profile", "jetson-orin-nano-8gb",
                 "--latency-ms", "0.001", "--quality-budget", "1000"]) == 0
    shown = " ".join("[" + ", ".join(f"{a:g}" for a in lv) + "]" for lv in sec["path"][-1]["attention"])
    assert f"attention TEAL sparsity per layer [q, k, v, o] (wina): {shown}" in capsys.readouterr().out
    # an older calibration without the key is plain TEAL
    del sec["attention"]["criterion"]
    write_calibration(model, calib, thresholds)
    rt = edge_runtime.load(model, profile="jetson-orin-nano-8gb", backend="cpu",
                           objective=Objective(latency_ms=0.001, quality_budget_pct=1000))
    assert rt.follow_policy() and rt.decoder.teal_criterion == "teal" and rt.decoder.teal is not None
