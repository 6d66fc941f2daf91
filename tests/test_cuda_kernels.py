"""CUDA ops against the cpu backend's op (its numpy reference), in the style of llama.cpp's test-backend-ops:
seeded shape sweeps, fresh inputs per case, every output poisoned with NaN before each launch (and, for
kernels that initialise their own accumulators, the intermediate buffers they read poisoned instead), no
threshold ties (thresholds sit midway between adjacent values), relative error bounds (fp32 paths < 1e-5,
packed-weight paths < 2e-3 against the dequantised weights).

Runs on a GPU with CuPy, or on the CPU under ../shared/tools/cuda_emu (its README: own pytest process,
PYTHONPATH=../shared/tools/cuda_emu/fake_cupy:../shared/tools/cuda_emu); skipped when neither is present.
Emulated kernels cost about 10 us per simulated thread: the shapes are chosen for that.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_runtime.backends import cuda_available
from edge_runtime.backends.cpu import CpuBackend
from edge_runtime.backends.weights import Layer, Linear, Norm
from edge_runtime.config import ModelConfig
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.loader import PackedModel
from edge_runtime.pack.quant import PackedTensor, quantize
from edge_runtime.pack.signbits import pack_signs
from edge_runtime.pack.sparse_weights import compress, prune_mask
from edge_runtime.sparsity.predictor import Rule, projection_scores

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU (or cuda_emu)")]
F32 = 1e-5  # fp32 paths
PACKED = 2e-3  # packed weights vs the numpy twin on the same quantised weights
ENCODINGS = ["fp16", "int8", "int4", "sparse-fp16", "sparse-int8"]



def _twin(config: ModelConfig | None = None, tensors: dict | None = None, vectors: dict | None = None,
          signs: np.ndarray | None = None, max_context: int = 64, **fields) -> CpuBackend:
    """A real one-layer CpuBackend, built in memory, whose ops are the numpy twins: `tensors` / `vectors`
    (packed names, e.g. "layers.0.ffn.gate", "layers.0.attn.q_bias") are the ones under test, the rest small
    random fp32 weights consistent with the config (ModelConfig fields as keywords)."""
    cfg = config or ModelConfig(**{"arch": "llama", "vocab_size": 16, "dim": 32, "n_layers": 1, "n_heads": 1,
                                   "n_kv_heads": 1, "head_dim": 32, "ffn_dim": 32, "activation": "relu",
                                   "max_positions": 64, "tie_embeddings": True, **fields})
    rng = np.random.default_rng(0)
    d, n, hq, hkv = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"embed": (cfg.vocab_size, d), "layers.0.attn.q": (hq, d), "layers.0.attn.k": (hkv, d),
              "layers.0.attn.v": (hkv, d), "layers.0.attn.o": (d, hq), "layers.0.ffn.gate": (n, d),
              "layers.0.ffn.down_t": (n, d)}
    if cfg.gated:
        shapes["layers.0.ffn.up"] = (n, d)
    if cfg.arch == "opt":
        shapes["pos_embed"] = (cfg.max_positions + cfg.pos_offset, d)
    mats = {k: quantize((rng.standard_normal(v) * 0.1).astype(np.float32), "fp32") for k, v in shapes.items()}
    mats.update(tensors or {})
    vecs = {f"{p}.weight": np.ones(d, np.float32) for p in ("final_norm", "layers.0.attn_norm", "layers.0.ffn_norm")}
    if cfg.arch == "opt":
        vecs.update({f"{p}.bias": np.zeros(d, np.float32) for p in ("final_norm", "layers.0.attn_norm",
                                                                    "layers.0.ffn_norm")})
    vecs.update(vectors or {})
    planes = {"layers.0.ffn.gate_signs": pack_signs(mats["layers.0.ffn.gate"].dequantize()) if signs is None else signs}
    model = PackedModel(Path("twin"), cfg, {"model": cfg.to_dict(), "encoding": "fp32"}, mats, vecs, planes)
    return CpuBackend(model, max_context)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "unwritten (poisoned) output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _cpu_sparse_ffn(xn: np.ndarray, layer: Layer, rule: Rule, threshold: float, opt: bool):
    """The cpu backend's decode-step FFN on one input (a one-layer model holding this FFN): (y (d,), counts)."""
    n, d = layer.gate.w.shape
    tensors = {"layers.0.ffn.gate": layer.gate.w, "layers.0.ffn.down_t": layer.down_t}
    vectors = {"layers.0.ffn.gate_bias": layer.gate.b, "layers.0.ffn.down_bias": layer.down_b}
    if layer.up is not None:
        tensors["layers.0.ffn.up"] = layer.up.w
        vectors["layers.0.ffn.up_bias"] = layer.up.b
    be = _twin(tensors=tensors, vectors={k: v for k, v in vectors.items() if v is not None}, signs=layer.gate_signs,
               dim=d, head_dim=d,
               ffn_dim=n, arch="opt" if opt else "llama", pos_offset=2 if opt else 0,
               activation="fatrelu" if threshold > 0 else "relu", act_threshold=float(threshold))
    be.set_knobs([rule], None)
    y = np.zeros((1, d), dtype=np.float32)
    be.ffn_step(0, xn[None], be.weights.layers[0], y, "sparse")
    stats = be.read_stats()
    return y[0], SimpleNamespace(predicted=int(stats.predicted[0]), kept=int(stats.kept[0]))


def _nan(cp, shape, dtype=np.float32):
    return cp.full(shape, np.nan, dtype=dtype)


def _pack(w: np.ndarray, enc: str, group: int = 64, sparsity: float = 0.5) -> PackedTensor:
    if enc.startswith("sparse-"):
        return PackedTensor(enc, w.shape, compress(w, prune_mask(w, sparsity), enc))
    return quantize(w, enc, group)


def _midway(v: np.ndarray, q: float, scale: float) -> np.float32:
    """A threshold near the q-quantile of v, midway between two adjacent distinct values whose gap is at least
    1e-3 * scale: kernel and numpy then agree on every comparison whatever their summation order."""
    s = np.unique(np.asarray(v, np.float64))
    gaps = np.flatnonzero(np.diff(s) > 1e-3 * scale)
    i = gaps[np.argmin(np.abs(gaps - q * (len(s) - 1)))]
    return np.float32((s[i] + s[i + 1]) / 2)


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def ffn_k():
    from edge_runtime.backends.cuda_ops.sparse_ffn import SparseFFNKernels

    return SparseFFNKernels()


# ------------------------------------------------------------------------------------------- sparse FFN
FFN_CASES = [  # (encoding, predictor, variant); variants: biases, FATReLU threshold, OPT (no up), norms
    ("fp16", "sparseinfer", "plain"), ("int8", "sparseinfer", "plain"), ("int4", "sparseinfer", "plain"),
    ("fp16", "projection", "plain"), ("int8", "projection", "plain"), ("int4", "projection", "plain"),
    ("sparse-fp16", "sparseinfer", "plain"), ("sparse-int8", "projection", "plain"),
    ("int4", "sparseinfer", "bias-fatrelu-layernorm"), ("fp16", "projection", "bias-fatrelu-rmsnorm"),
    ("int8", "sparseinfer", "opt"), ("sparse-int8", "sparseinfer", "opt"),
    ("fp16", "sparseinfer", "all-active"), ("int4", "projection", "none-active"),
    ("int4", "projection", "g32-bias-fatrelu"), ("int4", "sparseinfer", "g128-rmsnorm"),
    ("fp32", "sparseinfer", "bias-fatrelu-rmsnorm"), ("fp32", "projection", "opt"),
]


