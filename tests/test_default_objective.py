"""The default objective: each profile's speed target and quality cap decide the per-layer setting in
every power mode (issue 15 bars), the predictor is chosen once per model, and the runtime reports it."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

import edge_runtime
from edge_runtime.devices.detect import mode_reader
from edge_runtime.devices.profile import DecodeTarget, ProfileError, list_profiles, load_profile, parse_profile
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.paths import DEFAULT_MODEL_DIR
from edge_runtime.scoring import windowed
from edge_runtime.sparsity.calibrate import perplexity
from edge_runtime.sparsity.policy import Objective, choose_predictor, select

BAR_PROFILES = ("jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "jetson-orin-nano-8gb-super")
PREDICTORS = ("sparseinfer", "projection", "auto")
HELDOUT = Path(__file__).resolve().parents[1] / "docs" / "heldout-alice.txt"

needs_default = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "calibration.yaml").is_file(),
                                   reason="no calibrated default model")


@pytest.fixture(scope="module")
def default_rt():
    rt = edge_runtime.load(None, profile=None, backend="cpu")
    yield rt
    rt.close()


def modes_fast_to_slow(prof):
    return sorted(prof.power_modes, key=lambda m: -prof.effective_bandwidth(m.name))


def layer_densities(section: dict, knobs: list[float]) -> list[tuple[float, float]]:
    """Per layer (predicted density, kept density) at those knobs: what its FFN bytes grow with."""
    grid = section["grid"]
    return [(t["table"][grid.index(k)]["predicted_density"], t["table"][grid.index(k)]["kept_density"])
            for t, k in zip(section["layers"], knobs, strict=True)]


def test_profiles_name_a_decode_target():
    for name in list_profiles():
        t = load_profile(name).decode_target
        assert t.hold_top_mode and t.tokens_per_s is None and t.quality_cap_pct == 1.0, name
    data = {"kind": "cpu", "name": "x", "memory_total_gb": 8, "default_power_mode": "d",
            "power_modes": [{"id": 0, "name": "d", "gpu_max_mhz": 1, "cpu_cores_online": 1, "cpu_max_mhz": 1,
                             "emc_max_mhz": 0, "memory_bandwidth_gbs": 10}],
            "performance": {"bandwidth_efficiency": 0.5, "launch_overhead_us": 1},
            "memory": {"reserve_gb": 1, "runtime_overhead_gb": 0.1}}
    assert parse_profile(data, "x.yaml").decode_target == DecodeTarget()  # optional: older profiles load
    floor = parse_profile({**data, "decode_target": {"tokens_per_s": 20, "quality_cap_pct": 2}}, "x.yaml")
    assert floor.decode_target == DecodeTarget(False, 20.0, 2.0)
    with pytest.raises(ProfileError, match="decode_target"):
        parse_profile({**data, "decode_target": {"tokens_per_s": 20, "hold_top_mode": True}}, "x.yaml")
    with pytest.raises(ProfileError, match="quality_cap_pct"):
        parse_profile({**data, "decode_target": {"quality_cap_pct": -1}}, "x.yaml")


@needs_default
@pytest.mark.parametrize("name", BAR_PROFILES)
def test_no_flags_slower_mode_never_reads_more_in_any_layer(default_rt, name):
    """Bar 1: with no flags, FFN bytes per token never increase as a mode's bandwidth decreases, in every
    layer, for both predictors and auto; the lowest mode reads strictly fewer than the top mode."""
    rt, prof = default_rt, load_profile(name)
    modes = modes_fast_to_slow(prof)
    for pred in PREDICTORS:
        sels = [select(rt.calibration, rt.config, "int8", prof, m.name, Objective(), pred) for m in modes]
        assert len({s.predictor for s in sels}) == 1  # auto picks one predictor for every mode
        section = rt.calibration["predictors"][sels[0].predictor]
        for fast, slow in zip(sels, sels[1:], strict=False):
            assert slow.ffn_bytes_fraction <= fast.ffn_bytes_fraction
            for (pf, kf), (ps, ks) in zip(layer_densities(section, fast.knobs), layer_densities(section, slow.knobs),
                                          strict=True):
                assert ps <= pf and ks <= kf, (name, pred, fast.power_mode, slow.power_mode)
        top, low = sels[0], sels[-1]
        assert low.ffn_bytes_fraction < top.ffn_bytes_fraction, (name, pred)
        # the top mode holds its own speed at the most conservative point; the lowest spends up to the cap
        assert top.met and top.path_index == 0 and top.note.startswith("most conservative")
        assert low.at_cap and not low.met and "running at the cap" in low.note


@needs_default
def test_7b_shape_default_objective_monotone(default_rt):
    """The same on a 7B-shaped config (planning-only path, no measured perplexity: the cap is unchecked
    and the note says so), where decode is bandwidth-bound rather than launch-bound."""
    from tests.test_policy import synthetic_7b_calibration

    calib, cfg = synthetic_7b_calibration(default_rt.calibration)
    for name in BAR_PROFILES:
        prof = load_profile(name)
        for pred in PREDICTORS:
            sels = [select(calib, cfg, "int4", prof, m.name, Objective(), pred) for m in modes_fast_to_slow(prof)]
            idx = [s.path_index for s in sels]
            assert idx == sorted(idx) and idx[0] == 0 and idx[-1] > 0, (name, pred, idx)
            assert "not measured" in sels[0].note


@needs_default
def test_heldout_perplexity_of_every_default_selection_within_cap(default_rt):
    """Bar 2 on the first 2,048 held-out tokens (batched masked passes, equal to the token-by-token
    decode that `eval` runs, tests/test_policy.py): every distinct default selection over the bar
    profiles' modes and predictors stays within the +1 % cap."""
    rt = default_rt
    distinct = {}
    for name in BAR_PROFILES:
        prof = load_profile(name)
        for m in prof.power_modes:
            for pred in PREDICTORS:
                s = select(rt.calibration, rt.config, "int8", prof, m.name, Objective(), pred)
                distinct.setdefault((s.predictor, s.path_index), s)
    assert len(distinct) >= 4  # both predictors, each at its top-mode point and at the cap
    wins = windowed(rt.encode(HELDOUT.read_text(encoding="utf-8")), 256, 2048)
    dense = perplexity(rt, wins, None)
    for key, sel in distinct.items():
        increase = 100 * (perplexity(rt, wins, rt.rules_for(sel)) / dense - 1)
        assert increase <= sel.quality_cap_pct, (key, increase)


