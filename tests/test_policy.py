"""Calibration, the per-layer alpha policy, and live re-selection on a power-mode change."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest

import edge_runtime
from edge_runtime.devices.profile import list_profiles, load_profile
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.devices.sizes import DEFAULT_KV_TOKENS, decode_bytes_per_token
from edge_runtime.paths import DEFAULT_MODEL_DIR
from edge_runtime.sparsity.calibrate import calibrate, greedy_path
from edge_runtime.sparsity.calibration_files import read_calibration, write_calibration
from edge_runtime.sparsity.policy import Objective, projected_ms, select, select_knobs
from tests.helpers import CORPUS, packed_llama

TEXT = CORPUS * 3


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    pytest.importorskip("torch")
    path = packed_llama(tmp_path_factory.mktemp("calib"), act="relu", seed=51)
    rt = edge_runtime.load(path, profile=None, backend="cpu")
    calib, thresholds = calibrate(rt, TEXT, source="corpus", window=64, max_tokens=256)
    write_calibration(path, calib, thresholds)
    return path, calib


def test_calibration_file_roundtrip(calibrated):
    path, calib = calibrated
    again, thresholds = read_calibration(path)
    assert set(again["predictors"]) == {"sparseinfer", "projection"}
    for name, sec in again["predictors"].items():
        assert sec["grid"] == calib["predictors"][name]["grid"] and len(sec["layers"]) == 2
        for layer in sec["layers"]:
            dens = [r["predicted_density"] for r in layer["table"]]
            assert dens == sorted(dens)  # later grid entries are more conservative: more rows
            assert all(0 <= r["recall"] <= 1 and r["kept_density"] <= r["predicted_density"] for r in layer["table"])
        fr = [p["ffn_bytes_fraction"] for p in sec["path"]]
        assert fr == sorted(fr, reverse=True)  # the path only ever reads less
    assert len(thresholds) == 2 * len(calib["predictors"]["projection"]["grid"])


def test_batched_sparse_equals_token_by_token_decode(calibrated):
    """The calibration's fast masked forward computes what sparse decode computes."""
    path, _ = calibrated
    rt = edge_runtime.load(path, profile=None, backend="cpu")
    # random ids, not the calibration text: its z values sit exactly on the calibrated thresholds
    ids = np.random.default_rng(3).integers(3, 300, size=40).tolist()
    rt.set_sparsity([1.05, 0.95])
    check_batched_equals_steps(rt, ids)
    sel = select(rt.calibration, rt.config, "int8", load_profile("cpu-generic"), None,
                 Objective(quality_budget_pct=5), "projection")
    rt.set_sparsity(rt.rules_for(sel))
    check_batched_equals_steps(rt, ids)


def check_batched_equals_steps(rt, ids):
    rt.decoder.reset()
    batched = rt.decoder.forward(ids, batched_sparse=True)
    rt.decoder.reset()
    steps = np.concatenate([rt.decoder.forward([t]) for t in ids])
    assert np.abs(batched - steps).max() <= 1e-4 * np.abs(steps).max()


def _check_monotone(calib, cfg, encoding):
    """For every profile and latency target: a lower-bandwidth mode never gets a larger alpha."""
    checked = 0
    for name in list_profiles():
        prof = load_profile(name)
        modes = sorted(prof.power_modes, key=lambda m: prof.effective_bandwidth(m.name))
        # the same bytes never take less time in a lower-bandwidth mode
        times = [projected_ms(prof, m.name, cfg, 1e9) for m in modes]
        assert all(a >= b for a, b in zip(times, times[1:], strict=False)), name
        lo = projected_ms(prof, modes[-1].name, cfg, decode_bytes_per_token(cfg, encoding, 0.0))
        hi = projected_ms(prof, modes[0].name, cfg, decode_bytes_per_token(cfg, encoding, 1.0))
        for target in np.linspace(lo * 0.9, hi * 1.1, 12):
            for pred, sec in calib["predictors"].items():
                sels = [select_knobs(sec, pred, cfg, encoding, prof, m.name, Objective(latency_ms=float(target)))
                        for m in modes]
                # alpha grows with conservativeness; q shrinks with it
                sign = 1 if pred == "sparseinfer" else -1
                for slow, fast in zip(sels, sels[1:], strict=False):
                    pairs = zip(slow.knobs, fast.knobs, strict=True)
                    assert all(sign * a <= sign * b for a, b in pairs), (name, target)
                    checked += 1
    return checked


