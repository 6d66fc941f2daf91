"""The host side of scripts/bench_predictors.py, without a GPU: which densities it compares (the calibration's
equal-perplexity points) and how it imposes them (knob and gate bias) on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.signbits import pack_signs
from tests.helpers import load_script

bp = load_script("bench_predictors")


def _section(knob_rows: dict[float, tuple[float, float]], path: list[tuple[list[float], float]]) -> dict:
    """Two layers with the same table {knob: (predicted, kept)}; path of (knobs, ppl increase %)."""
    table = [{"knob": k, "predicted_density": p, "kept_density": q} for k, (p, q) in knob_rows.items()]
    return {"layers": [{"table": table}, {"table": table}],
            "path": [{"knobs": k, "ppl_increase_pct": ppl} for k, ppl in path]}


def test_equal_perplexity_densities_interpolates_sparseinfer_at_the_projection_point():
    calib = {"predictors": {
        "projection": _section({0.01: (0.10, 0.04), 0.1: (0.05, 0.03)},
                               [([0.01, 0.01], 0.2), ([0.01, 0.1], 0.6), ([0.1, 0.1], 1.5)]),
        "sparseinfer": _section({1.2: (0.40, 0.045), 1.0: (0.20, 0.035)},
                                [([1.2, 1.2], 0.0), ([1.0, 1.2], 0.4), ([1.0, 1.0], 0.8)])}}
    t = bp.equal_perplexity_densities(calib, cap_pct=1.0)
    assert t["projection"] == pytest.approx({"predicted": 0.075, "kept": 0.035, "ppl_increase_pct": 0.6})
    # SparseInfer's path at 0.4 % is (0.30, 0.040), at 0.8 % (0.20, 0.035): at 0.6 % halfway between
    assert t["sparseinfer"] == pytest.approx({"predicted": 0.25, "kept": 0.0375, "ppl_increase_pct": 0.6})
    assert bp.equal_perplexity_densities(calib, cap_pct=0.1)["projection"]["ppl_increase_pct"] == 0.2  # first point
    del calib["predictors"]["projection"]
    with pytest.raises(EdgeRuntimeError, match="both predictors"):
        bp.equal_perplexity_densities(calib, 1.0)


@pytest.mark.parametrize("predictor", ["sparseinfer", "projection"])
def test_imposed_knob_and_gate_bias(predictor):
    rng = np.random.default_rng(5 if predictor == "projection" else 6)
    d, n = 512, 2000
    gate = rng.standard_normal((n, d)).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    signs = pack_signs(gate)
    knob, predicted = bp.imposed_knob(predictor, x, signs, 0.1)
    assert knob.dtype == np.float32 and knob.shape == ((1,) if predictor == "sparseinfer" else (n,))
    if predictor == "projection":
        assert predicted.sum() == 200  # scores are continuous: exactly round(0.1 * N)
    else:
        assert 200 <= predicted.sum() <= 260  # at least that many; more where N_neg / N_pos ratios tie
    g = gate @ x
    bias = bp.gate_bias_for(g, predicted, 0.04)
    assert (predicted & (g + bias > 0)).sum() == 80
