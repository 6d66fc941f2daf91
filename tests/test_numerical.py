"""A model whose weights are not finite: every path stops with a NumericalError instead of answering token 0
over and over (greedy) or a plausible-looking random draw (sampling)."""

from __future__ import annotations

import re
import shutil
import warnings

import numpy as np
import pytest

import edge_runtime
from edge_runtime.backends.cpu import CpuBackend
from edge_runtime.cli import main
from edge_runtime.errors import NumericalError
from edge_runtime.model.sampling import NO_TOKEN, SamplingParams
from edge_runtime.paths import DEFAULT_MODEL_DIR
from edge_runtime.serve.handlers import ServeError


def poisoned_copy(dst, file: str, key: str, value: float):
    """The default model with one element of one stored tensor set to value (its checksum now stale: load it
    with verify=False, as a model damaged before its manifest was written would load)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    shutil.copytree(DEFAULT_MODEL_DIR, dst)
    path = dst / file
    with safe_open(path, "np") as f:
        meta = f.metadata()
    arrays = load_file(path)
    arrays[key].reshape(-1)[arrays[key].size // 3] = value
    save_file(arrays, path, metadata=meta)
    return dst


@pytest.fixture(scope="module")
def nan_scale(tmp_path_factory):
    return poisoned_copy(tmp_path_factory.mktemp("nan") / "m", "layer_002.safetensors", "layers.2.ffn.up.scale",
                         np.nan)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_p": 0.9, "seed": 3}])
def test_generation_from_a_nan_weight_stops(nan_scale, sampling):
    rt = edge_runtime.load(nan_scale, profile=None, backend="cpu", verify=False, warm_up=False)
    rt.set_sparsity(None)
    with pytest.raises(NumericalError, match="NaN or infinite logit at position"):
        rt.generate("The old man looked at the sea", max_new_tokens=8, **sampling)


def test_load_with_warm_up_refuses_the_model(nan_scale, monkeypatch):
    """The warm-up generation is the first to see the NaN: a daemon never starts serving such a model. The
    runtime it built is closed (its watcher and its backend's memory), not left to the garbage collector."""
    from edge_runtime.runtime import Runtime

    closed = []
    real_close = Runtime.close
    monkeypatch.setattr(Runtime, "close", lambda self: (closed.append(self), real_close(self))[1])
    with pytest.raises(NumericalError):
        edge_runtime.load(nan_scale, profile=None, backend="cpu", verify=False)
    assert len(closed) == 1 and closed[0].decoder is None


def test_cli_says_so_in_one_line(nan_scale, capsys):
    code = main(["generate", "--model", str(nan_scale), "--no-verify", "--sparsity", "off", "--prompt", "Hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "NaN or infinite logit" in err[0]


def test_daemon_answers_500_model_error():
    e = ServeError.from_job_error(NumericalError("the model computed a NaN"))
    assert e.status == 500 and e.code == "model_error" and e.body()["error"]["type"] == "server_error"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=5, seed=1)])
def test_cpu_sample_step_writes_no_token(bad, sampling):
    rt = edge_runtime.load(None, profile=None, backend="cpu", warm_up=False)
    be: CpuBackend = rt.backend
    be.begin([1, 2], sampling)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, rt.config.vocab_size)).astype(np.float32)
    be.sample(logits)
    assert be.read_token() >= 0  # finite: a real id
    seen = be.state.seen.copy()
    logits[0, rng.integers(rt.config.vocab_size)] = bad
    be.sample(logits)
    assert be.read_token() == NO_TOKEN and np.array_equal(be.state.seen, seen)


# ---- conversion ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_relu(tmp_path_factory):
    pytest.importorskip("torch")
    from tests.helpers import make_llama

    root = tmp_path_factory.mktemp("hf")
    make_llama(root / "hf", act="relu")
    return root / "hf"


def edited_checkpoint(src, dst, key: str, edit):
    """A copy of the HF checkpoint with tensor `key` replaced by edit(tensor)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    with safe_open(path, "np") as f:
        meta = f.metadata()
    arrays = load_file(path)
    arrays[key] = edit(arrays[key].copy())
    save_file(arrays, path, metadata=meta)
    return dst


def _poke(value):
    def edit(a):
        a.reshape(-1)[a.size // 2] = value
        return a
    return edit


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_convert_refuses_a_checkpoint_that_is_not_finite(hf_relu, tmp_path, value):
    from edge_runtime.errors import ModelFormatError
    from edge_runtime.pack.convert import convert

    hf = edited_checkpoint(hf_relu, tmp_path / "hf", "model.layers.1.mlp.up_proj.weight", _poke(value))
    with pytest.raises(ModelFormatError, match=r"up_proj.weight holds 1 NaN or infinite value\(s\) of 10240"):
        convert(hf, tmp_path / "out", "int8", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("encoding", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("key, value", [("model.norm.weight", 1e5), ("model.layers.0.mlp.up_proj.weight", 1e7)])
def test_convert_refuses_what_fp16_storage_overflows(hf_relu, tmp_path, encoding, key, value):
    """A norm weight of 1e5: every encoding but fp32 stores norms in fp16 (65504 at most). A matrix weight of 1e7:
    fp16 weights overflow, and so do int8 and int4 scales (1e7 / 127, 1e7 / 7)."""
    from edge_runtime.errors import ModelFormatError
    from edge_runtime.pack.convert import convert

    hf = edited_checkpoint(hf_relu, tmp_path / "hf", key, _poke(value))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's cast warning would come first, with no name
        with pytest.raises(ModelFormatError, match=re.escape(f"{key} has values up to {value:.3g}, past the 65504")):
            convert(hf, tmp_path / "out", encoding, progress=False)
    convert(hf, tmp_path / "fp32", "fp32", progress=False)  # what the message advises


def test_convert_refuses_weights_fp16_scales_lose(hf_relu, tmp_path):
    """up_proj times 1e-5 (and down_proj times 1e5: the same function): int8 row scales fall below fp16's
    smallest value and the rows would be stored as zeros."""
    from edge_runtime.errors import ModelFormatError
    from edge_runtime.pack.convert import convert

    hf = edited_checkpoint(hf_relu, tmp_path / "hf", "model.layers.0.mlp.up_proj.weight", lambda a: a * 1e-5)
    with pytest.raises(ModelFormatError, match="up_proj.weight would be stored with 100% error"):
        convert(hf, tmp_path / "out", "int8", progress=False)
    convert(hf, tmp_path / "fp32", "fp32", progress=False)


def test_perplexity_of_a_nan_model_is_an_error_not_nan(nan_scale):
    """eval printed "ppl_dense": NaN (not valid JSON) and calibrate wrote ppl_dense: .nan, both exiting 0."""
    from edge_runtime.evaluate import evaluate_text
    from edge_runtime.scoring import nll

    rt = edge_runtime.load(nan_scale, profile=None, backend="cpu", verify=False, warm_up=False)
    with pytest.raises(NumericalError, match="NaN or infinite logit on the text"):
        evaluate_text(rt, "The old man looked at the sea. " * 20, None, window=64, max_tokens=128)
    logits = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    assert np.isfinite(nll(logits, np.array([1, 2, 3]))).all()
    logits[1, 4] = np.inf
    with pytest.raises(NumericalError):
        nll(logits, np.array([1, 2, 3]))