def test_monotone_over_every_mode_small_model(calibrated):
    path, calib = calibrated
    rt = edge_runtime.load(path, profile=None, backend="cpu")
    assert _check_monotone(calib, rt.config, "int8") > 50


def synthetic_7b_calibration(calib):
    """The small model's per-layer tables cycled over 32 layers (a 7B-shaped config has no weights
    here, so nothing can be measured): a latency-only calibration for the policy."""
    cfg = SHAPES["llama2-7b"]
    sections = {name: _synthetic_section(sec, cfg) for name, sec in calib["predictors"].items()}
    return {"predictors": sections}, cfg


def _synthetic_section(sec, cfg):
    tables = [copy.deepcopy(sec["layers"][i % len(sec["layers"])]) for i in range(cfg.n_layers)]
    n, d = cfg.ffn_dim, cfg.dim
    row_bytes = 2 * d  # fp16

    def bytes_of(i, row):
        return n * d / 8 + row["predicted_density"] * n * row_bytes + row["kept_density"] * n * 2 * row_bytes

    grid = sec["grid"]
    dense = 3 * n * row_bytes
    path = [{"knobs": [grid[k] for k in idx], "ppl_increase_pct": None,
             "ffn_bytes_fraction": sum(bytes_of(i, tables[i]["table"][k]) for i, k in enumerate(idx)) / (32 * dense)}
            for idx in greedy_path(tables, bytes_of)]
    return {"grid": grid, "layers": tables, "path": path}


def test_monotone_over_every_mode_7b_shape(calibrated):
    calib, cfg = synthetic_7b_calibration(calibrated[1])
    assert _check_monotone(calib, cfg, "fp16") > 50


def test_quality_budget_uses_measured_points(calibrated):
    path, calib = calibrated
    rt = edge_runtime.load(path, profile="cpu-generic", backend="cpu",
                           objective=Objective(quality_budget_pct=2.0))
    sel = rt.selection
    assert sel is not None and sel.expected_ppl_increase_pct <= 2.0
    assert rt.decoder.alphas == sel.knobs
    tighter = select(calib, rt.config, "int8", rt.profile, None, Objective(quality_budget_pct=0.0), sel.predictor)
    assert tighter.ffn_bytes_fraction >= sel.ffn_bytes_fraction


def _target_between_25w_and_15w(path, calib, prof):
    """A latency target between the two modes' times at the most conservative setting: 25W meets it as is,
    15W needs more sparsity."""
    from edge_runtime.devices.sizes import decode_bytes_per_token

    probe = edge_runtime.load(path, profile=None, backend="cpu")
    cfg, kv = probe.config, min(DEFAULT_KV_TOKENS, probe.decoder.max_context)  # the runtime plans with this KV length
    path0 = calib["predictors"]["sparseinfer"]["path"][0]
    bytes0 = decode_bytes_per_token(cfg, "int8", path0["ffn_bytes_fraction"], kv)
    return (projected_ms(prof, "25W", cfg, bytes0) + projected_ms(prof, "15W", cfg, bytes0)) / 2


def test_live_power_mode_change_between_tokens(calibrated, tmp_path):
    """A fake nvpmodel status file flips from 25W to 15W mid-session: the watcher re-selects, the next
    tokens decode with the new alphas, and nothing is reloaded."""
    path, calib = calibrated
    prof = load_profile("jetson-orin-nano-8gb-super")
    target = _target_between_25w_and_15w(path, calib, prof)
    rt = edge_runtime.load(path, profile=str(load_profile_path("jetson-orin-nano-8gb-super")), backend="cpu",
                           power_mode="25W", objective=Objective(latency_ms=target), predictor="sparseinfer")
    before = list(rt.selection.knobs)
    backend = rt.backend
    status = tmp_path / "status"
    status.write_text("pmode:0001\n")
    names = {m.id: m.name for m in prof.power_modes}
    rt.watch_power_mode(lambda: names[int(status.read_text().split(":")[1])], interval_s=0.02)
    rt.generate("the quick", max_new_tokens=3)
    status.write_text("pmode:0000\n")  # 15W: EMC capped at 2133 MHz, a third less bandwidth
    deadline = time.time() + 5
    while rt.power_mode != "15W":
        assert time.time() < deadline
        time.sleep(0.01)
    after = rt.selection.knobs
    assert all(a <= b for a, b in zip(after, before, strict=True)) and after != before
    assert rt.decoder.alphas == after and rt.backend is backend
    rt.close()