@pytest.mark.parametrize("enc,predictor,variant", FFN_CASES)
def test_sparse_ffn(cp, ffn_k, enc, predictor, variant):
    from edge_runtime.backends.cuda_ops.sparse_ffn import SparseFFN

    rng = np.random.default_rng(zlib.crc32(f"{enc} {predictor} {variant}".encode()))
    # d = 288 is not a multiple of the int4 group 64 (the padded layout); N grid-strides over capped blocks
    n, d = 1000, 288 if enc == "int4" else 256
    opt, biased = variant == "opt", "bias" in variant or variant == "opt"
    group = 32 if "g32" in variant else 128 if "g128" in variant else 64
    gate_f = (rng.standard_normal((n, d)) * 0.05).astype(np.float32)
    gate = _pack(gate_f, enc, group)
    up = None if opt else _pack((rng.standard_normal((n, d)) * 0.05).astype(np.float32), enc, group)
    down_t = _pack((rng.standard_normal((n, d)) * 0.05).astype(np.float32), enc, group)
    signs = pack_signs(gate_f)
    vec = (lambda m: (rng.standard_normal(m) * 0.1).astype(np.float32)) if biased else (lambda m: None)
    gate_b, up_b, down_b = vec(n), (None if opt else vec(n)), vec(d)
    x = (rng.standard_normal(d) * 2 + 0.3).astype(np.float32)
    residual = rng.standard_normal(d).astype(np.float32)
    norm = None
    if "rmsnorm" in variant:
        norm = Norm(rng.uniform(0.5, 1.5, d).astype(np.float32), None, 1e-5)
    elif "layernorm" in variant or opt:
        norm = Norm(rng.uniform(0.5, 1.5, d).astype(np.float32), rng.standard_normal(d).astype(np.float32), 1e-5)
    xn = x if norm is None else CpuBackend.norm(None, x[None], norm)[0]

    g_all = gate.matvec(xn) + (gate_b if gate_b is not None else 0)
    threshold = _midway(g_all[g_all > 0], 0.3, np.abs(g_all).max()) if "fatrelu" in variant else np.float32(0.0)
    if predictor == "sparseinfer":
        alpha = {"all-active": 1e9, "none-active": -1.0}.get(variant, 1.05)
        rule, knob = Rule("sparseinfer", alpha=alpha), np.array([alpha], np.float32)
    else:
        z = projection_scores(xn[None], signs)[0]
        theta_v = {"all-active": z.min() - 1.0, "none-active": z.max() + 1.0}.get(variant)
        theta_v = _midway(z, 0.6, np.abs(z).max()) if theta_v is None else theta_v
        knob = np.full(n, theta_v, np.float32)
        rule = Rule("projection", theta=knob)

    layer = Layer(None, None, None, None, None, None, Linear(gate, gate_b), None if opt else Linear(up, up_b), down_t,
                  down_b, signs)
    y_ref, counts = _cpu_sparse_ffn(xn, layer, rule, threshold, opt)
    expected = residual + y_ref

    ffn = SparseFFN(ffn_k, gate, up, down_t, signs, threshold=float(threshold), gate_b=gate_b, up_b=up_b,
                    down_b=down_b, n_layers=3)
    # Poison: y is initialised by prepare (NaN shows an unwritten element); h and xn are what gate and down
    # read (NaN in y shows an entry the gate counted but did not write); counters must be reset by prepare.
    for buf in (ffn.y, ffn.h, ffn.xn, ffn.x_sum):
        buf.fill(np.nan)
    ffn.counters[...] = 12345
    ffn.x_signs.fill(0xFFFFFFFF)
    kw = dict(alpha_ptr=cp.asarray(knob)) if predictor == "sparseinfer" else dict(theta=cp.asarray(knob))
    norm_args = {} if norm is None else dict(norm_w=cp.asarray(norm.w), eps=norm.eps,
                                              norm_b=None if norm.b is None else cp.asarray(norm.b))
    y = ffn.run(cp.asarray(x), residual=cp.asarray(residual), layer=1, **kw, **norm_args).get()
    pred, kept = int(ffn.predicted.get()[0]), int(ffn.count.get()[0])
    assert pred == counts.predicted
    # a gate within float rounding of zero may fall either side (its h is ~0, so y does not care)
    predicted_rows = rule.active(xn, signs)
    ambiguous = int((predicted_rows & (np.abs(g_all) < 1e-5 * np.abs(g_all).max())).sum())
    assert abs(kept - counts.kept) <= ambiguous
    if variant == "all-active":
        assert pred == n
    elif variant == "none-active":
        assert pred == 0 and kept == 0
    else:
        assert 0 < kept < pred < n
    assert _rel(y, expected) < (PACKED if variant != "none-active" else F32)
    assert np.array_equal(ffn.stats.get(), np.array([[0, 0], [pred, kept], [0, 0]], np.uint64))
    ffn.free()


def _projection_case(n: int, d: int, name: str):
    """Random gate (n, d), its sign plane, an input xn (d,) and the numpy twin's scores z (n,); the generator
    (seeded by name) for the test's thresholds."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    gate_f = rng.standard_normal((n, d)).astype(np.float32)
    signs = pack_signs(gate_f)
    xn = (rng.standard_normal(d) + 0.2).astype(np.float32)
    return rng, gate_f, signs, xn, projection_scores(xn[None], signs)[0]


def _assert_projection_rows(cp, ffn_k, enc: str, gate_f, xn, signs, theta, expected, lut: bool | None) -> None:
    """The projection gate kernel on gate_f (n, d) with the sign plane `signs` lists exactly the rows `expected`
    (an always-positive gate, a bias of 10, so that every predicted row is kept and listed)."""
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix

    n, d = gate_f.shape
    idx, h, counters = cp.zeros(n, cp.int32), cp.zeros(n, cp.float32), cp.zeros(2, cp.int32)
    x_sum = cp.asarray(np.array([xn.sum()], np.float32))
    ffn_k.gate("projection", DeviceMatrix(_pack(gate_f * 1e-3, enc)), None, cp.full(n, 10.0, cp.float32), None,
               cp.asarray(xn), cp.zeros(-(-d // 32), cp.uint32), x_sum, cp.asarray(signs), cp.asarray(theta), 0.0,
               idx, h, counters, lut=lut)
    c = counters.get()
    assert 0 < c[1] < n and c[0] == c[1] == len(expected)
    assert np.array_equal(np.sort(idx.get()[: c[0]]), expected)


@pytest.mark.parametrize("enc,d", [("int8", 208), ("fp16", 1024), ("int4", 200)])
@pytest.mark.parametrize("lut", [True, False])
def test_projection_scores_by_table_and_by_bit_walk(cp, ffn_k, enc, d, lut):
    """Both ways of scoring a row (the nibble table; the set-bit walk where the table does not fit) predict the
    numpy twin's rows. d = 208 and 200 leave the last sign word partly past K (200: int4 pads x to 256)."""
    n = 300
    rng, gate_f, signs, xn, z = _projection_case(n, d, f"lut {enc} {d} {lut}")
    theta = rng.permutation(np.linspace(z.min(), z.max(), n)).astype(np.float32)  # per-row thresholds
    keep = np.abs(z - theta) > 1e-3 * np.abs(z).max()  # rows whose decision rounding cannot flip
    theta = np.where(keep, theta, z + 0.5).astype(np.float32)  # the others: clearly inactive
    _assert_projection_rows(cp, ffn_k, enc, gate_f, xn, signs, theta, np.flatnonzero(z >= theta), lut)


