"""ONNX export: the graph run by onnxruntime against the numpy backend (logits and K/V), prefill
through ONNX then numpy decode against numpy throughout, the export cache, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from edge_runtime.cli import main  # noqa: E402
from edge_runtime.export.onnx_export import export_onnx  # noqa: E402
from edge_runtime.export.onnx_graph import ExportOptions  # noqa: E402
from edge_runtime.export.onnx_prefill import OnnxPrefill, choose_providers, session_options  # noqa: E402
from edge_runtime.model.sampling import SamplingParams  # noqa: E402
from edge_runtime.pack.convert import convert  # noqa: E402
from edge_runtime.pack.loader import load_packed  # noqa: E402
from edge_runtime.paths import DEFAULT_MODEL_DIR  # noqa: E402
from edge_runtime.runtime import load  # noqa: E402
from tests.helpers import STORIES, make_llama, make_opt, rel_err  # noqa: E402

CPU = ["CPUExecutionProvider"]


# ---- the two places that touch the decoder API (ported once when Decoder.prefill lands) -----------------
def numpy_forward(model_dir, ids: list[int]):
    """The numpy reference: logits (T, vocab) and per layer (k, v) each (n_kv, T, hd), from one batch."""
    rt = load(model_dir, profile=None, backend="cpu")
    rt.decoder.reset()
    logits = rt.decoder.prefill(ids)
    t = len(ids)
    kv = [(rt.backend.k_cache[i][:, :t].copy(), rt.backend.v_cache[i][:, :t].copy()) for i in range(rt.config.n_layers)]
    return logits, kv


def greedy_decode(rt, prompt: list[int], n: int, prefill=None) -> list[int]:
    """Greedy ids after the prompt: the prompt through `prefill` (an OnnxPrefill, whose K/V the decoder
    writes into the numpy backend's cache) or through the numpy decoder (None); then numpy decode steps."""
    rt.decoder.external_prefill = prefill
    try:
        out = [rt.decoder.start(prompt, SamplingParams())]  # greedy, past any EOS
        out += [rt.decoder.decode_step() for _ in range(n - 1)]
    finally:
        rt.decoder.external_prefill = None
    return out


# ---- models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> packed directory: the default model (int8), stories260K (fp32, when present), an OPT and
    a GQA Llama with biases (fp32 and int8), an int4 Llama whose K pads to whole groups, a pruned one."""
    root = tmp_path_factory.mktemp("onnx-models")
    pytest.importorskip("torch")  # builds the HF models below; an install with the onnx extra alone skips them
    out = {"default": DEFAULT_MODEL_DIR}
    make_opt(root / "opt-hf", with_tokenizer=False)
    make_llama(root / "gqa-hf", act="relu", n_kv_heads=2, bias=True, with_tokenizer=False)
    make_llama(root / "silu-hf", act="fatrelu", n_kv_heads=1, tie=True, seed=1, with_tokenizer=False,
               rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64})
    for name, hf, dtype, kw in [("opt", "opt-hf", "fp32", {}), ("opt-int8", "opt-hf", "int8", {}),
                                ("gqa", "gqa-hf", "fp32", {}), ("gqa-int8", "gqa-hf", "int8", {}),
                                ("gqa-int4", "gqa-hf", "int4", {"group_size": 48}),
                                ("fatrelu-int4", "silu-hf", "int4", {"group_size": 32}),
                                ("gqa-sparse", "gqa-hf", "int8", {"weight_sparsity": 0.5})]:
        convert(root / hf, root / name, dtype, progress=False, **kw)
        out[name] = root / name
    if STORIES.is_dir():
        convert(STORIES, root / "stories", "fp32", progress=False)
        out["stories"] = root / "stories"
    return out


def _ids(model_dir, t: int = 24, seed: int = 0) -> list[int]:
    vocab = load_packed(model_dir, verify=False).config.vocab_size
    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab, t)]


def ort_forward(path, cfg, ids: list[int], past=None, start: int = 0):
    """Run an exported graph: logits (T, vocab) and per layer (k, v) (n_kv, S, hd)."""
    sess = ort.InferenceSession(str(path), session_options(), providers=CPU)
    feed = {"input_ids": np.array([ids], np.int64), "start_pos": np.array([start], np.int64)}
    for i in range(cfg.n_layers):
        k, v = past[i] if past else (np.zeros((cfg.n_kv_heads, 0, cfg.head_dim), np.float32),) * 2
        feed[f"past_key_{i}"], feed[f"past_value_{i}"] = k[None], v[None]
    outs = sess.run(None, feed)
    return outs[0][0], [(outs[1 + 2 * i][0], outs[2 + 2 * i][0]) for i in range(cfg.n_layers)]


def _compare(models, name, dtype, tmp_path, **export_kw):
    model = load_packed(models[name])
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, ExportOptions(dtype=dtype), **export_kw)
    ids = _ids(models[name])
    logits, kv = ort_forward(path, model.config, ids)
    ref_logits, ref_kv = numpy_forward(models[name], ids)
    kv_err = max(max(rel_err(k, rk), rel_err(v, rv)) for (k, v), (rk, rv) in zip(kv, ref_kv, strict=True))
    return rel_err(logits, ref_logits), kv_err, path


@pytest.mark.parametrize("name", ["default", "stories", "opt", "gqa", "gqa-int8", "fatrelu-int4", "gqa-sparse"])
def test_fp32_export_matches_numpy(models, tmp_path, name):
    if name not in models:
        pytest.skip("../shared/models/stories260K-hf is absent")
    logits_err, kv_err, _ = _compare(models, name, "fp32", tmp_path)
    assert logits_err < 1e-4 and kv_err < 1e-4, (logits_err, kv_err)


@pytest.mark.parametrize("name", ["default", "opt-int8", "gqa-int8", "gqa-sparse"])
def test_packed_int8_export_matches_numpy_int8(models, tmp_path, name):
    logits_err, kv_err, path = _compare(models, name, "packed", tmp_path)
    assert logits_err < 1e-3 and kv_err < 1e-3, (logits_err, kv_err)
    dq = [n for n in onnx.load(path, load_external_data=False).graph.node if n.op_type == "DequantizeLinear"]
    int8 = [m for m in load_packed(models[name], verify=False).matrices.values() if m.encoding.endswith("int8")]
    assert len(dq) == len(int8) > 0


@pytest.mark.parametrize("name", ["gqa-int4", "fatrelu-int4"])
def test_packed_int4_blocked_dequantize(models, tmp_path, name):
    """int4 groups as DequantizeLinear with block_size (opset 21); K = 64 pads to 96 (group 48) and
    down_t's groups run along d: both layouts are exercised. onnxruntime runs them here."""
    logits_err, kv_err, path = _compare(models, name, "packed", tmp_path)
    assert logits_err < 1e-3 and kv_err < 1e-3, (logits_err, kv_err)
    graph = onnx.load(path).graph
    blocks = {a.i for n in graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "block_size"}
    assert blocks == {load_packed(models[name], verify=False).layer(0, "ffn.gate").group_size}
    assert any(t.data_type == onnx.TensorProto.INT4 for t in graph.initializer)


def test_fp16_export_close_to_numpy(models, tmp_path):
    logits_err, kv_err, _ = _compare(models, "gqa", "fp16", tmp_path)
    assert logits_err < 5e-3 and kv_err < 5e-3, (logits_err, kv_err)


def test_external_data_matches_inline(models, tmp_path):
    """Weights streamed to OUT.onnx.data give the same outputs; onnx.checker ran in the export."""
    inline = _compare(models, "gqa-int4", "packed", tmp_path / "a")
    external = _compare(models, "gqa-int4", "packed", tmp_path / "b", external=True)
    assert (tmp_path / "b" / "gqa-int4.onnx.data").is_file() and not (tmp_path / "a" / "gqa-int4.onnx.data").exists()
    assert external[:2] == inline[:2]
    onnx.checker.check_model(str(external[2]), full_check=True)


def test_dynamic_past_continues_a_prompt(models, tmp_path):
    """Dynamic T and past length: the prompt in two calls (the second with the first's K/V) equals one."""
    model = load_packed(models["gqa"])
    path = tmp_path / "g.onnx"
    export_onnx(model, path, ExportOptions())
    ids = _ids(models["gqa"], 20)
    full_logits, full_kv = ort_forward(path, model.config, ids)
    _, first_kv = ort_forward(path, model.config, ids[:13])
    logits, kv = ort_forward(path, model.config, ids[13:], past=first_kv, start=13)
    assert rel_err(logits, full_logits[13:]) < 1e-5
    assert all(rel_err(k, fk) < 1e-5 for (k, _), (fk, _) in zip(kv, full_kv, strict=True))


@pytest.mark.parametrize("name,dtype", [("default", "fp32"), ("default", "packed"), ("stories", "fp32"),
                                        ("opt", "fp32"), ("gqa", "fp32")])
def test_onnx_prefill_then_numpy_decode_same_greedy_ids(models, tmp_path, name, dtype):
    if name not in models:
        pytest.skip("../shared/models/stories260K-hf is absent")
    rt = load(models[name], profile=None, backend="cpu")
    prompt = rt.encode("Once upon a time there was a robot") if rt.tokenizer else _ids(models[name], 12)
    prefill = OnnxPrefill(rt.model, providers=CPU, dtype=dtype, cache_dir=tmp_path)
    assert prefill.providers_chosen == CPU
    assert greedy_decode(rt, prompt, 64, prefill) == greedy_decode(rt, prompt, 64)


def test_prefill_run_matches_numpy_and_bound_outputs(models, tmp_path):
    prefill = OnnxPrefill(load_packed(models["gqa"]), providers=CPU, cache_dir=tmp_path)
    ids = _ids(models["gqa"], 17)
    last, kv = prefill.run(ids)
    ref_logits, ref_kv = numpy_forward(models["gqa"], ids)
    assert last.shape == (ref_logits.shape[1],) and kv[0][0].shape == ref_kv[0][0].shape
    assert rel_err(last, ref_logits[-1]) < 1e-4
    assert all(rel_err(v, rv) < 1e-4 for (_, v), (_, rv) in zip(kv, ref_kv, strict=True))
    bound = prefill.run_bound(ids)  # OrtValues (on the CPU here; on "cuda" with a GPU provider)
    assert np.array_equal(bound[0].numpy()[0, -1], last) and np.array_equal(bound[1].numpy()[0], kv[0][0])


def test_export_cache_next_to_model_reused_and_rebuilt(models, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(models["gqa"], model_dir)
    model = load_packed(model_dir)
    first = OnnxPrefill(model, providers=CPU)
    assert first.path.parent == model_dir and first.cache_note.startswith("exported")
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert set(record["files"]) == {first.path.name} and record["options"]["logits"] == "last"
    assert OnnxPrefill(model, providers=CPU).cache_note == "reused"
    with open(first.path, "r+b") as f:  # tamper: same size, one byte changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = OnnxPrefill(model, providers=CPU)
    assert "sha256" in again.cache_note and again.path == first.path
    other = OnnxPrefill(model, providers=CPU, dtype="packed")  # other options: another file, both kept
    assert other.path != first.path and OnnxPrefill(model, providers=CPU).cache_note == "reused"
    assert other.describe()["providers"] == CPU


def test_export_cache_without_a_writable_folder_says_how_to_give_one(models, tmp_path, monkeypatch):
    """A read-only model (os.access False, as for a non-root user) and a cache home that cannot be made:
    one error naming the folder and XDG_CACHE_HOME, not a bare OSError."""
    from edge_runtime.errors import EdgeRuntimeError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(EdgeRuntimeError, match=r"cannot keep the ONNX prefill export in .*not-a-folder.*XDG_CACHE"):
        OnnxPrefill(load_packed(models["gqa"]), providers=CPU)
    assert not list(models["gqa"].glob("prefill-*"))  # nothing written beside the model either


def test_choose_providers_order_and_filter():
    offered = ["AzureExecutionProvider", "CPUExecutionProvider", "CUDAExecutionProvider"]
    assert choose_providers(None, offered) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"], offered) == ["CPUExecutionProvider"]
    with pytest.raises(Exception, match="none of the execution providers"):
        choose_providers(["TensorrtExecutionProvider"], offered)


def test_cli_export_onnx(models, tmp_path, capsys):
    out = tmp_path / "x" / "model.onnx"
    assert main(["export-onnx", str(models["gqa-int8"]), str(out), "--dtype", "packed", "--logits", "last",
                 "--max-context", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["options"]["opset"] == 21 and list(info["files"]) == ["model.onnx"]
    sess = ort.InferenceSession(str(out), providers=CPU)
    assert sess.get_outputs()[0].shape == [1, 1, 300]
    assert out.stat().st_mode & 0o777 == 0o644  # readable by the service that loads it, as the model is
    assert main(["export-onnx", str(models["gqa"]), str(out), "--max-context", "100000"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert main(["export-onnx", str(models["gqa"]), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "is a directory; give the file to write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