def test_unknown_power_mode_keeps_watching(calibrated):
    """A custom nvpmodel mode the profile lacks is warned about and leaves the selection alone; the watcher
    lives on and re-selects when the board returns to a known mode (it used to die on the first unknown one)."""
    from edge_runtime.devices.power import PowerModeWarning

    path, calib = calibrated
    target = _target_between_25w_and_15w(path, calib, load_profile("jetson-orin-nano-8gb-super"))
    rt = edge_runtime.load(path, profile=str(load_profile_path("jetson-orin-nano-8gb-super")), backend="cpu",
                           power_mode="25W", objective=Objective(latency_ms=target), predictor="sparseinfer",
                           warm_up=False)
    knobs_25w = list(rt.selection.knobs)
    board = {"mode": "25W"}
    rt.watch_power_mode(lambda: board["mode"], interval_s=0.02)

    def wait_for(mode):
        deadline = time.time() + 5
        while rt.power_mode != mode:
            assert time.time() < deadline
            time.sleep(0.01)

    board["mode"] = "15W"
    wait_for("15W")
    knobs_15w = list(rt.selection.knobs)
    assert knobs_15w != knobs_25w
    rt.stop_watching()
    rt.set_power_mode("25W")
    rt.watch_power_mode(lambda: board["mode"], interval_s=0.02)  # the board is in 15W, the runtime set to 25W
    assert rt.power_mode == "15W" and list(rt.selection.knobs) == knobs_15w  # the first reading is acted on at once
    with pytest.warns(PowerModeWarning, match="MODE_CUSTOM"):
        board["mode"] = "MODE_CUSTOM"
        deadline = time.time() + 5
        while rt._watcher.current != "MODE_CUSTOM":
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
    assert rt.power_mode == "15W" and list(rt.selection.knobs) == knobs_15w
    board["mode"] = "25W"
    wait_for("25W")
    assert list(rt.selection.knobs) == knobs_25w and rt._watcher._thread.is_alive()
    rt.close()


def test_load_on_a_board_in_a_mode_the_profile_lacks(monkeypatch):
    """A vendor's or the user's own nvpmodel mode: load(profile="auto") refused to start (ProfileError) where
    the watcher only warns. It now warns and selects for the profile's default mode; a mode the caller names
    that the profile lacks is still refused."""
    import edge_runtime.devices.detect as detect_module
    from edge_runtime.devices.detect import Detection
    from edge_runtime.devices.power import PowerModeWarning
    from edge_runtime.devices.profile import ProfileError

    profile = load_profile("jetson-orin-nano-8gb-super")
    monkeypatch.setattr(detect_module, "detect", lambda: Detection(profile.name, "CUSTOM_12W", "device tree", {}))
    with pytest.warns(PowerModeWarning, match=f"'CUSTOM_12W', which profile {profile.name} does not describe"):
        rt = edge_runtime.load(profile="auto", backend="cpu", warm_up=False)
    try:
        assert (rt.profile.name, rt.power_mode) == (profile.name, profile.default_power_mode)
        assert rt.selection is not None and len(rt.generate("the lazy dog", max_new_tokens=4).token_ids) == 4
    finally:
        rt.close()
    with pytest.raises(ProfileError, match="has no power mode 'CUSTOM_12W'"):
        edge_runtime.load(profile="auto", backend="cpu", power_mode="CUSTOM_12W", warm_up=False)


