"""The cuda backend against the cpu backend, whole models: logits and greedy ids, dense, both predictors,
TEAL, OPT; graph replay equals eager launches; a knob change takes effect without recapture.

Runs on a GPU with CuPy, or on the CPU under ../shared/tools/cuda_emu in its own pytest process (see .ci/run);
skipped when neither is there. Shapes are small: the emulator costs about 10 us per simulated thread."""

from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
if not cp.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import edge_runtime  # noqa: E402
from edge_runtime.model.sampling import SamplingParams  # noqa: E402
from edge_runtime.pack.convert import convert  # noqa: E402
from edge_runtime.paths import DEFAULT_MODEL_DIR  # noqa: E402
from edge_runtime.sparsity.predictor import Rule, projection_scores  # noqa: E402
from tests.helpers import STORIES, make_llama, make_opt  # noqa: E402

PROMPT = [1, 17, 42, 99, 7, 250, 3]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cudabe")
    make_llama(root / "relu", act="relu", seed=31, bias=True)  # GQA 4/2, biases
    make_llama(root / "silu", act="silu", seed=32, n_kv_heads=1)  # GQA 4/1
    make_opt(root / "opt", seed=33)
    out = {}
    for name, hf, dtype in (("relu-fp32", "relu", "fp32"), ("relu-int8", "relu", "int8"),
                            ("relu-int4", "relu", "int4"), ("silu-fp16", "silu", "fp16"), ("opt-fp32", "opt", "fp32")):
        convert(root / hf, root / name, dtype, progress=False, group_size=32)
        out[name] = root / name
    for name, dtype in (("relu-int8-ws", "int8"), ("relu-fp16-ws", "fp16")):  # compressed weight-sparse rows
        convert(root / "relu", root / name, dtype, progress=False, weight_sparsity=0.5)
        out[name] = root / name
    return out


def _pair(path, **kw):
    return (edge_runtime.load(path, profile=None, backend="cpu", max_context=64),
            edge_runtime.load(path, profile=None, backend="cuda", max_context=64, **kw))


def _run(rt, setting=None, n=10, teal=None, criterion="teal"):
    """Greedy ids (past EOS) and every step's logits."""
    rt.decoder.set_sparsity(setting)
    rt.decoder.set_teal(teal, criterion)
    ids = [rt.decoder.start(PROMPT, SamplingParams())]
    logits = []
    for _ in range(n - 1):
        ids.append(rt.decoder.decode_step())
        logits.append(rt.backend.read_logits()[0])
    return ids, np.array(logits)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Two runs of the same step on a GPU agree to float rounding, not bit for bit: the sparse FFN's blocks add their
# down-projection partials into y with float atomics and list active rows in arrival order, both in whatever order
# the blocks run. The emulator runs blocks in a fixed order unless EMU_SEED shuffles them (each launch reads it),
# so the tests that compare two runs give each its own seed. Measured under the emulator, relu-fp32, 16 steps:
# 2.2e-7 between two block orders, 0 within one.
FLOAT_ORDER = 1e-5


@pytest.mark.parametrize("name", ["relu-fp32", "relu-int4"])
def test_long_prompt_prefill_equals_cpu(models, name):
    """A prompt past the batched attention's block of query rows (three blocks, the second prompt starting at
    position 30), and the last token's logits from the head's GEMV (the batch path widened the whole head
    to fp32 for one row)."""
    from edge_runtime.backends.base import PREFILL_QUERY_ROWS

    ids = np.random.default_rng(7).integers(3, 300, 30 + 2 * PREFILL_QUERY_ROWS + 11).tolist()
    cpu, gpu = (edge_runtime.load(models[name], profile=None, backend=b, max_context=320) for b in ("cpu", "cuda"))
    tol = 1e-4 if name.endswith("fp32") else 2e-3
    for rt in (cpu, gpu):
        rt.decoder.reset()
        rt.decoder.forward(ids[:30])
    every = [rt.decoder.forward(ids[30:]) for rt in (cpu, gpu)]
    assert _rel(cp.asnumpy(every[1]) if not isinstance(every[1], np.ndarray) else every[1], every[0]) < tol
    for rt in (cpu, gpu):
        rt.decoder.reset()
    first = [rt.decoder.start(ids, SamplingParams()) for rt in (cpu, gpu)]
    last = [rt.backend.read_logits()[0] for rt in (cpu, gpu)]
    assert first[0] == first[1] and _rel(last[1], last[0]) < tol