def test_projection_table_left_out_where_static_shared_memory_leaves_no_room(cp, ffn_k, monkeypatch):
    """The table is used when it fits the device's shared memory beside the row buffers *and* the kernel's static
    shared memory (128 B on a GPU, 0 in the emulator, so the driver's figure is stood in). Within those 128 B of
    the limit the gate kernel used to choose the table and then be refused at launch; it scores by the bit walk."""
    from edge_runtime.backends.cuda_ops import common, sparse_ffn
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix, row_smem

    n, d = 64, 4096
    rng, gate_f, signs, xn, z = _projection_case(n, d, "static smem")
    theta = np.where(rng.random(n) < 0.5, z - 1.0, z + 1.0).astype(np.float32)
    name = "ffn_gate_projection_fp16"
    monkeypatch.setattr(type(ffn_k.m(name)), "shared_size_bytes", property(lambda self: 128))
    monkeypatch.setattr(ffn_k.m, "_info", {})
    limit = row_smem(DeviceMatrix(_pack(gate_f, "fp16"))) + sparse_ffn.LUT_BYTES_PER_WORD * (d // 32) + 64
    monkeypatch.setattr(common, "smem_optin", lambda: limit)
    monkeypatch.setattr(sparse_ffn, "smem_optin", lambda: limit)
    _assert_projection_rows(cp, ffn_k, "fp16", gate_f, xn, signs, theta, np.flatnonzero(z >= theta), lut=None)


@pytest.mark.parametrize("enc,d", [("fp16", 200), ("int8", 208)])
def test_bit_walk_ignores_sign_bits_past_k(cp, ffn_k, enc, d):
    """The last sign word holds d % 32 inputs and padding bits. Padding bits set (a pack that skipped
    validation) must not be walked: they indexed xs past its Kp entries, and the numpy twin crops them."""
    n = 64
    rng, gate_f, signs, xn, z = _projection_case(n, d, f"pad {enc}")
    theta = np.where(rng.random(n) < 0.5, z - 1.0, z + 1.0).astype(np.float32)  # margins of 1: no rounding flips
    dirty = signs.copy()
    dirty[:, -1] |= np.uint32((0xFFFFFFFF << (d % 32)) & 0xFFFFFFFF)  # every padding bit of every row
    _assert_projection_rows(cp, ffn_k, enc, gate_f, xn, dirty, theta, np.flatnonzero(z >= theta), lut=False)


def test_sparse_ffn_grid_stride_and_alpha_in_device_memory(cp, ffn_k):
    """A few blocks serve every row (x loaded once per block); alpha is read from device memory each launch."""
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix

    rng = np.random.default_rng(7)
    n, d = 600, 256
    gate_f = rng.standard_normal((n, d)).astype(np.float32)
    gate = DeviceMatrix(quantize(gate_f, "int8"))
    signs = cp.asarray(pack_signs(gate_f))
    x = cp.asarray(rng.standard_normal(d).astype(np.float32))
    xn, x_signs, x_sum, counters = cp.empty(d, cp.float32), cp.empty(d // 32, cp.uint32), cp.empty(1, cp.float32), \
        cp.empty(2, cp.int32)
    y, idx, h = cp.empty(d, cp.float32), cp.empty(n, cp.int32), cp.empty(n, cp.float32)
    alpha = cp.asarray(np.array([0.9], np.float32))
    seen = []
    for a in (0.9, 1.3):
        alpha[...] = a
        ffn_k.prepare(x, None, None, 0.0, None, None, xn, x_signs, x_sum, counters, y)
        ffn_k.gate("sparseinfer", gate, None, None, None, xn, x_signs, x_sum, signs, alpha, 0.0, idx, h, counters,
                   max_blocks=3)
        c = counters.get()
        rows = np.sort(idx.get()[: c[0]])
        g = quantize(gate_f, "int8").matvec(x.get())
        from edge_runtime.sparsity.predictor import predict_active

        active = predict_active(x.get(), pack_signs(gate_f), a)
        assert c[1] == active.sum()
        assert np.array_equal(rows, np.flatnonzero(active & (g > 0)))
        seen.append(c[1])
    assert seen[1] > seen[0]


def test_launchers_reject_bad_arguments(cp, ffn_k):
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix
    from edge_runtime.errors import EdgeRuntimeError

    d = 64
    x = cp.zeros(d, cp.float32)
    good = dict(x=x, norm_w=None, norm_b=None, eps=1e-5, residual=None, down_b=None, xn=cp.zeros(d, cp.float32),
                x_signs=cp.zeros(2, cp.uint32), x_sum=cp.zeros(1, cp.float32), counters=cp.zeros(2, cp.int32),
                y=cp.zeros(d, cp.float32))
    for key, bad in [("x", cp.zeros(d, cp.float64)), ("xn", cp.zeros(d + 1, cp.float32)), ("y", None),
                     ("counters", cp.zeros(2, cp.int64)), ("x", np.zeros(d, np.float32)),
                     ("y", cp.zeros((d, 2), cp.float32)[:, 0])]:
        with pytest.raises(EdgeRuntimeError):
            ffn_k.prepare(**{**good, key: bad})
    with pytest.raises(EdgeRuntimeError, match="multiple of 32"):
        DeviceMatrix(quantize(np.ones((4, 64), np.float32), "int4", 16))


# ------------------------------------------------------------------------------------------- dense GEMV
GEMV_CASES = [  # (encoding, N, K, group, extras)
    ("fp16", 300, 256, 0, ""), ("int8", 300, 256, 0, "bias"), ("int4", 300, 256, 64, ""),
    ("int4", 200, 288, 64, "bias residual"), ("int4", 200, 200, 32, "rmsnorm"), ("int4", 100, 320, 128, "layernorm"),
    ("sparse-fp16", 200, 200, 0, "bias residual"), ("sparse-int8", 200, 136, 0, "rmsnorm"),
    ("fp16", 1000, 64, 0, "rmsnorm capped"),  # an LM head: vocab rows, final norm fused; 3 blocks for 1000 rows
    ("fp16", 20, 14336, 0, "residual"),  # a down GEMV over d_ff = 14336: 56 KB of shared memory (> 48 KB)
    ("fp32", 200, 100, 0, "bias residual"), ("fp32", 64, 96, 0, "layernorm"),
    # compressed rows over two staged segments (2048 + 552 columns), the first holding 1024 values: two copy rounds
    ("sparse-fp16", 40, 2600, 0, "bias"), ("sparse-int8", 24, 4104, 0, "residual"),
    ("sparse-int8", 64, 203, 0, "layernorm"),  # K % 8 != 0: x padded to 208 in its shared layout
]


@pytest.fixture(scope="module")
def gemv():
    from edge_runtime.backends.cuda_ops.gemv import Gemv

    return Gemv()


@pytest.mark.parametrize("enc,n,k,group,extras", GEMV_CASES)
def test_gemv(cp, gemv, enc, n, k, group, extras):
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix

    rng = np.random.default_rng(zlib.crc32(f"{enc} {n} {k} {group} {extras}".encode()))
    w = _pack(rng.standard_normal((n, k)).astype(np.float32), enc, group or 64)
    x = (rng.standard_normal(k) + 0.5).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if "bias" in extras else None
    norm = None
    if "rmsnorm" in extras:
        norm = Norm(rng.uniform(0.5, 1.5, k).astype(np.float32), None, 1e-6)
    elif "layernorm" in extras:
        norm = Norm(rng.uniform(0.5, 1.5, k).astype(np.float32), rng.standard_normal(k).astype(np.float32), 1e-5)
    xn = x[None] if norm is None else CpuBackend.norm(None, x[None], norm)
    twin = _twin(tensors={"layers.0.attn.q": w}, vectors={"layers.0.attn.q_bias": bias} if bias is not None else None,
                 dim=k, head_dim=n)  # the matrix under test as a q projection (N, K)
    expected = twin.linear(xn, twin.weights.layers[0].q)[0]
    y = _nan(cp, n)
    if "residual" in extras:  # in place: y = y + W x
        r = rng.standard_normal(n).astype(np.float32)
        y[...] = cp.asarray(r)
        expected = expected + r
    gemv(DeviceMatrix(w), cp.asarray(x), y, bias=None if bias is None else cp.asarray(bias),
         residual=y if "residual" in extras else None,
         norm_w=None if norm is None else cp.asarray(norm.w), norm_b=None if norm is None or norm.b is None
         else cp.asarray(norm.b), eps=1e-5 if norm is None else norm.eps, max_blocks=3 if "capped" in extras else None)
    assert _rel(y.get(), expected) < F32


GEMV3_CASES = [  # (encoding, (N_q, N_k, N_v), K, group, norm): GQA-like, rows past one block's 8 warps
    ("fp16", (64, 16, 16), 256, 0, "rmsnorm"), ("int8", (96, 32, 32), 128, 0, "layernorm"),
    ("int4", (64, 32, 32), 192, 64, "rmsnorm"), ("sparse-fp16", (40, 8, 8), 200, 0, ""),
    ("sparse-int8", (24, 24, 24), 136, 0, "rmsnorm"), ("fp32", (32, 8, 8), 96, 0, "layernorm"),
]


@pytest.mark.parametrize("enc,ns,k,group,norm", GEMV3_CASES)
def test_gemv_stacked_projections_in_one_launch(cp, gemv, enc, ns, k, group, norm):
    """q, k, v (and gate, up: the first two) of one normed input in one launch, each with its own bias (v without
    one): against each matrix's dequantised product on the numpy-normed x; a capped grid makes warps walk rows
    across the matrices."""
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix

    rng = np.random.default_rng(zlib.crc32(f"three {enc} {ns} {k} {group} {norm}".encode()))
    ws = [_pack(rng.standard_normal((n, k)).astype(np.float32), enc, group or 64) for n in ns]
    biases = [rng.standard_normal(n).astype(np.float32) for n in ns[:2]] + [None]
    x = (rng.standard_normal(k) + 0.5).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, k).astype(np.float32) if norm else None
    nb = rng.standard_normal(k).astype(np.float32) if norm == "layernorm" else None
    xn = x[None] if not norm else CpuBackend.norm(None, x[None], Norm(nw, nb, 1e-5))
    for count, max_blocks in ((3, None), (3, 2), (2, None)):
        ys = [_nan(cp, n) for n in ns[:count]]
        gemv.stacked(tuple(DeviceMatrix(w) for w in ws[:count]), cp.asarray(x), tuple(ys),
                     tuple(None if b is None else cp.asarray(b) for b in biases[:count]),
                     norm_w=None if nw is None else cp.asarray(nw), norm_b=None if nb is None else cp.asarray(nb),
                     max_blocks=max_blocks)
        for y, w, b in zip(ys, ws, biases, strict=False):  # the first `count`
            expected = w.dequantize() @ xn[0] + (0 if b is None else b)
            assert _rel(y.get(), expected) < F32


def test_gemv_stacked_refuses_mixed_matrices(cp, gemv):
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix

    rng = np.random.default_rng(5)
    a, b = (DeviceMatrix(quantize(rng.standard_normal((32, 64)).astype(np.float32), e)) for e in ("fp16", "int8"))
    c = DeviceMatrix(quantize(rng.standard_normal((32, 96)).astype(np.float32), "fp16"))
    x, ys = cp.ones(64, cp.float32), tuple(cp.zeros(32, cp.float32) for _ in range(3))
    for mats in ((a, b, a), (a, a, c)):
        with pytest.raises(EdgeRuntimeError, match="differ in encoding"):
            gemv.stacked(mats, x, ys)
    buf = cp.ones(96, cp.float32)
    with pytest.raises(EdgeRuntimeError, match="overlaps x"):
        gemv.stacked((a, a, a), buf[:64], (ys[0], ys[1], buf[32:64]))
    with pytest.raises(EdgeRuntimeError, match="another output"):
        gemv.stacked((a, a, a), x, (buf[:32], buf[16:48], buf[64:]))
    with pytest.raises(EdgeRuntimeError, match="two or three"):
        gemv.stacked((a,), x, ys[:1])


# ------------------------------------------------------------------------------------------- norm, RoPE, KV, attention
def _step(cp, token: int = 0, pos: int = 0, rng_counter: int = 0):
    from edge_runtime.backends.cuda_ops.common import STEP_POS, STEP_RNG, STEP_SIZE, STEP_TOKEN

    s = np.zeros(STEP_SIZE, np.int32)
    s[STEP_TOKEN], s[STEP_POS], s[STEP_RNG] = token, pos, rng_counter
    return cp.asarray(s)


def _config(n_heads: int, n_kv: int, hd: int, scaling: str | None):
    from edge_runtime.config import ModelConfig

    rope_scaling = {None: None, "linear": {"rope_type": "linear", "factor": 4.0},
                    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}}[scaling]
    return ModelConfig(arch="llama", vocab_size=16, dim=n_heads * hd, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv,
                       tie_embeddings=True,
                       head_dim=hd, ffn_dim=32, activation="silu", max_positions=4096, rope_scaling=rope_scaling)


