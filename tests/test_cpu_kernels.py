"""Every compiled cpu kernel against its numpy reference (PackedTensor.dequantize / matvec /
rows_weighted_sum, sparsity/predictor.py) on fresh seeded random non-zero data, every encoding, with no,
some and all rows active; outputs poisoned (NaN) before each run. Small shapes: compile time stays low."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime.backends.cpu_gemv as cpu_gemv
import edge_runtime.backends.cpu_predict as cpu_predict
import edge_runtime.backends.cpu_step_ops as cpu_step_ops
from edge_runtime.backends.cpu_dispatch import SMALL_BATCH, MatrixKernels
from edge_runtime.backends.jit import exp_nonpositive, kernel, per_thread, view_at
from edge_runtime.pack.quant import PackedTensor, quantize
from edge_runtime.pack.signbits import pack_signs
from edge_runtime.pack.sparse_weights import compress, prune_mask
from edge_runtime.sparsity.predictor import predict_active, projection_scores

N, K = 40, 100  # K not a multiple of the int4 group (32 here) nor of 8 (bitmap bytes)
ENCODINGS = ("fp32", "fp16", "int8", "int4", "sparse-fp16", "sparse-int8")
TOL = {"fp32": 1e-5, "fp16": 2e-5, "int8": 2e-5, "int4": 2e-5, "sparse-fp16": 2e-5, "sparse-int8": 2e-5}


def packed(enc: str, rng) -> PackedTensor:
    w = rng.standard_normal((N, K)).astype(np.float32) + 0.1
    if enc.startswith("sparse-"):
        arrays = compress(w, prune_mask(w, 0.6), enc)
        return PackedTensor(enc, (N, K), arrays)
    return quantize(w, enc, group_size=32)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _products(k: MatrixKernels, enc: str) -> list[tuple]:
    """(gemv(x, out, idx, n, bias), axpy(h, out, idx, n)) of a matrix: its dispatch, and for dense encodings
    on one thread also the fused step's serial twins (no parallel region)."""
    out = [(lambda x, y, idx, n, bias: k.gemv(x, y, idx, n, bias=bias), k.axpy)]
    if enc in ("fp32", "fp16", "int8") and k.threads == 1:
        out.append((lambda x, y, idx, n, bias: cpu_gemv.gemv_rows_serial(k.w, k.scale, bias, x, idx, n, y),
                    lambda h, y, idx, n: cpu_gemv.axpy_rows_serial(k.w, k.scale, h, idx, n, y)))
    return out


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("threads", [1, 3])
def test_gemv_and_axpy_match_the_dequantised_reference(enc, threads):
    seed = int(np.random.SeedSequence().entropy % 2**32)  # fresh inputs each run; printed when an assert fails
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    t = packed(enc, rng)
    k = MatrixKernels(t, threads)
    ref = t.dequantize()  # (N, K) float32
    x = rng.standard_normal(K).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    for gemv, axpy in _products(k, enc):
        for rows in (np.arange(N), np.sort(rng.choice(N, 13, replace=False)), np.arange(0)):
            idx = np.zeros(N, np.int32)
            idx[:len(rows)] = rows
            out = np.full(N, np.nan, np.float32)
            gemv(x, out, idx, len(rows), bias)
            assert np.isnan(out[len(rows):]).all()  # nothing past n written
            if len(rows):
                assert rel(out[:len(rows)], ref[rows] @ x + bias[rows]) < TOL[enc]
                assert rel(out[:len(rows)], t.matvec(x, rows) + bias[rows]) < TOL[enc]
            h = rng.standard_normal(N).astype(np.float32)
            y = np.full(K, np.nan, np.float32)
            axpy(h, y, idx, len(rows))
            expect = h[:len(rows)] @ ref[rows]
            if len(rows):
                assert rel(y, expect) < TOL[enc]
                assert rel(y, t.rows_weighted_sum(h[:len(rows)], rows)) < TOL[enc]
            else:
                assert (y == 0).all()
    out = np.full(N, np.nan, np.float32)
    k.gemv(x, out)  # every row, no bias
    assert rel(out, ref @ x) < TOL[enc]