@needs_default
def test_predictor_chosen_once_not_per_mode(default_rt):
    rt = default_rt
    chosen = choose_predictor(rt.calibration, 1.0)
    assert chosen == "projection"  # fewer FFN bytes at the cap on the default model (0.070 vs 0.082)
    live = edge_runtime.load(None, profile="jetson-orin-nano-8gb", power_mode="15W", backend="cpu")
    assert live.predictor == "auto" and live.predictor_in_use == chosen
    live.set_power_mode("7W")
    assert live.predictor_in_use == chosen and live.selection.predictor == chosen
    live.close()


def test_speed_flags_and_profile_floor():
    assert Objective.from_flags(tokens_per_s=20).latency_ms == pytest.approx(50.0)
    with pytest.raises(EdgeRuntimeError, match="not both"):
        Objective.from_flags(latency_ms=10, tokens_per_s=20)
    with pytest.raises(EdgeRuntimeError, match="> 0"):
        Objective.from_flags(tokens_per_s=0)
    prof = load_profile("jetson-orin-nano-8gb")
    floor = dataclasses.replace(prof, decode_target=DecodeTarget(False, 2000.0, 1.0))
    path = [{"knobs": [1.3], "ppl_increase_pct": 0.0, "ffn_bytes_fraction": 1.0},
            {"knobs": [1.0], "ppl_increase_pct": 0.4, "ffn_bytes_fraction": 0.5},
            {"knobs": [0.9], "ppl_increase_pct": 3.0, "ffn_bytes_fraction": 0.1}]
    cfg = dataclasses.replace(SHAPES["llama2-7b"], n_layers=1)
    sel = select({"predictors": {"sparseinfer": {"path": path}}}, cfg, "fp16", floor, "15W", Objective())
    assert sel.target_ms_per_token == pytest.approx(0.5) and "floor of 2000 tokens/s" in sel.target
    # one 7B-wide layer in fp16: about 0.3 GB/token dense, far from 2000 tokens/s: the cap (index 1), said so
    assert sel.path_index == 1 and sel.at_cap and not sel.met
    # --quality-budget replaces the cap; --tokens-per-s the target
    loose = select({"predictors": {"sparseinfer": {"path": path}}}, cfg, "fp16", floor, "15W",
                   Objective.from_flags(tokens_per_s=1e-3, quality_budget_pct=10))
    assert loose.path_index == 0 and loose.met and loose.quality_cap_pct == 10


@needs_default
def test_live_switch_top_to_lowest_changes_next_token_knobs(tmp_path):
    """Bar 3: a fake nvpmodel status file flips the Nano 8GB from 15W (top) to 7W (lowest): the watcher
    re-selects, the knobs in the backend's decode state change before the next token, nothing is
    reloaded, and health_info() shows the new selection."""
    from tests.test_profiles import fake_jetson

    root = fake_jetson(tmp_path / "board", "p3767-0003", "NVIDIA Jetson Orin Nano", mode_id=0)
    prof = load_profile("jetson-orin-nano-8gb")
    rt = edge_runtime.load(None, profile="jetson-orin-nano-8gb", power_mode="15W", backend="cpu")
    backend = rt.backend
    rt.watch_power_mode(mode_reader(prof, root), interval_s=0.02)
    rt.generate("Alice was", max_new_tokens=2)
    before = rt.health_info()
    assert before["power_mode"] == "15W" and before["selection"]["met"] and before["decode"] == "sparse"
    (root / "var/lib/nvpmodel/status").write_text("pmode:0001 fmode:default\n")  # 7W
    deadline = time.time() + 5
    while rt.power_mode != "7W":
        assert time.time() < deadline, "the watcher did not re-select"
        time.sleep(0.01)
    after = rt.health_info()
    assert json.loads(json.dumps(after)) == after  # /health serves it as JSON
    assert after["power_mode"] == "7W" and after["selection"]["power_mode"] == "7W"
    assert after["knobs"] == after["selection"]["knobs"] != before["knobs"]
    assert after["selection"]["ffn_bytes_fraction"] < before["selection"]["ffn_bytes_fraction"]
    assert not after["selection"]["met"] and "running at the cap" in after["selection"]["note"]
    # the next token reads these per-layer thresholds from the decode state
    grid = rt.calibration["predictors"]["projection"]["grid"]
    for i, q in enumerate(after["knobs"]):
        assert (rt.backend.state.theta[i] == rt.thresholds[f"layers.{i}.q{grid.index(q)}"]).all()
    res = rt.generate("Alice was", max_new_tokens=2)
    assert len(res.token_ids) == 2 and rt.backend is backend and rt.decoder.alphas == after["knobs"]
    rt.close()