@pytest.mark.parametrize("name", ["relu-fp32", "relu-int8", "relu-int4", "silu-fp16", "opt-fp32"])
def test_dense_decode_equals_cpu(models, name):
    cpu, gpu = _pair(models[name])
    ids_c, lg_c = _run(cpu)
    ids_g, lg_g = _run(gpu)
    assert ids_g == ids_c
    # fp32 models keep an fp32 KV cache on the device; the others an fp16 one (half the memory on a Jetson)
    tol = 1e-4 if name.endswith("fp32") else 2e-3
    assert _rel(lg_g, lg_c) < tol
    assert _rel(gpu.decoder.prefill(PROMPT), cpu.decoder.prefill(PROMPT)) < tol  # cuBLAS prefill, continued


@pytest.mark.parametrize("predictor", ["sparseinfer", "projection"])
def test_sparse_decode_equals_cpu_and_counts_the_same(models, predictor):
    cpu, gpu = _pair(models["relu-int8"])
    if predictor == "sparseinfer":
        rules = [Rule("sparseinfer", alpha=1.0)] * cpu.config.n_layers
    else:  # thresholds between two z values of the prompt's first layer input: no ties
        z = projection_scores(np.random.default_rng(0).standard_normal((64, cpu.config.dim)).astype(np.float32),
                              cpu.backend.weights.layers[0].gate_signs)
        theta = np.sort(z, axis=0)[20] + 0.37
        rules = [Rule("projection", theta=theta.astype(np.float32))] * cpu.config.n_layers
    ids_c, lg_c = _run(cpu, rules)
    ids_g, lg_g = _run(gpu, rules)
    assert ids_g == ids_c
    assert _rel(lg_g, lg_c) < 2e-3  # fp16 KV cache on the device
    sc, sg = cpu.decoder.stats, gpu.decoder.stats
    assert (sg.steps == sc.steps).all() and sc.steps[0] == len(ids_c) - 1
    assert (sg.predicted == sc.predicted).all() and (sg.kept == sc.kept).all()
    assert 0 < sc.kept.sum() < sc.predicted.sum() < sc.steps.sum() * cpu.config.ffn_dim  # a real subset
    assert (sg.bytes_read == sc.bytes_read).all()
    for rt in (cpu, gpu):  # the evaluation path: every token's predicted mask in one batched pass
        rt.decoder.reset()
    masked = [rt.decoder.prefill(PROMPT, masked=True) for rt in (cpu, gpu)]
    assert _rel(masked[1], masked[0]) < 2e-3
    cpu.decoder.reset()
    assert _rel(masked[0], cpu.decoder.prefill(PROMPT)) > 1e-4  # the masks really dropped rows


@pytest.mark.parametrize("name", ["relu-int8-ws", "relu-fp16-ws"])
def test_weight_sparse_model_decodes_as_on_cpu(models, name):
    """A model converted with --weight-sparsity 0.5: every projection is compressed rows (bitmap + kept values),
    read as stored by the row kernels (q, k, v, o, gate, up) and the column kernel over W_down^T; dense and
    sparse decode give the CPU's ids, logits and counts."""
    cpu, gpu = _pair(models[name])
    assert gpu.backend.dev.layers[0].down_t.sparse
    for rules in (None, [Rule("sparseinfer", alpha=1.0)] * cpu.config.n_layers):
        ids_c, lg_c = _run(cpu, rules)
        ids_g, lg_g = _run(gpu, rules)
        assert ids_g == ids_c
        assert _rel(lg_g, lg_c) < 2e-3  # fp16 KV cache on the device
    sc, sg = cpu.decoder.stats, gpu.decoder.stats
    assert 0 < sc.kept.sum() < sc.predicted.sum() and (sg.kept == sc.kept).all()


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_teal_decode_equals_cpu(models, criterion):
    cpu, gpu = _pair(models["silu-fp16"])
    rng = np.random.default_rng(4)
    scale = 1.0 if criterion == "teal" else float(np.median(cpu.backend.weights.layers[0].column_norm("q")))
    teal = [{p: scale * float(rng.uniform(0.05, 0.3)) for p in ("q", "k", "v", "o", "gate", "up", "down")}
            for _ in range(cpu.config.n_layers)]
    ids_c, lg_c = _run(cpu, teal=teal, criterion=criterion)
    ids_g, lg_g = _run(gpu, teal=teal, criterion=criterion)
    _, dense = _run(cpu)
    assert _rel(lg_c, dense) > 1e-2  # the thresholds really skip channels
    assert ids_g == ids_c
    assert np.array_equal(gpu.backend.state.teal_scale.get(), cpu.backend.state.teal_scale)
    # fp16 KV cache on the device: a channel within rounding of its threshold may flip in one step
    assert np.median([_rel(g, c) for g, c in zip(lg_g, lg_c, strict=True)]) < 2e-3


