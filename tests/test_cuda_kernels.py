"""CUDA kernels against their numpy twins (skipped without CuPy and a GPU). Fresh random inputs every
run, outputs poisoned with NaN before each launch, fp32 accumulation: relative error bounds asserted."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.backends import cuda_available
from edge_runtime.pack.quant import quantize
from edge_runtime.pack.signbits import pack_signs
from edge_runtime.sparsity.predictor import keep_after_gate, predict_active, projection_scores

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU")]
BOUND = {"fp16": 2e-3, "int8": 2e-3, "int4": 2e-3}  # vs the numpy twin on the same quantised weights


@pytest.fixture(scope="module")
def kernels():
    from edge_runtime.backends.cuda_kernels import SparseFFNKernels

    return SparseFFNKernels()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "unwritten (poisoned) output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("enc", ["fp16", "int8", "int4"])
def test_gemv(kernels, enc):
    import cupy as cp

    from edge_runtime.backends.cuda_kernels import DeviceMatrix

    rng = np.random.default_rng()
    n, k = 1000, 4096
    w = quantize(rng.standard_normal((n, k)).astype(np.float32), enc)
    x = rng.standard_normal(k).astype(np.float32)
    y = cp.full(n, cp.nan, dtype=cp.float32)
    kernels.gemv(DeviceMatrix(w), cp.asarray(x), y)
    assert _rel(y.get(), w.dequantize() @ x) < BOUND[enc]


@pytest.mark.parametrize("enc", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("predictor", ["sparseinfer", "projection"])
def test_sparse_ffn_block(kernels, enc, predictor):
    import cupy as cp

    from edge_runtime.backends.cuda_kernels import SparseFFN

    rng = np.random.default_rng()
    n, d = 1376, 512
    gate_f = rng.standard_normal((n, d)).astype(np.float32) * 0.05
    gate, up = quantize(gate_f, enc), quantize(rng.standard_normal((n, d)).astype(np.float32) * 0.05, enc)
    down_t = quantize(rng.standard_normal((n, d)).astype(np.float32) * 0.05, enc)
    signs = pack_signs(gate_f)
    x = rng.standard_normal(d).astype(np.float32)
    ffn = SparseFFN(kernels, gate, up, down_t, signs)
    if predictor == "sparseinfer":
        active = predict_active(x, signs, 1.05)
        y = ffn.run(cp.asarray(x), alpha_ptr=cp.asarray(np.array([1.05], np.float32)))
    else:
        z = projection_scores(x[None], signs)[0]
        theta = np.quantile(z, 0.6).astype(np.float32) * np.ones(n, np.float32)
        active = z >= theta
        ffn.y.fill(cp.nan)
        y = ffn.run(cp.asarray(x), theta=cp.asarray(theta))
    g = gate.dequantize() @ x
    keep = active & keep_after_gate(g, 0.0)
    h = np.where(keep, g * (up.dequantize() @ x), 0.0)
    expected = h @ down_t.dequantize()
    assert int(ffn.predicted.get()[0]) == int(active.sum())
    assert int(ffn.count.get()[0]) == int(keep.sum())
    assert 0 < keep.sum() < n
    assert _rel(y.get(), expected) < BOUND[enc]
    ffn.free()


def test_alpha_change_takes_effect_without_new_buffers(kernels):
    """The alpha lives in device memory: writing a new value changes the next run, nothing else."""
    import cupy as cp

    from edge_runtime.backends.cuda_kernels import SparseFFN

    rng = np.random.default_rng()
    n, d = 512, 256
    gate_f = rng.standard_normal((n, d)).astype(np.float32)
    ffn = SparseFFN(kernels, quantize(gate_f, "fp16"), quantize(rng.standard_normal((n, d)), "fp16"),
                    quantize(rng.standard_normal((n, d)), "fp16"), pack_signs(gate_f))
    x = cp.asarray(rng.standard_normal(d).astype(np.float32))
    alpha = cp.asarray(np.array([0.9], np.float32))
    ffn.run(x, alpha_ptr=alpha)
    few = int(ffn.predicted.get()[0])
    alpha[...] = 1.3
    ffn.run(x, alpha_ptr=alpha)
    assert int(ffn.predicted.get()[0]) > few