@pytest.mark.parametrize("rows,k,layer_norm", [(1, 256, False), (3, 200, True), (2, 4096, False)])
def test_norm(cp, rows, k, layer_norm):
    from edge_runtime.backends.cuda_ops.norm import NormKernel

    rng = np.random.default_rng(rows * k)
    x = (rng.standard_normal((rows, k)) * 3 + 1).astype(np.float32)
    n = Norm(rng.uniform(0.5, 1.5, k).astype(np.float32),
             rng.standard_normal(k).astype(np.float32) if layer_norm else None, 1e-5)
    y = _nan(cp, (rows, k))
    NormKernel()(cp.asarray(x), cp.asarray(n.w), None if n.b is None else cp.asarray(n.b), n.eps, y)
    assert _rel(y.get(), CpuBackend.norm(None, x, n)) < F32
    xd = cp.asarray(x)  # in place
    NormKernel()(xd, cp.asarray(n.w), None if n.b is None else cp.asarray(n.b), n.eps, xd)
    assert _rel(xd.get(), CpuBackend.norm(None, x, n)) < F32


ATTN_CASES = [  # (n_heads, n_kv, hd, pos, cache dtype, rope scaling); GQA ratios 1, 2, 4, 8; odd lengths
    (4, 4, 32, 0, "f32", None), (8, 4, 64, 37, "f32", "linear"), (8, 2, 32, 100, "f16", None),
    (8, 1, 64, 130, "f16", "llama3"), (6, 3, 32, 159, "f32", "llama3"),
]


@pytest.mark.parametrize("n_heads,n_kv,hd,pos,cache,scaling", ATTN_CASES)
def test_rope_kv_append_attention(cp, n_heads, n_kv, hd, pos, cache, scaling):
    """k rotated into the cache and v appended at the device position, split-K attention over [0, pos] with q
    rotated as it is loaded (and, tables left out, a q rotated beforehand): against CpuBackend.rope +
    CpuBackend.attention on the same (fp16-rounded) cache."""
    from edge_runtime.backends.cuda_ops.attention import DecodeAttention
    from edge_runtime.backends.cuda_ops.kv_cache import KVAppendKernel
    from edge_runtime.model.rope import rope_tables

    cfg = _config(n_heads, n_kv, hd, scaling)
    max_ctx, chunk = 160, 32
    rng = np.random.default_rng(zlib.crc32(f"{n_heads} {n_kv} {hd} {pos} {cache} {scaling}".encode()))
    cos, sin = rope_tables(cfg, max_ctx)
    dt = np.float32 if cache == "f32" else np.float16
    kc = rng.standard_normal((n_kv, max_ctx, hd)).astype(dt)
    vc = rng.standard_normal((n_kv, max_ctx, hd)).astype(dt)
    q = rng.standard_normal(n_heads * hd).astype(np.float32)
    k = rng.standard_normal(n_kv * hd).astype(np.float32)
    v = rng.standard_normal(n_kv * hd).astype(np.float32)

    twin = _twin(cfg, max_context=max_ctx)
    twin.k_cache[...], twin.v_cache[...] = kc[None], vc[None]
    q_ref = twin.rope(q[None].copy(), np.array([pos]), n_heads)
    k_ref = twin.rope(k[None].copy(), np.array([pos]), n_kv)
    k_round, v_round = k_ref.astype(dt).astype(np.float32), v[None].astype(dt).astype(np.float32)
    out_ref = twin.attention(0, q_ref, k_round, v_round, np.array([pos]))[0]

    step = _step(cp, pos=pos)
    cos_d, sin_d = cp.asarray(cos), cp.asarray(sin)
    kcd, vcd = cp.asarray(kc), cp.asarray(vc)
    KVAppendKernel()(cp.asarray(k), cp.asarray(v), cos_d, sin_d, step, kcd, vcd)
    got_k, got_v = kcd.get(), vcd.get()
    tol = F32 if cache == "f32" else 1e-3
    assert _rel(got_k[:, pos].reshape(-1), k_ref[0]) < tol
    assert np.array_equal(got_v[:, pos].reshape(-1), v.astype(dt))
    mask = np.ones(max_ctx, bool)
    mask[pos] = False
    assert np.array_equal(got_k[:, mask], kc[:, mask]) and np.array_equal(got_v[:, mask], vc[:, mask])
    kcd[:, pos] = cp.asarray(k_round.reshape(n_kv, hd).astype(dt))  # the reference's rounding of the new key

    attn = DecodeAttention(n_heads, n_kv, hd, max_ctx, chunk=chunk)
    for buf in (attn.part_m, attn.part_l, attn.part_acc):
        buf.fill(np.nan)  # chunks past the length stay NaN: the combine must not read them
    out = _nan(cp, n_heads * hd)
    q_plain = cp.asarray(q)  # unrotated: the attention rotates it as it loads it (the step's RoPE of q)
    attn(q_plain, kcd, vcd, step, out, cos=cos_d, sin=sin_d)
    assert _rel(out.get(), out_ref) < F32
    assert np.array_equal(q_plain.get(), q)  # q itself is left as it was
    for buf in (attn.part_m, attn.part_l, attn.part_acc):
        buf.fill(np.nan)
    out = _nan(cp, n_heads * hd)
    attn(cp.asarray(q_ref[0]), kcd, vcd, step, out)  # no tables: q used as given
    assert _rel(out.get(), out_ref) < F32
    attn.free()