@pytest.mark.parametrize("tokens", [5, SMALL_BATCH + 3])  # per-token kernels on the stored weights; fp32 BLAS
@pytest.mark.parametrize("enc", ENCODINGS)
def test_rows_and_blocked_matmul_match_the_reference(enc, tokens):
    rng = np.random.default_rng(7)
    t = packed(enc, rng)
    k = MatrixKernels(t, 2)
    ids = np.array([3, 0, 39, 3], np.int32)
    out = np.full((4, K), np.nan, np.float32)
    k.rows(ids, out)
    assert np.array_equal(out, t.dequantize(ids))
    x = rng.standard_normal((tokens, K)).astype(np.float32)
    assert rel(k.matmul(x), x @ t.dequantize().T) < 1e-5
    h = rng.standard_normal((tokens, N)).astype(np.float32)
    assert rel(k.matmul_t(h), h @ t.dequantize()) < 1e-5


@pytest.mark.parametrize("d", [64, 100])
def test_sparseinfer_predictor_matches_the_reference(d):
    rng = np.random.default_rng(d)
    n = 300
    signs = pack_signs(rng.standard_normal((n, d)))
    x = rng.standard_normal(d).astype(np.float32)
    x[::7] = 0.0  # zeros count as positive
    w = signs.shape[1]
    for alpha in (0.0, 0.8, 1.0, 1.2, 100.0):  # 0 and 100: (almost) no rows and all rows
        idx, mask = np.full(n, -1, np.int32), np.zeros(n, np.uint8)
        count = cpu_predict.sparseinfer(x, signs, alpha, np.zeros(w, np.uint32), mask, idx)
        expect = np.flatnonzero(predict_active(x, signs, alpha))
        assert count == len(expect) and np.array_equal(idx[:count], expect)
    assert count == n


@pytest.mark.parametrize("d", [64, 100])
def test_projection_predictor_matches_the_reference(d):
    rng = np.random.default_rng(d + 1)
    n = 300
    signs = pack_signs(rng.standard_normal((n, d)))
    x = rng.standard_normal(d).astype(np.float32)
    w = signs.shape[1]
    ref = projection_scores(x, signs)
    z = np.full(n, np.nan, np.float32)
    table = np.zeros((4 * w, 256), np.float32)
    cpu_predict.projection_z(x, signs.view(np.uint8), table, z)
    assert np.abs(z - ref).max() < 1e-5 * np.abs(x).sum()
    for theta in (ref - 0.5, ref + 0.5, np.full(n, np.inf, np.float32), rng.standard_normal(n) * 3):
        theta = theta.astype(np.float32)
        idx, mask = np.full(n, -1, np.int32), np.zeros(n, np.uint8)
        count = cpu_predict.projection(x, signs.view(np.uint8), theta, table, z, mask, idx)
        clear = np.abs(ref - theta) > 1e-4  # decisions away from the threshold's rounding
        got = np.zeros(n, bool)
        got[idx[:count]] = True
        assert np.array_equal(got[clear], (ref >= theta)[clear])


def test_keep_after_gate_compacts_the_survivors():
    rng = np.random.default_rng(3)
    g = rng.standard_normal(50).astype(np.float32)
    rows = np.sort(rng.choice(200, 50, replace=False)).astype(np.int32)
    kept, h = np.full(50, -1, np.int32), np.full(50, np.nan, np.float32)
    m = cpu_predict.keep_after_gate(g, rows, 50, np.float32(0.3), kept, h)
    sel = (g > 0) & (g >= np.float32(0.3))
    assert m == sel.sum() and np.array_equal(kept[:m], rows[sel]) and np.array_equal(h[:m], g[sel])


def test_fp16_widening_is_exact_for_every_finite_half():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits[~np.isfinite(bits.view(np.float16))] = 0  # inf and nan are not weights
    w = bits.reshape(64, 1024)
    out = np.full(w.shape, np.nan, np.float32)
    cpu_gemv.dense_rows(w, np.zeros(0, np.uint16), np.arange(64, dtype=np.int32), out)
    assert np.array_equal(out, w.view(np.float16).astype(np.float32))


@kernel()
def _sum_views(addr, shape, like):
    """Sum of an int8 matrix, an fp16-bits vector (as integers) and a float32 matrix read through view_at."""
    a = view_at(addr[0], (shape[0, 0], shape[0, 1]), like)
    b = view_at(addr[1], (shape[1, 0],), np.uint16)
    c = view_at(addr[2], (shape[2, 0], shape[2, 1]), np.float32)
    total = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            total += a[i, j] * (i + 1) * (j + 2)  # position-weighted: a transposed or shifted view would differ
    for i in range(b.shape[0]):
        total += b[i] * (i + 3)
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            total += c[i, j] * (i - j)
    return total