def test_teal_copies_that_do_not_fit_the_device_change_nothing(models, monkeypatch):
    """int4 weights get fp16 transposed copies for TEAL (four times their size), made when a threshold is first
    set: with less device memory free than they need, the setting is refused and the step stays as it was."""
    gpu = edge_runtime.load(models["relu-int4"], profile=None, backend="cuda", max_context=64)
    rules = [Rule("sparseinfer", alpha=1.05)] * gpu.config.n_layers
    rng = np.random.default_rng(9)
    teal = [{p: float(rng.uniform(0.2, 0.5)) for p in ("q", "k", "v", "o")} for _ in range(gpu.config.n_layers)]
    lins = [getattr(layer, p) for layer in gpu.backend.weights.layers for p in ("q", "k", "v", "o")]
    copies = sum(2 * lin.w.shape[0] * lin.w.shape[1] for lin in lins)  # fp16 (K, N) each
    ids_before, _ = _run(gpu, rules)
    total = cp.cuda.runtime.memGetInfo()[1]
    monkeypatch.setattr(gpu.backend.cp.cuda.runtime, "memGetInfo", lambda: (copies, total))
    with pytest.raises(edge_runtime.EdgeRuntimeError,
                       match=rf"transposed copies of 8 weights .* need {copies:,} bytes more memory but"):
        _run(gpu, rules, teal=teal)
    assert gpu.decoder.teal is None and not gpu.backend.state.teal.get().any()
    assert all(gpu.backend.dev.of(lin).t is None for lin in lins)
    assert _run(gpu, rules)[0] == ids_before
    # an integrated GPU (Jetson) takes the board's memory: the OS's available memory counts, not cudaMemGetInfo
    props = cp.cuda.runtime.getDeviceProperties(0)
    monkeypatch.setattr(gpu.backend.cp.cuda.runtime, "getDeviceProperties", lambda d: props | {"integrated": 1})
    monkeypatch.setattr(gpu.backend.cp.cuda.runtime, "memGetInfo", lambda: (total, total))
    monkeypatch.setattr("edge_runtime.backends.cuda.available_memory_bytes", lambda: copies)
    with pytest.raises(edge_runtime.EdgeRuntimeError, match="more memory"):
        _run(gpu, rules, teal=teal)
    monkeypatch.setattr(gpu.backend.cp.cuda.runtime, "memGetInfo", lambda: (0, total))
    monkeypatch.setattr("edge_runtime.backends.cuda.available_memory_bytes", lambda: 2 * copies)
    _, with_teal = _run(gpu, rules, teal=teal)
    assert all(gpu.backend.dev.of(lin).t.w.nbytes == 2 * lin.w.shape[0] * lin.w.shape[1] for lin in lins)
    assert gpu.backend.state.teal.get().any()
    gpu.close()