@pytest.mark.parametrize("window,softcap,pos", [(5, 0.0, 100), (40, 1.2, 100), (0, 0.8, 70), (33, 0.0, 20)])
def test_attention_sliding_window_softcap_and_query_scale(cp, window, softcap, pos):
    """Gemma-2 / Mistral attention: keys p - window < t <= p only, scores softcap * tanh(s / softcap), scale
    query_pre_attn_scalar ** -0.5; against CpuBackend.attention on the same cache. Chunks wholly before the
    window (chunk 32) must hand the combine empty partials, never NaN."""
    import dataclasses

    from edge_runtime.backends.cuda_ops.attention import DecodeAttention

    n_heads, n_kv, hd, max_ctx = 4, 2, 32, 128
    cfg = dataclasses.replace(_config(n_heads, n_kv, hd, None), sliding_window=window or 0,
                              sliding_layers=(0,) if window else (), attn_softcap=softcap, query_pre_attn_scalar=24.0)
    rng = np.random.default_rng(window * 1000 + pos)
    kc = rng.standard_normal((n_kv, max_ctx, hd)).astype(np.float32)
    vc = rng.standard_normal((n_kv, max_ctx, hd)).astype(np.float32)
    q = rng.standard_normal(n_heads * hd).astype(np.float32)
    twin = _twin(cfg, max_context=max_ctx)
    twin.k_cache[...], twin.v_cache[...] = kc[None], vc[None]
    out_ref = twin.attention(0, q[None], kc[:, pos].reshape(1, -1), vc[:, pos].reshape(1, -1), np.array([pos]))[0]
    attn = DecodeAttention(n_heads, n_kv, hd, max_ctx, chunk=32, scale=cfg.attn_scale, softcap=softcap)
    for buf in (attn.part_m, attn.part_l, attn.part_acc):
        buf.fill(np.nan)
    out = _nan(cp, n_heads * hd)
    attn(cp.asarray(q), cp.asarray(kc), cp.asarray(vc), _step(cp, pos=pos), out, window=cfg.window(0))
    assert _rel(out.get(), out_ref) < F32
    attn.free()


def test_kv_append_without_rope_and_out_of_range_position(cp):
    from edge_runtime.backends.cuda_ops.kv_cache import KVAppendKernel

    kc = cp.zeros((2, 8, 16), cp.float32)
    vc = cp.zeros((2, 8, 16), cp.float32)
    k, v = cp.arange(32, dtype=cp.float32), cp.arange(32, dtype=cp.float32) + 100
    KVAppendKernel()(k, v, None, None, _step(cp, pos=3), kc, vc)
    assert np.array_equal(kc.get()[:, 3].reshape(-1), np.arange(32)) and float(vc.get()[1, 3, 0]) == 116.0
    KVAppendKernel()(k, v, None, None, _step(cp, pos=8), kc, vc)  # past max_ctx: nothing written
    assert float(kc.get().sum()) == float(np.arange(32).sum())


# ------------------------------------------------------------------------------------------- embed, elementwise
@pytest.mark.parametrize("enc,k,group", [("fp32", 40, 0), ("fp16", 64, 0), ("int8", 96, 0), ("int4", 72, 32)])
def test_embed_token_and_learned_positions(cp, enc, k, group):
    from edge_runtime.backends.cuda_ops.common import STEP_POS, DeviceMatrix
    from edge_runtime.backends.cuda_ops.embed import EmbedKernel

    rng = np.random.default_rng(k)
    tok = _pack(rng.standard_normal((50, k)).astype(np.float32), enc, group or 64)
    pos_t = _pack(rng.standard_normal((20, k)).astype(np.float32), enc, group or 64)
    out = _nan(cp, k)
    step = _step(cp, token=31, pos=7)
    emb = EmbedKernel()
    emb(DeviceMatrix(tok), step, out)
    assert np.array_equal(out.get(), tok.dequantize(np.array([31]))[0])
    emb(DeviceMatrix(pos_t), step, out, slot=STEP_POS, offset=2, accumulate=True)  # OPT: positions start at 2
    twin = _twin(tensors={"embed": tok, "pos_embed": pos_t}, arch="opt", pos_offset=2, vocab_size=50, dim=k,
                 head_dim=k, max_positions=18)
    assert _rel(out.get(), twin.embed_tokens(np.array([31]), np.array([7]))[0]) < F32


@pytest.mark.parametrize("activation,with_up", [("silu", True), ("relu", True), ("fatrelu", False),
                                                 ("gelu_tanh", True), ("drelu", True)])
def test_elementwise(cp, activation, with_up):
    from edge_runtime.backends.cuda_ops.elementwise import Elementwise

    rng = np.random.default_rng(3)
    n = 300
    g, u, r = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    twin = _twin(activation=activation, act_threshold=0.4 if activation == "fatrelu" else 0.0)
    up = np.maximum(u, 0) if activation == "drelu" else u  # dReLU: relu on up too
    expected = twin._activate(g) * (up if with_up else 1.0)
    h = _nan(cp, n)
    ew = Elementwise()
    ew.act_mul(cp.asarray(g), cp.asarray(u) if with_up else None, h, activation, threshold=0.4)
    assert _rel(h.get(), expected) < F32
    x = cp.asarray(r)
    ew.add(x, h)
    assert _rel(x.get(), r + expected) < F32


def test_logit_softcap_and_embedding_scale(cp):
    """Gemma-2's final-logit soft-capping and Gemma's embedding scale against the cpu backend's."""
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix
    from edge_runtime.backends.cuda_ops.elementwise import Elementwise
    from edge_runtime.backends.cuda_ops.embed import EmbedKernel

    rng = np.random.default_rng(11)
    twin = _twin(logit_softcap=2.5, embed_scale=5.5, vocab_size=300)
    h = (3 * rng.standard_normal((1, 32))).astype(np.float32)
    raw = h @ twin.weights.lm_head.dequantize().T
    ref = twin.logits(h)
    y = cp.asarray(raw)
    Elementwise().softcap(y.reshape(-1), 2.5)
    assert _rel(y.get(), ref) < F32 and np.abs(ref).max() < 2.5 < np.abs(raw).max()  # the cap bent them
    out = _nan(cp, 32)
    EmbedKernel()(DeviceMatrix(twin.weights.embed), _step(cp, token=7), out, scale=5.5)
    assert _rel(out.get(), twin.embed_tokens(np.array([7]), np.array([0]))[0]) < F32


# ------------------------------------------------------------------------------------------- sampling
class _Draw:
    """Stands in for the numpy sampler's generator: numpy Generator.choice's rule (first index whose normalised
    cumulative probability exceeds u) with a given u; keeps the probabilities it was handed."""

    def __init__(self, u: float):
        self.u, self.p = u, None

    def choice(self, n, p):
        self.p = p
        cdf = np.cumsum(p)
        return int(np.searchsorted(cdf / cdf[-1], self.u, side="right"))


def _numpy_sample(logits, history, params, u):
    from edge_runtime.model.sampling import Sampler

    s = Sampler(params)
    s.rng = _Draw(u)
    return s(logits, history), s.rng.p


SAMPLE_CASES = [  # temperature, top_k, top_p, repetition_penalty, tied logits
    (1.0, 0, 1.0, 1.0, False), (0.7, 50, 1.0, 1.0, False), (1.3, 0, 0.9, 1.3, False), (1.0, 20, 0.5, 1.0, True),
    (0.8, 7, 0.95, 0.7, True), (2.0, 0, 0.3, 1.1, False),
    (1.0, 2**40, 0.9, 1.0, False),  # past the vocabulary (and int32): off; param_arrays raised OverflowError
]


@pytest.mark.parametrize("temperature,top_k,top_p,rep,tied", SAMPLE_CASES)
def test_sampling_matches_numpy_sampler(cp, temperature, top_k, top_p, rep, tied):
    """Penalty, top-k, top-p and the draw against edge_runtime/model/sampling.py given the same uniform; no draw
    or top_p within 1e-4 of a cumulative boundary (fp32 and fp64 sums may disagree there)."""
    from edge_runtime.backends.cuda_ops.sampling import SampleKernel, param_arrays
    from edge_runtime.model.sampling import SamplingParams

    rng = np.random.default_rng(zlib.crc32(f"{temperature} {top_k} {top_p} {rep} {tied}".encode()))
    v = 1000
    logits = (rng.standard_normal(v) * 3).astype(np.float32)
    if tied:
        logits = np.round(logits).astype(np.float32)  # many exact ties, at the top-k and top-p boundaries too
    history = rng.integers(0, v, 40)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=rep)
    _, full = _numpy_sample(logits, history, SamplingParams(temperature=temperature, top_k=top_k,
                                                            repetition_penalty=rep), 0.5)
    cum = np.cumsum(np.sort(full)[::-1])
    while top_p < 1 and np.abs(cum - top_p).min() < 1e-4:
        top_p -= 0.003
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=rep)
    p_h, ip_h = param_arrays(params, seed=0)
    seen_h = np.zeros(v, np.uint8)
    seen_h[history] = 1
    logits_d, p_d, ip_d = cp.asarray(logits), cp.asarray(p_h), cp.asarray(ip_h)
    work, ids, uni = cp.empty(v, cp.float32), cp.full(64, -1, cp.int32), cp.empty(1, cp.float32)
    sampler = SampleKernel()
    draws = 0
    for u in rng.uniform(0, 1, 40):
        expected, p = _numpy_sample(logits, history, params, u)
        cdf = np.cumsum(p) / p.sum()
        if np.abs(cdf - u).min() < 1e-4:
            continue
        seen, step = cp.asarray(seen_h), _step(cp, pos=10, rng_counter=3)
        uni[...] = np.float32(u)
        sampler(logits_d, p_d, ip_d, seen, work, step, ids, uniform=uni, threads=256)
        got = int(step.get()[0])
        assert got == expected, f"u={u}"
        # the sampler writes the token and its draw counter, never the position (the step's advance does)
        assert np.array_equal(step.get()[1:3], [10, 4]) and int(ids.get()[3]) == got and seen.get()[got] == 1
        draws += 1
        if draws == 6:
            break
    assert draws == 6