def test_views_at_addresses_read_the_arrays_they_name():
    rng = np.random.default_rng(11)
    arrays = [rng.integers(-128, 128, (5, 7)).astype(np.int8), rng.integers(0, 60000, 9).astype(np.uint16),
              rng.standard_normal((3, 4)).astype(np.float32)]
    addr = np.array([a.ctypes.data for a in arrays], np.int64)
    shape = np.array([(a.shape + (1,))[:2] for a in arrays], np.int64)
    got = _sum_views(addr, shape, np.zeros((0, 0), np.int8))
    i, j = np.indices((5, 7))
    want = (arrays[0] * (i + 1) * (j + 2)).sum() + (arrays[1].astype(np.int64) * np.arange(3, 12)).sum()
    i, j = np.indices((3, 4))
    want += (arrays[2].astype(np.float64) * (i - j)).sum()
    assert got == pytest.approx(want, rel=1e-6)


def test_per_thread_rows_start_on_cache_lines_of_their_own():
    for threads, shape in [(1, (768,)), (2, (768,)), (3, (100,)), (2, (2, 45))]:
        part = per_thread(threads, *shape)
        assert part.dtype == np.float32 and part.flags.c_contiguous and not part.any()
        assert part.shape[:-1] == (threads, *shape[:-1]) and part.shape[-1] >= shape[-1]
        stride = part.strides[0]
        assert part.ctypes.data % 64 == 0 and stride % 64 == 0
        assert stride >= 4 * int(np.prod(shape)) + 64  # a spare line between one thread's sums and the next


@kernel()
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_nonpositive(x[i])


def test_softmax_exp_is_within_three_tenths_of_a_millionth_of_the_exact_value():
    rng = np.random.default_rng(7)
    x = np.concatenate([np.linspace(-87, 0, 200_001), -rng.exponential(4.0, 10_000), [0.0, -1e-8, -0.5]])
    x = x.astype(np.float32)
    out = np.zeros_like(x)
    _exp_all(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) <= 3e-7
    _exp_all(np.array([-90.0, -1e4, -np.inf, 1e-6, 100.0, np.nan], np.float32), out[:6])
    assert np.all((out[:3] > 0) & (out[:3] <= np.exp(-86.9)))  # clamped at exp(-87): tiny, never nan
    assert np.array_equal(out[3:5], [1.0, 1.0]) and np.isnan(out[5])  # above the contract: clamped at 0


@pytest.mark.parametrize("d", [64, 100])
def test_serial_predictors_match_the_reference(d):
    rng = np.random.default_rng(d + 5)
    n = 301  # not a multiple of the projection's four-row blocks
    signs = pack_signs(rng.standard_normal((n, d)))
    x = rng.standard_normal(d).astype(np.float32)
    w = signs.shape[1]
    for alpha in (0.0, 1.0, 1.2, 100.0):
        idx = np.full(n, -1, np.int32)
        count = cpu_predict.sparseinfer_serial(x, signs, alpha, np.zeros(w, np.uint32), idx)
        expect = np.flatnonzero(predict_active(x, signs, alpha))
        assert count == len(expect) and np.array_equal(idx[:count], expect)
    ref = projection_scores(x, signs)
    table, z = np.zeros((4 * w, 256), np.float32), np.full(n, np.nan, np.float32)
    theta = (rng.standard_normal(n) * 3).astype(np.float32)
    idx = np.full(n, -1, np.int32)
    count = cpu_predict.projection_serial(x, signs.view(np.uint8), theta, table, z, idx)
    assert np.abs(z - ref).max() < 1e-5 * np.abs(x).sum()
    clear = np.abs(ref - theta) > 1e-4
    got = np.zeros(n, bool)
    got[idx[:count]] = True
    assert np.array_equal(got[clear], (ref >= theta)[clear])


def _attention_reference(q, kc, vc, pos, scale, softcap, window):
    """numpy: each query head over its KV head's positions lo..pos."""
    nkv, _, hd = kc.shape
    nh = q.shape[1] // hd
    lo = max(0, pos + 1 - window) if window else 0
    out = np.zeros_like(q)
    for h in range(nh):
        g = h // (nh // nkv)
        s = kc[g, lo:pos + 1] @ q[0, h * hd:(h + 1) * hd] * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        p = np.exp(s - s.max())
        out[0, h * hd:(h + 1) * hd] = (p / p.sum()) @ vc[g, lo:pos + 1]
    return out