def test_a_prompt_leaves_no_more_than_scratch_keep_in_the_pool(models, monkeypatch):
    """After each prefill (never in a decode step) the pool's free blocks go back once they pass SCRATCH_KEEP: a
    long prompt's fp32 working copies stayed held, on a Jetson from the board's shared memory. Closing the runtime
    gives them all back. The emulator's pool caches nothing, so a stand-in reports what a real one would hold."""
    from edge_runtime.backends.cuda import SCRATCH_KEEP

    class Pool:
        def __init__(self, held):
            self.held, self.released = held, 0

        def free_bytes(self):
            return self.held

        def free_all_blocks(self, stream=None):
            self.released += 1

    gpu = edge_runtime.load(models["relu-fp32"], profile=None, backend="cuda", max_context=64)
    for held, expected in ((SCRATCH_KEEP + 1, 1), (SCRATCH_KEEP, 0)):
        pool = Pool(held)
        monkeypatch.setattr(gpu.backend.cp, "get_default_memory_pool", lambda pool=pool: pool)
        res = gpu.generate(PROMPT, max_new_tokens=6, stop=())
        assert len(res.token_ids) == 6 and pool.released == expected  # one prompt, five decode steps
    gpu.close()
    assert pool.released == 1  # closing gives the pool's blocks back whatever they hold


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_sparse_with_attention_teal_equals_cpu(models, criterion):
    """The FFN predictor and TEAL column skipping on q, k, v, o in one sparse step (a graph per set of TEAL
    products; new threshold values without recapture), against the cpu backend: ids, logits and byte counts.
    WINA: each projection's channels scored by |x| * its column norms (q, k, v keep different channels)."""
    cpu, gpu = _pair(models["relu-int8"])
    rng = np.random.default_rng(5)
    rules = [Rule("sparseinfer", alpha=1.05)] * cpu.config.n_layers

    def scale(i, p):
        return 1.0 if criterion == "teal" else float(np.median(cpu.backend.weights.layers[i].column_norm(p)))

    teal = [{p: scale(i, p) * float(rng.uniform(0.2, 0.5)) for p in ("q", "k", "v", "o")}
            for i in range(cpu.config.n_layers)]
    _, ffn_only = _run(cpu, rules)
    ids_c, lg_c = _run(cpu, rules, teal=teal, criterion=criterion)
    ids_g, lg_g = _run(gpu, rules, teal=teal, criterion=criterion)
    assert np.array_equal(gpu.backend.state.teal_scale.get(), cpu.backend.state.teal_scale)
    assert _rel(lg_c, ffn_only) > 1e-3  # the thresholds really skip channels
    assert ids_g == ids_c and _rel(lg_g, lg_c) < 2e-3  # fp16 KV cache on the device
    sc, sg = cpu.decoder.stats, gpu.decoder.stats
    assert np.array_equal(sg.attn_bytes_dense, sc.attn_bytes_dense)
    assert np.abs(sg.attn_bytes_read - sc.attn_bytes_read).max() <= 2 * 4 * 64  # a channel at a threshold may flip
    assert sc.summary()["attn_bytes_fraction"] < 0.9
    graphs = len(gpu.backend._graphs)
    _run(gpu, rules, teal=[{p: t * 1.5 for p, t in layer.items()} for layer in teal], criterion=criterion)
    assert len(gpu.backend._graphs) == graphs  # new values, same TEAL products: no recapture
    masked = []
    for rt in (cpu, gpu):  # the evaluation pass (masked prefill) applies both too
        rt.decoder.set_sparsity(rules)
        rt.decoder.set_teal(teal, criterion)
        rt.decoder.reset()
        masked.append(rt.decoder.prefill(PROMPT, masked=True))
    assert _rel(masked[1], masked[0]) < 2e-3


def test_graph_replay_equals_eager_and_knobs_need_no_recapture(models, monkeypatch):
    eager = edge_runtime.load(models["relu-fp32"], profile=None, backend="cuda", max_context=64)
    assert len(eager.backend._graphs) == 1  # load's warm-up: one eager step, then the dense step captured
    eager.backend.use_graphs = False
    graph = edge_runtime.load(models["relu-fp32"], profile=None, backend="cuda", max_context=64, warm_up=False)
    rules = [Rule("sparseinfer", alpha=1.0)] * graph.config.n_layers
    monkeypatch.setenv("EMU_SEED", "1")  # blocks in another order for each run: FLOAT_ORDER
    ids_e, lg_e = _run(eager, rules, n=16)
    monkeypatch.setenv("EMU_SEED", "2")
    ids_g, lg_g = _run(graph, rules, n=16)
    assert ids_g == ids_e and _rel(lg_g, lg_e) < FLOAT_ORDER
    assert len(graph.backend._graphs) == 1
    before = graph.decoder.stats.predicted.sum()
    _run(graph, [Rule("sparseinfer", alpha=0.9)] * graph.config.n_layers, n=16)  # new alphas, same graph
    assert len(graph.backend._graphs) == 1
    assert graph.decoder.stats.predicted.sum() < before  # the replayed graph read the new alpha