@pytest.mark.parametrize("temperature", [0.0, 1e-30, 1e-40, 1e-308])
def test_sampling_greedy_and_tiny_temperatures(cp, temperature):
    """Greedy = numpy argmax (ties to the lowest index) after the penalty. A tiny temperature is its limit: the draw
    shared among the tied maxima that top-p keeps, as the numpy sampler draws it given the same uniform; fp32 has
    no 1e-40 or 1e-308 (rounded to 0 they were greedy, always the lowest id), and never NaN."""
    from edge_runtime.backends.cuda_ops.sampling import SampleKernel, param_arrays
    from edge_runtime.model.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(11)
    v = 777
    logits = rng.standard_normal(v).astype(np.float32)
    logits[[600, 123, 700]] = logits.max() + 1.0  # a three-way tie for the maximum
    logits[5] = logits.max() * 1.1  # ... beaten by a token the penalty pushes back below it
    history = [5, 9]
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, history) == 123
    params = SamplingParams(temperature=temperature, top_k=3, top_p=0.5, repetition_penalty=1.2)
    p_h, ip_h = param_arrays(params, 1)
    got = set()
    for u in (0.1, 0.3, 0.6, 0.9):  # top_p 0.5 keeps two of the three tied, each half the draw
        expected, _ = _numpy_sample(logits, history, params, u)
        seen = cp.zeros(v, cp.uint8)
        seen[cp.asarray(np.array(history))] = 1
        step = _step(cp, token=9, pos=0)
        SampleKernel()(cp.asarray(logits), cp.asarray(p_h), cp.asarray(ip_h), seen, cp.empty(v, cp.float32), step,
                       cp.zeros(8, cp.int32), uniform=cp.asarray(np.array([u], np.float32)), threads=256)
        assert int(step.get()[0]) == expected, u
        got.add(expected)
    assert got == ({123} if temperature == 0 else {123, 600})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_sampling_a_non_finite_logit_gives_no_token(cp, bad, temperature):
    """One NaN or infinite logit anywhere (a model whose weights are not finite): id NO_TOKEN in the step and in
    ids, the draw counted, nothing marked seen; the host stops the generation (the cpu backend does the same)."""
    from edge_runtime.backends.cuda_ops.sampling import SampleKernel, param_arrays
    from edge_runtime.model.sampling import NO_TOKEN, SamplingParams

    rng = np.random.default_rng(12)
    v = 777
    logits = rng.standard_normal(v).astype(np.float32)
    logits[rng.integers(v)] = bad
    p_h, ip_h = param_arrays(SamplingParams(temperature=temperature, top_p=0.9), 1)
    seen, step, ids = cp.zeros(v, cp.uint8), _step(cp, token=9, pos=4, rng_counter=2), cp.zeros(8, cp.int32)
    SampleKernel()(cp.asarray(logits), cp.asarray(p_h), cp.asarray(ip_h), seen, cp.empty(v, cp.float32), step, ids,
                   threads=256)
    assert np.array_equal(step.get()[:3], [NO_TOKEN, 4, 3]) and int(ids.get()[2]) == NO_TOKEN
    assert not seen.get().any()


def test_sampling_counter_rng(cp):
    """Without a given uniform the kernel draws splitmix64(seed, step[STEP_RNG]); device_uniform is its twin."""
    from edge_runtime.backends.cuda_ops.sampling import SampleKernel, device_uniform, param_arrays
    from edge_runtime.model.sampling import SamplingParams

    rng = np.random.default_rng(5)
    v = 500
    logits = rng.standard_normal(v).astype(np.float32)
    seed = 0xDEADBEEF12345
    params = SamplingParams(temperature=1.0, seed=seed)
    p_h, ip_h = param_arrays(params, seed)
    step = _step(cp, pos=2, rng_counter=41)
    sampler = SampleKernel()
    ids = cp.zeros(64, cp.int32)
    got = []
    for counter in (41, 42, 43):
        u = device_uniform(seed, counter)
        expected, _ = _numpy_sample(logits, [], params, u)
        sampler(cp.asarray(logits), cp.asarray(p_h), cp.asarray(ip_h), cp.zeros(v, cp.uint8), cp.empty(v, cp.float32),
                step, ids, threads=256)
        got.append(int(step.get()[0]))
        assert got[-1] == expected
    assert np.array_equal(step.get()[1:3], [2, 44]) and np.array_equal(ids.get()[41:44], got)
    assert len({device_uniform(seed, c) for c in range(100)}) == 100


@pytest.mark.parametrize("enc,splits,d", [("fp32", 1, 288), ("fp16", 1, 288), ("int8", 3, 288), ("int4", 1, 288),
                                          ("fp16", None, 288), ("sparse-fp16", 1, 288), ("sparse-int8", 3, 604),
                                          ("sparse-fp16", None, 604)])
def test_ffn_down_over_a_long_list(cp, ffn_k, enc, splits, d):
    """The down accumulation over 203 active rows (repeats allowed, any order): one split gives each warp 25 rows
    (the four-in-flight loop and its remainder); d = 288 leaves the second column tile 32 wide; compressed rows
    with d = 604 have three tiles whose values start past the row's first (tile offsets), the last tile 92
    columns wide, ending inside a bitmap byte."""
    n, m = 700, 203
    rng = np.random.default_rng(zlib.crc32(f"down {enc} {splits} {d}".encode()))
    down_t = _pack(rng.standard_normal((n, d)).astype(np.float32), enc)
    idx = rng.integers(0, n, m).astype(np.int32)
    h = rng.standard_normal(m).astype(np.float32)
    y0 = rng.standard_normal(d).astype(np.float32)
    expected = y0 + h @ down_t.dequantize()[idx]
    idx_d, h_d = cp.full(n, -1, cp.int32), _nan(cp, n)
    idx_d[:m], h_d[:m] = cp.asarray(idx), cp.asarray(h)
    counters, stats, y = cp.asarray(np.array([m, 2 * m], np.int32)), cp.zeros((2, 2), cp.uint64), cp.asarray(y0)
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix

    ffn_k.down(DeviceMatrix(down_t, column_kernel=True), idx_d, h_d, counters, stats, 1, y, row_splits=splits)
    assert _rel(y.get(), expected) < F32
    assert np.array_equal(stats.get(), [[0, 0], [2 * m, m]])


# ------------------------------------------------------------------------------------------- TEAL
@pytest.mark.parametrize("enc,n,k,extras", [("fp32", 64, 100, "bias residual"),
                                            ("fp16", 256, 300, "bias"), ("int8", 200, 256, "residual"),
                                             ("int4", 200, 300, "bias residual"), ("int4", 136, 64, "dense"),
                                             ("fp16", 520, 600, "bias residual one-split"),
                                             ("int8", 264, 1100, "bias auto-split")])