@pytest.mark.parametrize("step", ["attention_step", "attention_step_serial"])
@pytest.mark.parametrize("softcap, window", [(0.0, 0), (1.5, 0), (0.0, 5)])
def test_one_token_attention_matches_numpy(step, softcap, window):
    rng = np.random.default_rng(int(softcap * 10) + window)
    nkv, nh, hd, ctx, pos = 2, 6, 16, 32, 13
    kc = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    vc = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    q = rng.standard_normal((1, nh * hd)).astype(np.float32)
    k = rng.standard_normal((1, nkv * hd)).astype(np.float32)
    v = rng.standard_normal((1, nkv * hd)).astype(np.float32)
    out = np.full_like(q, np.nan)
    scores = np.zeros((nh, ctx), np.float32)
    getattr(cpu_step_ops, step)(q, k, v, kc, vc, pos, np.float32(0.25), np.float32(softcap), window, scores, out)
    assert np.array_equal(kc[:, pos], k.reshape(nkv, hd)) and np.array_equal(vc[:, pos], v.reshape(nkv, hd))
    ref = _attention_reference(q, kc, vc, pos, np.float32(0.25), softcap, window)
    assert rel(out, ref) < 1e-5


def test_compile_pending_is_true_until_a_kernel_is_cached(tmp_path):
    """In a process whose numba cache is an empty folder, the kernel is pending until its first call compiles
    and caches it; the CLI's 'compiling the cpu kernels' line rests on this."""
    import subprocess
    import sys

    probe = ("import numpy as np\n"
             "from edge_runtime.backends.jit import compile_pending, sum_parts\n"
             "before = compile_pending(sum_parts)\n"
             "out = np.zeros(3, np.float32)\n"
             "sum_parts(np.ones((2, 3), np.float32), out)\n"
             "print(before, compile_pending(sum_parts), out.tolist())\n")
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "False", "[2.0,", "2.0,", "2.0]"]


@kernel()
def _spin(n):
    """A compute-bound stand-in for a decode step: n float operations, no memory traffic."""
    s = 0.0
    for i in range(n):
        s = s * 0.999999 + i
    return s


def _longest_pause(fn, n: int) -> float:
    """The longest a pure-Python thread (a robot's control loop) went without running during fn(n), the best
    of three calls: one descheduling of the loop by a busy machine does not decide."""
    import threading
    import time

    seen, stop, windows = [], threading.Event(), []

    def control_loop():
        while not stop.is_set():
            seen.append(time.perf_counter())

    t = threading.Thread(target=control_loop)
    t.start()
    time.sleep(0.01)
    for _ in range(3):
        a = time.perf_counter()
        fn(n)
        windows.append((a, time.perf_counter()))
    stop.set()
    t.join()
    stamps = np.asarray(seen)
    return min(float(np.diff(np.concatenate(([a], stamps[(stamps > a) & (stamps < b)], [b]))).max())
               for a, b in windows)


def test_kernels_release_the_gil_while_they_run():
    """With the GIL held a decode step stalled the host's other threads for its whole length (19-21 ms p99 on a
    110M-shaped model). The project's kernel decorator against the same function compiled holding the GIL."""
    import numba

    from edge_runtime.backends.cpu_fused import fused_layer

    assert fused_layer.targetoptions["nogil"]
    holding = numba.njit(nogil=False)(_spin.py_func)
    n = 5_000
    _spin(n), holding(n)  # compiled before anything is timed
    while _longest_pause(holding, n) < 0.06:  # calls long enough that a scheduler tick cannot pass for one
        n *= 2
    held, released = _longest_pause(holding, n), _longest_pause(_spin, n)
    assert released < held / 3, (held, released)


@pytest.mark.parametrize("masked", [False, True])
def test_short_prompts_on_the_stored_weights_equal_the_fp32_batch(monkeypatch, masked):
    """A model too large for fp32 copies (forced here): a 6-token batch runs per token on the stored weights;
    its logits (plain, and with sparse masks as evaluation runs them) equal the dequantised BLAS batch's."""
    import edge_runtime
    import edge_runtime.backends.cpu as cpu_backend
    import edge_runtime.backends.cpu_dispatch as dispatch

    monkeypatch.setattr(cpu_backend, "KEEP_F32_BYTES", 0)
    rt = edge_runtime.load(None, profile=None, backend="cpu", warm_up=False)
    assert all(m.f32 is None for m in rt.model.matrices.values())
    if masked:
        rt.decoder.set_sparsity(1.0)
    ids = [1, 306, 24, 1000, 7, 2048]
    rt.decoder.reset()
    per_token = rt.decoder.prefill(ids, masked=masked)
    monkeypatch.setattr(dispatch, "SMALL_BATCH", 0)
    rt.decoder.reset()
    blas = rt.decoder.prefill(ids, masked=masked)
    assert rel(per_token, blas) < 1e-5 and (per_token.argmax(-1) == blas.argmax(-1)).all()