def test_a_step_kind_runs_eagerly_once_before_it_is_captured(models, monkeypatch):
    """Modules compile and load in an eager first step, never inside a capture; the second step is captured and
    replayed from then on, with the same ids and logits as all-eager steps."""
    rt = edge_runtime.load(models["relu-int8"], profile=None, backend="cuda", max_context=64, warm_up=False)
    be = rt.backend
    rt.decoder.set_sparsity(None)
    rt.decoder.start(PROMPT, SamplingParams())
    rt.decoder.decode_step()
    assert len(be._graphs) == 0 and len(be._ran_eagerly) == 1
    rt.decoder.decode_step()
    assert len(be._graphs) == 1
    monkeypatch.setenv("EMU_SEED", "3")
    ids_g, lg_g = _run(rt, n=8)
    be.use_graphs = False
    monkeypatch.setenv("EMU_SEED", "4")
    ids_e, lg_e = _run(rt, n=8)
    assert ids_g == ids_e and _rel(lg_g, lg_e) < FLOAT_ORDER


@pytest.mark.parametrize("name", ["relu-int8", "relu-int4"])
def test_dense_reading_every_row_equals_dense_skipping_zero_rows(models, name):
    """The benchmark's dense baseline (every weight row read: gate, up, act, a full down GEMV) against the dense
    step that skips rows whose gate is an exact zero: the same ids, logits within float rounding."""
    rt = edge_runtime.load(models[name], profile=None, backend="cuda", max_context=64, warm_up=False)
    ids_s, lg_s = _run(rt, n=8)
    rt.backend.dense_skips_zero_rows = False
    ids_f, lg_f = _run(rt, n=8)
    assert ids_f == ids_s and _rel(lg_f, lg_s) < 1e-5
    assert len({k[-1] for k in rt.backend._graphs}) == 2  # a graph of its own: the flag is part of the key


def test_sampled_generation_is_seeded(models):
    gpu = edge_runtime.load(models["relu-int8"], profile=None, backend="cuda", max_context=64)
    runs = [gpu.generate(PROMPT, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=s, stop=()).token_ids
            for s in (5, 5, 6)]
    assert runs[0] == runs[1] and all(0 <= t < gpu.config.vocab_size for t in runs[2])


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K-hf is absent")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_stories260k_greedy_equals_cpu(tmp_path, dtype):
    convert(STORIES, tmp_path / "m", dtype, progress=False)
    ids = {b: edge_runtime.load(tmp_path / "m", profile=None, backend=b, max_context=64)
           .generate("Once upon a time", max_new_tokens=24).token_ids for b in ("cpu", "cuda")}
    assert ids["cuda"] == ids["cpu"]