def test_teal_gemv(cp, enc, n, k, extras):
    """W stored transposed; channels with |x| * s < t skipped (s: WINA-like positive channel factors); t midway
    between two |x| * s values, in device memory (a second threshold written there changes the next launch).
    one-split: one block walks all 600 channels, 256 at a time (compaction rounds, the last partial), over three
    column tiles (the last 8 columns wide); auto-split: the launcher's grid."""
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix
    from edge_runtime.backends.cuda_ops.teal import TealGemv

    rng = np.random.default_rng(zlib.crc32(f"{enc} {n} {k} {extras}".encode()))
    wt = _pack(rng.standard_normal((k, n)).astype(np.float32), enc)  # (K, N) = W^T
    bias = rng.standard_normal(n).astype(np.float32) if "bias" in extras else None
    w = PackedTensor("fp32", (n, k), {"w": np.ascontiguousarray(wt.dequantize().T)})
    twin = _twin(tensors={"layers.0.attn.q": w}, vectors={"layers.0.attn.q_bias": bias} if bias is not None else None,
                 dim=k, head_dim=n)  # W as a q projection: the twin's TEAL linear reads q's threshold slot
    lin = twin.weights.layers[0].q
    x = rng.standard_normal(k).astype(np.float32)
    r = rng.standard_normal(n).astype(np.float32)
    xs = rng.uniform(0.2, 3.0, k).astype(np.float32)
    twin.state.teal_scale[0, 0, :k] = xs
    dev, kern, thr = DeviceMatrix(wt), TealGemv(), cp.zeros(1, cp.float32)
    for q in (0.0,) if "dense" in extras else (0.4, 0.7):
        t = np.float32(0.0) if q == 0 else _midway(np.abs(x) * xs, q, 1.0)
        thr[...] = t
        twin.state.teal[0, 0] = t  # projection "q" of layer 0
        expected = twin.linear(x[None], lin, teal=(0, "q"))[0]
        y = _nan(cp, n)
        if "residual" in extras:
            y[...] = cp.asarray(r)
            expected = expected + r
        kern(dev, cp.asarray(x), cp.asarray(xs), thr, y, bias=None if bias is None else cp.asarray(bias),
             accumulate="residual" in extras,
             splits=1 if "one-split" in extras else None if "auto-split" in extras else 7)
        assert _rel(y.get(), expected) < F32


@pytest.mark.parametrize("n,k", [(64, 96), (200, 256)])
def test_teal_gemv_int8_columns_counts_kept(cp, n, k):
    """An int8 weight's columns as stored (per-output-row scales applied after the sum), against the cpu twin's
    column kernel; the kernel adds the channels it kept to a device counter."""
    from edge_runtime.backends.cpu_dispatch import ColumnKernels
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix
    from edge_runtime.backends.cuda_ops.teal import TealGemv

    rng = np.random.default_rng(zlib.crc32(f"int8c {n} {k}".encode()))
    w = _pack(rng.standard_normal((n, k)).astype(np.float32), "int8")  # (N, K) as stored
    bias = rng.standard_normal(n).astype(np.float32)
    cols, dev, kern = ColumnKernels(w, threads=1), DeviceMatrix.int8_columns(w), TealGemv()
    thr, kept = cp.zeros(1, cp.float32), cp.zeros(1, cp.uint64)
    xs = rng.uniform(0.2, 3.0, k).astype(np.float32)  # WINA-like channel factors
    total = 0
    for q in (0.0, 0.5, 0.8):
        x = rng.standard_normal(k).astype(np.float32)
        t = np.float32(0.0) if q == 0 else _midway(np.abs(x) * xs, q, 1.0)
        thr[...] = t
        expected = np.full(n, np.nan, np.float32)
        total += cols.gemv(x, xs, t, expected, bias=bias)
        assert _rel(expected, w.dequantize() @ np.where(np.abs(x) * xs >= t, x, 0) + bias) < F32
        y = _nan(cp, n)
        kern(dev, cp.asarray(x), cp.asarray(xs), thr, y, bias=cp.asarray(bias), splits=5, kept=kept)
        assert _rel(y.get(), expected) < F32
    assert int(kept.get()[0]) == total


# ------------------------------------------------------------------------------------------- CUDA graph
class _TinyDecode:
    """A one-layer decode step from the ops above: embed -> q/k/v in one launch (RMSNorm fused) -> KV append (k
    rotated) -> attention (q rotated) -> o (+ residual) -> sparse FFN (+ residual) -> LM head (final norm fused)
    -> sample. Only kernel launches into buffers allocated here: capturable."""

    def __init__(self, cp, seed: int):
        from edge_runtime.backends.cuda_ops.attention import DecodeAttention
        from edge_runtime.backends.cuda_ops.common import DeviceMatrix
        from edge_runtime.backends.cuda_ops.elementwise import Elementwise
        from edge_runtime.backends.cuda_ops.embed import EmbedKernel
        from edge_runtime.backends.cuda_ops.gemv import Gemv
        from edge_runtime.backends.cuda_ops.kv_cache import KVAppendKernel
        from edge_runtime.backends.cuda_ops.sampling import SampleKernel, param_arrays
        from edge_runtime.backends.cuda_ops.sparse_ffn import SparseFFN, SparseFFNKernels
        from edge_runtime.model.rope import rope_tables
        from edge_runtime.model.sampling import SamplingParams

        rng = np.random.default_rng(seed)
        self.cp, d, self.nh, self.nkv, self.hd, f, self.v, self.ctx = cp, 64, 4, 2, 16, 128, 100, 16

        def mat(n, k, enc="fp16", s=0.2):
            return DeviceMatrix(quantize((rng.standard_normal((n, k)) * s).astype(np.float32), enc))

        def vec(n, lo=0.8, hi=1.2):
            return cp.asarray(rng.uniform(lo, hi, n).astype(np.float32))

        self.embed, self.wq, self.wk, self.wv, self.wo = mat(self.v, d, s=1.0), mat(64, d), mat(32, d), mat(32, d), \
            mat(d, 64)
        self.lm_head, self.attn_norm, self.ffn_norm, self.final_norm = mat(self.v, d, "int8", 1.0), vec(d), vec(d), \
            vec(d)
        gate_f = (rng.standard_normal((f, d)) * 0.2).astype(np.float32)
        self.ffn = SparseFFN(SparseFFNKernels(), quantize(gate_f, "int4"),
                             quantize((rng.standard_normal((f, d)) * 0.2).astype(np.float32), "int4"),
                             quantize((rng.standard_normal((f, d)) * 0.2).astype(np.float32), "int8"),
                             pack_signs(gate_f))
        cos, sin = rope_tables(_config(self.nh, self.nkv, self.hd, None), self.ctx)
        self.cos, self.sin = cp.asarray(cos), cp.asarray(sin)
        self.kc = cp.zeros((self.nkv, self.ctx, self.hd), cp.float16)
        self.vc = cp.zeros((self.nkv, self.ctx, self.hd), cp.float16)
        self.h, self.q, self.k, self.vv, self.att = (cp.zeros(n, cp.float32) for n in (d, 64, 32, 32, 64))
        self.logits, self.work = cp.zeros(self.v, cp.float32), cp.zeros(self.v, cp.float32)
        self.step, self.ids, self.seen = _step(cp, token=3), cp.zeros(self.ctx, cp.int32), cp.zeros(self.v, cp.uint8)
        self.alpha = cp.asarray(np.array([1.0], np.float32))
        p, ip = param_arrays(SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1), 77)
        self.params, self.iparams = cp.asarray(p), cp.asarray(ip)
        self.ops = (EmbedKernel(), Gemv(), KVAppendKernel(),
                    DecodeAttention(self.nh, self.nkv, self.hd, self.ctx, chunk=4), SampleKernel(), Elementwise())

    def run(self) -> None:
        emb, gemv, kv, attn, sample, ew = self.ops
        emb(self.embed, self.step, self.h)
        gemv.stacked((self.wq, self.wk, self.wv), self.h, (self.q, self.k, self.vv), norm_w=self.attn_norm)
        kv(self.k, self.vv, self.cos, self.sin, self.step, self.kc, self.vc)
        attn(self.q, self.kc, self.vc, self.step, self.att, cos=self.cos, sin=self.sin)
        gemv(self.wo, self.att, self.h, residual=self.h)
        y = self.ffn.run(self.h, alpha_ptr=self.alpha, norm_w=self.ffn_norm, residual=self.h)
        gemv(self.lm_head, y, self.logits, norm_w=self.final_norm)
        sample(self.logits, self.params, self.iparams, self.seen, self.work, self.step, self.ids, threads=128)
        ew.advance(self.step)

    def state(self) -> tuple:
        return self.ids.get(), self.step.get(), self.logits.get(), self.kc.get(), self.ffn.stats.get()


