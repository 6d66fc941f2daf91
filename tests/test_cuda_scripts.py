"""The GPU benchmark and profile scripts run end to end at --smoke sizes, so that a GPU session spends its
minutes measuring, not debugging: bench_decode.py (FFN block against dense), bench_decode_e2e.py (7B-shaped
decode, default model cuda against cpu), bench_sparse_gemv.py (compressed and TEAL GEMVs against dense),
bench_predictors.py (the two predictors' kernels) and generate_profile.py --backend cuda. Their timings under the
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

CUBLAS_TIMINGS = {"dense_step", "cublas_fp16"}  # bench_decode's fp16 dense step and bench_sparse_gemv's baseline


@pytest.fixture(autouse=True)
def timed_in_graphs(recwarn):
    """Every timing of the project's own kernels is replayed from a captured CUDA graph (bench.cuda_event_ms): a
    fallback to eager calls would time the host too. cuBLAS calls may fall back (the emulator refuses them in a
    capture; on a GPU they are captured when preallocated)."""
    yield
    eager = [str(w.message).split()[1] for w in recwarn
             if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("timed ")]
    assert set(eager) <= CUBLAS_TIMINGS, eager


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
    b = res["b"]
    assert (b["layers"], b["distinct_layers"], b["prompt"], b["tokens"]) == (2, 1, 6, 4)
    for enc in ("fp16", "int4"):
        s = b[enc]["sparse"]
        assert 0.2 <= s["predicted_density"] <= 0.35 and 0 < s["actual_density"] <= s["predicted_density"]
        assert s["bytes"] < b["fp16"]["dense"]["bytes"] and s["stats"]["decode_steps"] == 4
    hf = b["fp16"]["transformers"]  # None without torch on a CUDA device (the emulator)
    assert hf is None or (hf["tokens_per_s"] > 0 and len(hf["first_ids"]) == 4)
    c = res["c"]
    assert c["greedy_ids_equal"] is True and len(c["cuda"]["ids"]) > 1
    for row in (c["cuda_dense"], c["cuda_policy"], b["fp16"]["dense"]):
        assert row["tokens_per_s"] > 0 and len(row["first_ids"]) == 4
        assert row["joules_per_token"] is None or row["joules_per_token"] > 0
    assert c["cuda_policy"]["stats"]["predicted_density"] < 1.0  # the policy's sparse setting was in force
    assert c["cuda_dense"]["stats"].get("predicted_density", 1.0) == 1.0


def test_bench_sparse_gemv_smoke(tmp_path):
    out = tmp_path / "gemv.csv"
    load_script("bench_sparse_gemv").main(["--smoke", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [(r["kernel"], float(r["sparsity"])) for r in rows] == [
        ("cublas fp16", 0.0), ("dense fp16", 0.0), ("compressed fp16", 0.5), ("compressed int8", 0.5),
        ("compressed fp16", 0.7), ("compressed int8", 0.7),
        ("teal fp16", 0.0), ("teal fp16", 0.25), ("teal fp16", 0.4), ("teal fp16", 0.5)]
    for r in rows:
        assert float(r["max_rel_err"]) < 2e-3 and float(r["ms"]) > 0
        if r["kernel"] == "teal fp16":  # the threshold skips that fraction of the 128 channels
            assert float(r["channels_kept"]) == round(128 * (1 - float(r["sparsity"]))) / 128
        if r["kernel"].startswith("compressed"):
            assert int(r["bytes"]) < 96 * 128 * 2 * (1.1 - float(r["sparsity"]))  # fewer bytes than dense fp16


def test_bench_predictors_smoke(tmp_path):
    out = tmp_path / "pred.csv"
    load_script("bench_predictors").main(["--smoke", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12  # 3 encodings x (2 predictors alone + 2 FFN blocks)
    for r in rows:
        assert float(r["ms"]) > 0
        if r["part"] == "predictor alone":  # every row scored, none let through
            assert float(r["predicted"]) == 0
            continue
        n = 256  # the tiny shape's rows
        assert float(r["predicted"]) == float(r["host_predicted"]) and float(r["kept"]) == float(r["host_kept"])
        assert abs(float(r["kept"]) - float(r["target_kept"])) <= 1 / n
        assert abs(float(r["predicted"]) - float(r["target_predicted"])) <= (1 if r["predictor"] == "projection"
                                                                             else 8) / n  # SparseInfer ratios tie
        assert float(r["max_rel_err"]) < 1e-3
    si = [r for r in rows if r["part"] == "FFN block" and r["predictor"] == "sparseinfer"]
    proj = [r for r in rows if r["part"] == "FFN block" and r["predictor"] == "projection"]
    # the calibration's equal-perplexity point: the projection predictor lets fewer rows through
    assert all(float(p["predicted"]) < float(s["predicted"]) for p, s in zip(proj, si, strict=True))


def test_generate_profile_cuda_smoke(tmp_path):
    out = tmp_path / "gpu.yaml"
    load_script("generate_profile").main(["--name", "this-gpu", "--out", str(out), "--backend", "cuda", "--smoke"])
    prof = load_profile(out).to_dict()
    assert prof["kind"] == "gpu" and prof["gpu_names"] and prof["performance"]["measured"] is True
    import yaml

    m = yaml.safe_load(out.read_text())["measurements"]
    assert m["backend"] == "cuda" and len(m["sparse_ffn_ms_by_density"]) == 5
    assert all(v > 0 for v in m["sparse_ffn_ms_by_density"].values())