@pytest.mark.parametrize("predictor", ["sparseinfer", "projection"])
def test_default_model_sparse_greedy_equals_cpu(predictor):
    ids = {}
    for b in ("cpu", "cuda"):
        rt = edge_runtime.load(DEFAULT_MODEL_DIR, profile="cpu-generic", backend=b, max_context=64,
                               predictor=predictor)
        assert rt.selection is not None and rt.selection.predictor == predictor
        ids[b] = rt.generate("The old man looked at the sea", max_new_tokens=8).token_ids
    assert ids["cuda"] == ids["cpu"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Every convertible family (tests/families.py), fp32: windows of 8 positions, soft-capping, post norms."""
    pytest.importorskip("transformers")
    from tests.families import FAMILIES, make_family

    root = tmp_path_factory.mktemp("cudafam")
    for fam in FAMILIES:
        make_family(root / fam / "hf", fam, seed=41)
        convert(root / fam / "hf", root / fam / "p", "fp32", progress=False)
    return {fam: root / fam / "p" for fam in FAMILIES}


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3", "gemma", "gemma2", "drelu"])
def test_every_family_decodes_as_on_cpu(families, family):
    cpu, gpu = _pair(families[family])
    ids_c, lg_c = _run(cpu, n=14)  # 7 + 14 positions: past the 8-position windows
    ids_g, lg_g = _run(gpu, n=14)
    assert ids_g == ids_c
    assert _rel(lg_g, lg_c) < 1e-4
    long = PROMPT * 3
    assert _rel(gpu.decoder.prefill(long), cpu.decoder.prefill(long)) < 1e-4  # eager prefill, windowed


def test_drelu_sparse_decode_equals_cpu_with_both_drops_counted(families, monkeypatch):
    cpu, gpu = _pair(families["drelu"])
    every = [Rule("sparseinfer", alpha=1e9)] * cpu.config.n_layers
    monkeypatch.setenv("EMU_SEED", "5")
    ids_d, dense = _run(gpu)
    monkeypatch.setenv("EMU_SEED", "6")
    ids_a, all_rows = _run(gpu, every)
    monkeypatch.delenv("EMU_SEED")
    assert ids_a == ids_d and _rel(all_rows, dense) < FLOAT_ORDER  # every row predicted: the dense step's rows
    rules = [Rule("sparseinfer", alpha=1.0)] * cpu.config.n_layers
    ids_c, lg_c = _run(cpu, rules)
    sc = cpu.decoder.stats
    cpu.backend.reset_stats()
    ids_g, lg_g = _run(gpu, rules)
    sg = gpu.decoder.stats
    assert ids_g == ids_c and _rel(lg_g, lg_c) < 1e-4
    assert (sg.predicted == sc.predicted).all() and (sg.kept == sc.kept).all()
    assert (sg.up_dropped == sc.up_dropped).all() and sc.up_dropped.sum() > 0
    assert (sg.bytes_read == sc.bytes_read).all()


@pytest.mark.parametrize("mode", ["dense", "sparse", "dense-every-row"])
def test_a_decode_step_launches_eight_kernels_a_layer(models, monkeypatch, mode):
    """The step's fusions, counted: attn_norm + q, k, v in one launch (gemv3), RoPE inside the cache append and the
    attention, the FFN norm inside ffn_prepare (or inside gate + up, gemv3, for the every-row baseline), the final
    norm inside the LM head. A ReLU llama layer: q/k/v, KV append, attention partial + combine, o (+ residual), then
    prepare, gate (+ up), down; or gate + up, act_mul, down. No stand-alone norm or rope."""
    from collections import Counter

    from edge_runtime.backends.cuda_ops.common import Module

    rt = edge_runtime.load(models["relu-int8"], profile=None, backend="cuda", max_context=64, warm_up=False)
    rt.backend.use_graphs = False  # every step issued op by op, so each launch passes through Module.launch
    rt.backend.dense_skips_zero_rows = mode != "dense-every-row"
    rt.decoder.set_sparsity([Rule("sparseinfer", alpha=1.0)] * rt.config.n_layers if mode == "sparse" else None)
    rt.decoder.start(PROMPT, SamplingParams())
    launched = Counter()
    launch = Module.launch

    def counting(self, name, *args, **kwargs):
        launched[name] += 1
        return launch(self, name, *args, **kwargs)

    monkeypatch.setattr(Module, "launch", counting)
    rt.decoder.decode_step()
    n = rt.config.n_layers
    per_layer = {"gemv3_int8": 1, "kv_append_f16": 1, "attn_partial_f16": 1, "attn_combine": 1}
    if mode == "dense-every-row":
        per_layer.update({"gemv3_int8": 2, "act_mul": 1, "teal_gemv_int8": 1})
    else:
        per_layer.update({"ffn_prepare": 1, "ffn_gate_sparseinfer_int8": 1, "ffn_down_int8": 1})
    assert {k: launched[k] for k in per_layer} == {k: v * n for k, v in per_layer.items()}
    assert launched["gemv_int8"] == n + 1  # o per layer, and the LM head
    assert launched["rope"] == launched["norm_f32"] == 0
    assert sum(launched.values()) == 8 * n + 4  # + embed, LM head, sample, advance


def test_a_nan_weight_stops_generation_as_on_cpu(tmp_path):
    """The sample kernel writes NO_TOKEN for NaN logits; the decoder raises, as with the cpu backend."""
    from edge_runtime.errors import NumericalError
    from tests.test_numerical import poisoned_copy

    model = poisoned_copy(tmp_path / "m", "layer_002.safetensors", "layers.2.ffn.up.scale", np.nan)
    rt = edge_runtime.load(model, profile=None, backend="cuda", verify=False, warm_up=False, max_context=64)
    rt.set_sparsity(None)
    for sampling in ({}, {"temperature": 0.7, "top_p": 0.9, "seed": 3}):
        with pytest.raises(NumericalError, match="NaN or infinite logit"):
            rt.generate("The old man looked at the sea", max_new_tokens=4, **sampling)