def _same_decode(a: _TinyDecode, b: _TinyDecode) -> None:
    """ids, step and row counts equal; logits and the fp16 K cache equal to float rounding: on a GPU the sparse
    FFN's float atomics add in the order blocks run (the emulator's order changes with EMU_SEED)."""
    ids_a, step_a, logits_a, kc_a, stats_a = a.state()
    ids_b, step_b, logits_b, kc_b, stats_b = b.state()
    assert np.array_equal(ids_a, ids_b) and np.array_equal(step_a, step_b) and np.array_equal(stats_a, stats_b)
    assert _rel(logits_b, logits_a) < 1e-5
    assert _rel(kc_b.astype(np.float32), kc_a.astype(np.float32)) < 1e-3  # a value may round to the next fp16


def test_graph_replay_equals_eager_and_reads_knobs_from_device(cp, monkeypatch):
    eager, graphed = _TinyDecode(cp, 1), _TinyDecode(cp, 1)
    monkeypatch.setenv("EMU_SEED", "1")
    for _ in range(6):
        eager.run()
    monkeypatch.setenv("EMU_SEED", "2")  # each replayed launch reads it: blocks in another order than eager's
    stream = cp.cuda.Stream()  # blocking: replays wait for the knob writes below, made on the default stream
    with stream:
        stream.begin_capture()
        graphed.run()
        graph = stream.end_capture()
    for _ in range(6):
        graph.launch(stream)
    stream.synchronize()
    _same_decode(eager, graphed)
    ids = eager.ids.get()[:6]
    assert int(eager.step.get()[1]) == 6 and (ids >= 0).all() and len(set(ids.tolist())) > 1
    assert int(eager.ffn.stats.get()[0, 0]) > 0

    # a knob written into device memory between replays takes effect without recapture
    before = graphed.ffn.stats.get().copy()
    graphed.alpha[...] = 0.5
    eager.alpha[...] = 0.5
    graph.launch(stream)
    eager.run()
    stream.synchronize()
    _same_decode(eager, graphed)
    per_step_before = before[0, 0] / 6
    assert graphed.ffn.stats.get()[0, 0] - before[0, 0] < per_step_before  # fewer rows predicted at alpha 0.5


def test_compressed_down_needs_its_tile_offsets(cp, ffn_k):
    """A compressed W_down^T uploaded for row kernels only has no tile offsets: the launcher says how to upload it
    instead of reading a (1,) placeholder as offsets."""
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix

    rng = np.random.default_rng(7)
    down_t = DeviceMatrix(_pack(rng.standard_normal((64, 40)).astype(np.float32), "sparse-fp16"))
    idx, h = cp.zeros(64, cp.int32), cp.ones(64, cp.float32)
    counters, stats, y = cp.asarray(np.array([1, 1], np.int32)), cp.zeros((1, 2), cp.uint64), cp.zeros(40, cp.float32)
    with pytest.raises(EdgeRuntimeError, match="column_kernel=True"):
        ffn_k.down(down_t, idx, h, counters, stats, 0, y)


class _KernelWithStaticSmem:
    """A kernel as the driver describes one with 128 B of static shared memory (load_x's reduction buffer): the
    emulator reports 0, a GPU does not."""
    shared_size_bytes = 128

    def __init__(self):
        self.max_dynamic_shared_size_bytes = 48 * 1024 - 128
        self.launched = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.launched.append(shared_mem)


def test_launch_counts_static_shared_memory_and_refuses_partial_warps(cp):
    """A 48 KB dynamic request (a sparse-fp16 row kernel at K = 4096: x 16 KB + 8 stages of 4 KB) plus 128 B
    static needs the opt-in; the launcher sets it. Past the device's opt-in limit, or with a block that is not
    whole warps, it refuses with a message instead of a CUDA launch error."""
    from edge_runtime.backends.cuda_ops.common import Module, smem_optin

    mod = Module.__new__(Module)
    k = _KernelWithStaticSmem()
    mod._k, mod._info = {"k": k}, {}
    mod.launch("k", (1,), (256,), (), shared_mem=48 * 1024)
    assert k.max_dynamic_shared_size_bytes == 48 * 1024 and k.launched == [48 * 1024]
    with pytest.raises(EdgeRuntimeError, match="128 B static"):
        mod.launch("k", (1,), (256,), (), shared_mem=smem_optin() - 64)
    for block in ((100,), (2048,), (0,), (1,), (10, 3)):
        with pytest.raises(EdgeRuntimeError, match="whole warps"):
            mod.launch("k", (1,), block, ())
    assert k.launched == [48 * 1024]


class _RecordingKernel:
    """A compiled kernel as CuPy hands it out, recording what each launch passes."""
    shared_size_bytes = 0
    max_dynamic_shared_size_bytes = 48 * 1024

    def __init__(self, max_threads: int):
        self.max_threads_per_block = max_threads
        self.launched = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.launched.append(args)


def test_launch_sends_an_absent_pointer_as_eight_zero_bytes_and_keeps_to_the_kernels_thread_limit(cp):
    """CuPy 13 turns a None argument into a NULL *address of* the argument, so a kernel testing `if (bias)` reads
    garbage; the launcher sends a uint64 zero instead (the emulator reads None as NULL, so only this sees it). A
    kernel compiled with too many registers for the block is refused with a message, not a launch error."""
    from edge_runtime.backends.cuda_ops.common import Module

    mod = Module.__new__(Module)
    k = _RecordingKernel(max_threads=256)
    mod._k, mod._info = {"k": k}, {}
    x = cp.ones(4, cp.float32)
    mod.launch("k", (1,), (256,), (x, None, np.int32(3)))
    (sent,) = k.launched
    assert sent[0] is x and sent[2] == 3
    assert isinstance(sent[1], np.uint64) and int(sent[1]) == 0
    with pytest.raises(EdgeRuntimeError, match="allows 256"):
        mod.launch("k", (1,), (512,), (x, None, np.int32(3)))
    assert len(k.launched) == 1


def test_row_grid_counts_the_kernels_registers(cp, monkeypatch):
    """A row kernel's grid is what is resident at once. gemv3_int4 takes 72 registers a thread on sm_90 (no
    __launch_bounds__: held to 64 it spills), so 3 blocks of 256 threads fit an SM, not 4: the fourth block of each
    SM ran as a second wave. The gemv launcher passes the compiled kernel's count (the emulator reports 0)."""
    from edge_runtime.backends.cuda_ops import gemv as gemv_ops
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix, KernelInfo, resident_blocks, row_grid

    big = 10**6  # rows enough that the resident blocks, not the rows, set the grid
    assert row_grid(big) == row_grid(big, regs=64) == (resident_blocks(4),)
    assert row_grid(big, regs=72) == row_grid(big, regs=80) == (resident_blocks(3),)
    assert row_grid(big, regs=255) == (resident_blocks(1),)
    g = gemv_ops.Gemv()
    asked = []
    monkeypatch.setattr(g.m, "_info", {"gemv3_int4": KernelInfo(0, 72, 1024), "gemv_int4": KernelInfo(0, 40, 1024)})
    monkeypatch.setattr(gemv_ops, "row_grid", lambda n, **kw: asked.append((n, kw["regs"])) or (1,))
    rng = np.random.default_rng(0)
    mats = [DeviceMatrix(_pack(rng.standard_normal((n, 64)).astype(np.float32), "int4")) for n in (64, 32, 32)]
    g.stacked(tuple(mats), cp.ones(64, cp.float32), tuple(cp.zeros(n, cp.float32) for n in (64, 32, 32)))
    g(mats[0], cp.ones(64, cp.float32), cp.zeros(64, cp.float32))
    assert asked == [(128, 72), (64, 40)]


def test_gemv_and_teal_refuse_an_output_over_their_input(cp):
    """Their kernels take x and y __restrict__: a y that is a view over x's memory is refused, not raced on."""
    from edge_runtime.backends.cuda_ops.common import DeviceMatrix
    from edge_runtime.backends.cuda_ops.gemv import Gemv
    from edge_runtime.backends.cuda_ops.teal import TealGemv

    rng = np.random.default_rng(11)
    w = quantize(rng.standard_normal((64, 64)).astype(np.float32), "fp16")
    m = DeviceMatrix(w)
    buf = cp.asarray(rng.standard_normal(128).astype(np.float32))
    with pytest.raises(EdgeRuntimeError, match="overlap"):
        Gemv()(m, buf[:64], buf[32:96])
    ones, thr = cp.ones(64, cp.float32), cp.zeros(1, cp.float32)
    with pytest.raises(EdgeRuntimeError, match="overlap"):
        TealGemv()(m, buf[:64], ones, thr, buf[63:127], accumulate=True)
    x = buf[:64].get()
    Gemv()(m, buf[:64], buf[64:])  # adjacent, not overlapping: runs
    assert _rel(buf[64:].get(), w.dequantize() @ x) < F32
