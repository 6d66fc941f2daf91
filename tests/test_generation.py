"""Sampling, stop strings, EOS and the CLI's JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.cli import main
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.sampling import Sampler, SamplingParams
from edge_runtime.runtime import load
from tests.helpers import packed_llama


def _logits(seed=0, n=50):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 3


def test_greedy_is_argmax():
    z = _logits()
    assert Sampler(SamplingParams())(z, []) == int(np.argmax(z))


def test_seed_reproducible_and_top_k_respected():
    z = _logits(1)
    draws = [Sampler(SamplingParams(temperature=1.0, top_k=3, seed=s))(z, []) for s in range(200)]
    assert set(draws) <= set(np.argsort(-z)[:3].tolist())
    assert len(set(draws)) > 1
    a = [Sampler(SamplingParams(temperature=0.9, seed=42))(z, []) for _ in range(5)]
    assert len(set(a)) == 1


def test_top_p_keeps_smallest_nucleus():
    z = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = {Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=s))(z, []) for s in range(300)}
    assert draws == {0, 1}


def test_repetition_penalty_hf_semantics():
    z = np.array([2.0, -1.0, 1.9], dtype=np.float32)
    assert Sampler(SamplingParams(repetition_penalty=1.2))(z, [0]) == 2  # 2.0 / 1.2 < 1.9
    assert Sampler(SamplingParams(repetition_penalty=1.2))(z, [2]) == 0


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}])
def test_bad_sampling_params(bad):
    with pytest.raises(EdgeRuntimeError):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    pytest.importorskip("torch")
    return load(packed_llama(tmp_path_factory.mktemp("gen"), "fp16", act="relu", seed=9), backend="cpu")


def test_stop_string_truncates_and_is_not_streamed(rt):
    full = rt.generate("the quick", max_new_tokens=24, temperature=1.0, seed=3)
    assert len(full.text) > 6
    stop = full.text[3:6]
    res = rt.generate("the quick", max_new_tokens=24, temperature=1.0, seed=3, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.find(stop)]


def test_eos_ends_generation(rt):
    """Force EOS through the config: the model's first greedy token becomes its EOS."""
    first = rt.generate("the quick", max_new_tokens=1).token_ids[0]
    saved = rt.decoder.cfg
    rt.decoder.cfg = type(saved)(**{**saved.__dict__, "eos_token_ids": (first,)})
    try:
        res = rt.generate("the quick", max_new_tokens=10)
    finally:
        rt.decoder.cfg = saved
    assert res.finish_reason == "eos" and res.token_ids == []


def test_max_new_tokens(rt):
    res = rt.generate("the quick", max_new_tokens=7)
    assert len(res.token_ids) == 7 and res.finish_reason == "length"


def test_generate_json(capsys, rt):
    code = main(["generate", "--model", str(rt.model.path), "--prompt", "a robot", "--max-new-tokens", "6",
                 "--sparsity", "on", "--alpha", "1.1", "--recall", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(out["token_ids"]) == 6 and isinstance(out["text"], str) and out["tokens_per_s"] > 0
    assert out["ffn"]["decode_steps"] == 5 and 0 <= out["ffn"]["recall"] <= 1


def test_info_json(capsys, rt):
    assert main(["info", str(rt.model.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["arch"] == "llama" and info["encoding"] == "fp16"
    assert info["tensor_encodings"]["signbits"] == 2


def test_repetition_penalty_sees_prompt_and_generated_ids(rt):
    """Generation with a penalty equals a host loop that keeps the history as a list (the backend derives it
    from the decode state's `seen` set), and the penalty changes the output."""
    prompt, n, params = [1, 17, 42, 99, 17], 16, SamplingParams(repetition_penalty=3.0)
    got = rt.generate(prompt, max_new_tokens=n, repetition_penalty=3.0, stop=()).token_ids
    dec, sampler, history = rt.decoder, Sampler(params), list(prompt)
    dec.reset()
    logits = dec.prefill(prompt, last_only=True)[-1]
    expected = []
    for _ in range(len(got)):
        tok = sampler(logits, history)
        expected.append(tok)
        history.append(tok)
        logits = dec.forward([tok])[-1]
    assert got == expected
    assert got != rt.generate(prompt, max_new_tokens=n, stop=()).token_ids[:len(got)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_result_text_is_the_streamed_text_when_decoded_after_the_steps(seed):
    """generate() decodes its text after the last step (text_per_token=False); the text and ids equal what the
    per-token stream gives, and only the final piece carries text."""
    rt = load(None, profile=None, backend="cpu")
    kw = dict(max_new_tokens=40, temperature=1.2, top_k=50, seed=seed)
    streamed = list(rt.stream_events("Once upon a time", **kw))
    whole = list(rt.stream_events("Once upon a time", text_per_token=False, **kw))
    res, res_whole = streamed[-1], whole[-1]
    assert res_whole.token_ids == res.token_ids and len(res.token_ids) > 1
    assert res_whole.text == res.text == "".join(p.text for p in streamed[:-1]) and res.text
    assert all(p.text == "" for p in whole[:-2]) and whole[-2].text == res.text and not whole[-2].new_token
    assert rt.generate("Once upon a time", **kw).text == res.text
    stopped = rt.generate("Once upon a time", stop=[res.text[5:8]], **kw)  # stop strings: text between steps
    assert stopped.finish_reason == "stop" and stopped.text == res.text[:res.text.find(res.text[5:8])]


def test_a_command_says_when_it_must_compile_the_cpu_kernels(capsys, rt, monkeypatch):
    """The first command after an install compiles the cpu kernels for about 25 s: it says so in one line on
    stderr rather than look hung, and says nothing once they are cached."""
    import edge_runtime.backends.jit as jit

    argv = ["generate", "--model", str(rt.model.path), "--prompt", "a robot", "--max-new-tokens", "2",
            "--backend", "cpu"]
    for pending in (True, False):
        monkeypatch.setattr(jit, "compile_pending", lambda fn, pending=pending: pending)
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert ("compiling the cpu kernels" in err) is pending
