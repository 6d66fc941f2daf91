"""The GPU benchmark and profile scripts run end to end at --smoke sizes, so that a GPU session spends its
minutes measuring, not debugging: bench_decode.py (FFN block against dense), bench_decode_e2e.py (7B-shaped
decode, default model cuda against cpu) and generate_profile.py --backend cuda. Their timings under the
emulator mean nothing; what is checked is that they finish and that what they report is consistent.

Runs on a GPU with CuPy, or on the CPU under ../shared/tools/cuda_emu in its own pytest process (see .ci/run);
skipped when neither is there."""

from __future__ import annotations

import csv
import json

import pytest

cp = pytest.importorskip("cupy")
if not cp.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from edge_runtime.devices.profile import load_profile  # noqa: E402
from tests.helpers import load_script  # noqa: E402


def test_bench_decode_smoke(tmp_path):
    out = tmp_path / "ffn.csv"
    load_script("bench_decode").main(["--smoke", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert {(r["encoding"], float(r["density"])) for r in rows} == {
        (e, d) for e in ("fp16", "int8", "int4") for d in (1.0, 0.5, 0.25, 0.15, 0.10, 0.05)}
    for r in rows:
        predicted, kept, density = float(r["predicted"]), float(r["kept"]), float(r["density"])
        assert predicted == float(r["host_predicted"])  # the kernel's predictor = numpy's, at the same alpha
        assert density <= predicted <= density + 0.15  # alpha was chosen for this density (ratios tie at d 64)
        assert 0 < kept <= predicted  # kept rows are predicted rows whose gate survived the ReLU
        assert float(r["sparse_ms"]) > 0 and float(r["dense_ms"]) > 0


def test_bench_decode_e2e_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    load_script("bench_decode_e2e").main(["--smoke", "--tokens", "4", "--json", str(out)])
    res = json.loads(out.read_text())
    for enc in ("fp16", "int4"):
        s = res["b"][enc]["sparse"]
        assert 0.2 <= s["predicted_density"] <= 0.35 and 0 < s["actual_density"] <= s["predicted_density"]
        assert s["bytes"] < res["b"]["fp16"]["dense"]["bytes"]
    assert res["c"]["greedy_ids_equal"] is True and len(res["c"]["cuda"]["ids"]) > 1


def test_generate_profile_cuda_smoke(tmp_path):
    out = tmp_path / "gpu.yaml"
    load_script("generate_profile").main(["--name", "this-gpu", "--out", str(out), "--backend", "cuda", "--smoke"])
    prof = load_profile(out).to_dict()
    assert prof["kind"] == "gpu" and prof["gpu_names"] and prof["performance"]["measured"] is True
    import yaml

    m = yaml.safe_load(out.read_text())["measurements"]
    assert m["backend"] == "cuda" and len(m["sparse_ffn_ms_by_density"]) == 5
    assert all(v > 0 for v in m["sparse_ffn_ms_by_density"].values())