def test_watcher_outlives_warnings_turned_into_errors(capsys):
    """Under -W error (an application's test suite) the PowerModeWarning raised inside the watcher's thread and
    ended it; the message goes to stderr instead and the next mode is still acted on."""
    import warnings

    from edge_runtime.devices.power import PowerModeWatcher

    board, seen = {"mode": "15W"}, []

    def on_change(mode):
        if mode == "MODE_CUSTOM":
            raise ValueError("no such mode in the profile")
        seen.append(mode)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watcher = PowerModeWatcher(lambda: board["mode"], on_change, interval_s=0.01).start()
        for mode in ("MODE_CUSTOM", "7W"):
            board["mode"] = mode
            deadline = time.time() + 5
            while watcher.current != mode or (mode == "7W" and not seen):
                assert time.time() < deadline
                time.sleep(0.01)
        watcher.stop()
    assert seen == ["15W", "7W"] and "MODE_CUSTOM" in capsys.readouterr().err


def test_a_reader_that_raises_is_one_unknown_poll():
    """A user's reader raising (a ValueError parsing a ROS message) ended the watcher's thread for good, silently;
    now it is warned about, that poll counts as unknown and the next change is still acted on."""
    import threading

    from edge_runtime.devices.power import PowerModeWarning, PowerModeWatcher

    board, seen, failed = {"mode": "15W", "broken": False}, [], threading.Event()

    def reader():
        if board["broken"]:
            failed.set()
            raise ValueError("transient read error")
        return board["mode"]

    watcher = PowerModeWatcher(reader, seen.append, interval_s=0.01).start()
    with pytest.warns(PowerModeWarning, match="ValueError: transient read error") as warned:
        board["broken"] = True
        assert failed.wait(10)
        failed.clear()
        assert failed.wait(10)  # failed twice: warned once for the run of failures
        time.sleep(0.05)
    assert len(warned) == 1
    board.update(broken=False, mode="7W")
    deadline = time.time() + 5
    while seen != ["15W", "7W"]:
        assert time.time() < deadline and watcher._thread.is_alive()
        time.sleep(0.01)
    watcher.stop()


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "calibration.yaml").is_file(), reason="no calibrated default model")
def test_racing_power_mode_changes_leave_one_mode_in_force():
    """The watcher and the application changing the mode at once: power_mode, the selection and the knobs the
    decoder runs with must name the same mode afterwards (unserialised, a third of the races left the selection
    naming the other mode, and some the decoder on the other mode's knobs)."""
    import sys
    import threading

    rt = edge_runtime.load(None, profile="jetson-orin-nano-8gb", power_mode="15W", backend="cpu", warm_up=False)
    knobs = {}
    for mode in ("15W", "7W"):
        rt.set_power_mode(mode)
        knobs[mode] = list(rt.decoder.alphas)
    assert knobs["15W"] != knobs["7W"]
    interval, mixed = sys.getswitchinterval(), 0
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows within a few trials
    try:
        for _ in range(100):
            barrier = threading.Barrier(2)

            def change(mode, b=barrier):
                b.wait()
                rt.set_power_mode(mode)

            threads = [threading.Thread(target=change, args=(m,)) for m in ("15W", "7W")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            mixed += (rt.selection.power_mode != rt.power_mode or list(rt.decoder.alphas) != knobs[rt.power_mode]
                      or list(rt.selection.knobs) != knobs[rt.power_mode])
    finally:
        sys.setswitchinterval(interval)
        rt.close()
    assert mixed == 0


def load_profile_path(name):
    from edge_runtime.devices.profile import profile_dirs

    return next(d / f"{name}.yaml" for d in profile_dirs() if (d / f"{name}.yaml").is_file())


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "calibration.yaml").is_file(), reason="no calibrated default model")
def test_default_model_monotone():
    rt = edge_runtime.load(None, profile=None, backend="cpu")
    assert _check_monotone(rt.calibration, rt.config, rt.model.manifest["encoding"]) > 50
    assert _check_monotone(synthetic_7b_calibration(rt.calibration)[0], SHAPES["llama2-7b"], "int4") > 50


def test_user_setting_survives_power_mode_change(calibrated):
    path, _ = calibrated
    rt = edge_runtime.load(path, profile=str(load_profile_path("jetson-orin-nano-8gb-super")), backend="cpu",
                           power_mode="25W")
    assert rt.decoder.rules is not None  # the policy drives sparse decode after load
    rt.set_sparsity(None)  # the application wants dense decode
    rt.set_power_mode("15W")
    assert rt.decoder.rules is None and rt.selection.power_mode == "15W"
    assert rt.follow_policy() and rt.decoder.alphas == rt.selection.knobs
