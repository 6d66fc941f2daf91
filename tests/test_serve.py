"""The daemon, driven over real HTTP on 127.0.0.1: the official openai client, errors, queueing,
disconnects, faults, metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import edge_runtime  # noqa: E402
from edge_runtime.serve.app import create_app  # noqa: E402
from tests.helpers import packed_llama  # noqa: E402
from tests.serve_support import (  # noqa: E402
    FAULT_SEED,
    HOLD_SEED,
    NAN_SEED,
    SLOW_SEEDS,
    ScriptedRuntime,
    Server,
    free_port,
    wait_until,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    return packed_llama(tmp_path_factory.mktemp("serve"), act="relu", seed=31)


@pytest.fixture(scope="module")
def server(model_dir):
    rt = edge_runtime.load(model_dir, backend="cpu", max_context=1024)
    rt.set_sparsity(1.0)
    with Server(create_app(rt, max_queue=3, max_tokens_limit=1000)) as s:
        yield s


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kw)


def test_openai_client_chat_and_completions(server):
    c = client(server)
    chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "open the door"}],
                                     max_tokens=8, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0
    comp = c.completions.create(model="m", prompt="the quick brown", max_tokens=6, temperature=0.7, seed=4)
    assert comp.usage.completion_tokens == 6 and isinstance(comp.choices[0].text, str)
    again = c.completions.create(model="m", prompt="the quick brown", max_tokens=6, temperature=0.7, seed=4)
    assert again.choices[0].text == comp.choices[0].text
    assert [m.id for m in c.models.list().data] == ["p"]
    assert chat.model == comp.model == "p"  # the request's "m" is ignored: one model is served, and named


def test_openai_client_streaming_equals_non_streaming(server):
    c = client(server)
    kw = {"model": "m", "messages": [{"role": "user", "content": "a robot"}], "max_tokens": 12,
          "temperature": 0.9, "seed": 11}
    whole = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_an_empty_prompt_starts_from_bos_as_the_api_does(server, model_dir):
    """The API generated from BOS for "" where the daemon answered 422."""
    r = _complete(server, prompt="", max_tokens=5, temperature=0)
    assert r.status_code == 200, r.text
    with edge_runtime.load(model_dir, backend="cpu", max_context=1024) as rt:
        rt.set_sparsity(1.0)
        assert r.json()["choices"][0]["text"] == rt.generate("", max_new_tokens=5).text
    assert r.json()["usage"]["prompt_tokens"] == 1


def test_stream_options_include_usage(server):
    """As OpenAI streams with include_usage: "usage" null on every chunk, then one with no choices and the counts
    of the same request answered whole; without it, no usage at all; with stream false, a 422."""
    c = client(server)
    kw = {"model": "m", "messages": [{"role": "user", "content": "a robot"}], "max_tokens": 7, "seed": 5}
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(ch.usage is None for ch in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == whole.choices[0].message.content
    plain = list(c.completions.create(model="m", prompt="the door", max_tokens=5, seed=5, stream=True,
                                      stream_options={"include_usage": False}))
    assert plain[-1].choices[0].finish_reason and all(ch.usage is None for ch in plain)
    counted = list(c.completions.create(model="m", prompt="the door", max_tokens=5, seed=5, stream=True,
                                        stream_options={"include_usage": True}))
    assert counted[-1].usage.completion_tokens == 5 and counted[-1].choices == []
    r = _complete(server, stream_options={"include_usage": True})
    assert r.status_code == 422 and "stream_options" in r.json()["error"]["message"]


@pytest.mark.parametrize(("body", "status"), [
    (b"{not json", 400),
    (json.dumps({"messages": "hello"}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "the lazy dog " * 400}]}).encode(), 400),
    (json.dumps({"messages": []}).encode(), 422),
])
def test_bad_requests_get_openai_errors(server, body, status):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if body.startswith(b"{not"):  # says what is wrong and where, names no field
        assert err["message"].startswith("the request body is not valid JSON (at character 1)") and not err["param"]


def _complete(server, **fields) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"prompt": "The lazy dog", "max_tokens": 12, **fields},
                      timeout=60)


def test_top_k_and_repetition_penalty_are_honoured(server, model_dir):
    """vLLM's and llama.cpp's sampling extensions: top_k 1 is greedy whatever the temperature, and a repetition
    penalty changes the text as Runtime.generate's does (both used to be dropped silently)."""
    greedy = _complete(server, temperature=0).json()["choices"][0]["text"]
    for seed in (1, 2):
        r = _complete(server, temperature=1.0, top_k=1, seed=seed)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    rt = edge_runtime.load(model_dir, backend="cpu", max_context=1024)
    rt.set_sparsity(1.0)
    expected = rt.generate("The lazy dog", max_new_tokens=12, repetition_penalty=0.05, stop=()).text
    got = _complete(server, temperature=0, repetition_penalty=0.05).json()["choices"][0]["text"]
    assert got == expected and got != greedy


@pytest.mark.parametrize(("field", "value"), [("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                              ("logprobs", 5), ("logit_bias", {"42": 10}), ("echo", True),
                                              ("best_of", 3), ("top_k", -2), ("top_k", 2**40), ("min_p", 0.1),
                                              ("response_format", {"type": "json_object"}),
                                              ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                              ("repetition_penalty", 0), ("typical_p", 0.5), ("min_tokens", 8),
                                              ("ignore_eos", True), ("repeat_penalty", 1.3), ("mirostat", 2),
                                              ("guided_json", {"type": "object"}), ("grammar", "root ::= \"a\""),
                                              ("json_schema", {"type": "string"}), ("stop_token_ids", [5]),
                                              ("temperature", "0.5"), ("temperature", True), ("top_k", "5"),
                                              ("top_k", 3.0), ("seed", "7"), ("max_tokens", 4.0)])
def test_fields_that_would_change_the_answer_are_refused(server, field, value):
    """Unsupported fields unless neutral (vLLM's and llama.cpp's extensions among them), and values of the wrong
    JSON type (a string temperature, a float top_k), which OpenAI's schema and the Python API refuse."""
    r = _complete(server, **{field: value})
    assert r.status_code == 422 and field in r.json()["error"]["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    """What clients send by default (the openai package's defaults, explicit neutral values, or null)."""
    r = _complete(server, presence_penalty=0, frequency_penalty=0.0, logprobs=None, logit_bias={"42": 0}, echo=False,
                  best_of=1, top_k=-1, suffix="")
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = _complete(server, top_k=None, repetition_penalty=None, logprobs=0, top_logprobs=None, min_p=0,
                  response_format={"type": "text"}, tools=[])
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = _complete(server, typical_p=1, min_tokens=0, ignore_eos=False, repeat_penalty=1.0, mirostat=0, tfs_z=1,
                  use_beam_search=False, dry_multiplier=0, xtc_probability=0.0, temperature=1, top_p=1,
                  guided_json=None, grammar="", stop_token_ids=[], top_n_sigma=-1)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_body_limit(server):
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def test_metrics_parse(server):
    from prometheus_client.parser import text_string_to_metric_families

    httpx.get(server.url + "/health")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    assert "edge_runtime_requests" in families and "edge_runtime_queue_depth" in families
    assert any(s.labels.get("endpoint") == "/health" for s in families["edge_runtime_requests"].samples)


def test_concurrent_clients_complete_or_429(model_dir):
    """8 clients x 5 requests, queue of 3, while a held job occupies the engine until the first 429:
    each request completes with exactly its own tokens, or is refused with 429 and Retry-After; none
    is lost, and at least one of each happens."""
    rt = ScriptedRuntime(model_dir, max_context=1024)
    reference = edge_runtime.load(model_dir, backend="cpu", max_context=1024)
    outcomes: list[tuple] = []
    lock = threading.Lock()

    def one(url: str, i: int, j: int) -> None:
        seed = 100 * i + j
        body = {"prompt": "the door", "max_tokens": 40, "temperature": 1.0, "seed": seed, "stream": j % 2 == 0}
        with httpx.Client(timeout=60) as h:
            if body["stream"]:
                with h.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        rec = (seed, r.status_code, r.headers.get("retry-after"), None)
                    else:
                        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                                       if line.startswith("data: {"))
                        rec = (seed, 200, None, text)
            else:
                r = h.post(url + "/v1/completions", json=body)
                rec = (seed, r.status_code, r.headers.get("retry-after"),
                       r.json()["choices"][0]["text"] if r.status_code == 200 else None)
        with lock:
            outcomes.append(rec)
            if rec[1] == 429:
                rt.release.set()  # the queue has overflowed: let the held job finish, the rest run

    with Server(create_app(rt, max_queue=3, max_tokens_limit=1000)) as s:
        held = threading.Thread(target=httpx.post, args=(s.url + "/v1/completions",),
                                kwargs={"json": {"prompt": "the", "max_tokens": 2, "seed": HOLD_SEED},
                                        "timeout": 60})
        held.start()
        wait_until(lambda: s.engine.busy, 10, "the held job starting")
        threads = [threading.Thread(target=lambda i=i: [one(s.url, i, j) for j in range(5)]) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        rt.release.set()
        held.join(30)
    assert len(outcomes) == 40
    assert {o[1] for o in outcomes} == {200, 429}
    assert all(o[2] and int(o[2]) >= 1 for o in outcomes if o[1] == 429)
    for seed, status, _, text in outcomes:
        if status == 200:
            assert text == reference.generate("the door", max_new_tokens=40, temperature=1.0, seed=seed).text


def test_max_queue_zero_runs_one_and_refuses_the_rest(model_dir):
    """--max-queue 0: no request waits, but the idle server still runs one (it answered 429 to every request)."""
    rt = ScriptedRuntime(model_dir, max_context=1024)
    with Server(create_app(rt, max_queue=0, max_tokens_limit=1000)) as s:
        body = {"prompt": "the", "max_tokens": 2}
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
        held = threading.Thread(target=httpx.post, args=(s.url + "/v1/completions",),
                                kwargs={"json": {**body, "seed": HOLD_SEED}, "timeout": 60})
        held.start()
        wait_until(lambda: s.engine.busy, 10, "the held job starting")
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        rt.release.set()
        held.join(30)


def test_disconnect_cancels(server):
    engine = server.app.state.engine
    before = engine.cancelled
    # long enough (about a second here) that the client is gone well before the end
    body = {"prompt": "the door", "max_tokens": 900, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk: closing the stream drops the connection
    deadline = time.time() + 10
    while engine.busy or engine.cancelled == before:
        assert time.time() < deadline, "the engine did not go idle after the client left"
        time.sleep(0.01)
    assert engine.cancelled == before + 1


def test_events_already_waiting_go_out_in_one_write():
    """sse() drains what the engine has queued into one chunk: the event loop runs between two writes, so a
    client that has gone is seen after one write, not after a backlog of them."""
    import asyncio
    from types import SimpleNamespace

    from edge_runtime.model.generate import GenerationResult, Piece
    from edge_runtime.serve import stream
    from edge_runtime.serve.engine import Job
    from edge_runtime.serve.routes_generate import FINISH

    counted: list[int] = []
    metrics = SimpleNamespace(tokens=SimpleNamespace(inc=counted.append))

    def chunk(text, finish, first):
        return {"text": text, "finish": finish, "first": first}

    async def run() -> list[str]:
        job = Job([1], {}, asyncio.get_running_loop())
        for i, text in enumerate(["a", "", "b", "c"]):
            job.events.put_nowait(Piece(i, text))
        job.events.put_nowait(GenerationResult("abc", [0, 1, 2, 3], 1, "length", 0.0, 0.0))
        return [c async for c in stream.sse(job, chunk, FINISH, metrics)]

    writes = asyncio.run(run())
    assert len(writes) == 1 and counted == [4]
    events = [e.removeprefix("data: ") for e in writes[0].split("\n\n") if e]
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert [b["text"] for b in bodies] == ["a", "b", "c", ""] and bodies[0]["first"] and not bodies[1]["first"]
    assert bodies[-1]["finish"] == "length"


def test_clients_leaving_mid_stream_leave_no_log_noise(server, caplog):
    """A client gone mid-stream: its events were written one by one without the event loop running between
    them, so the socket's loss was noticed only after a backlog of writes, each past the fifth logged by asyncio
    as "socket.send() raised exception." (28 lines for 10 clients)."""
    import logging

    engine = server.app.state.engine
    body = {"prompt": "the door", "max_tokens": 900, "temperature": 1.0, "seed": 3, "stream": True}
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        for _ in range(10):
            before = engine.cancelled
            with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/completions", json=body) as r:
                for k, _line in enumerate(r.iter_lines()):
                    if k >= 2:
                        break
            wait_until(lambda b=before: engine.cancelled > b and not engine.busy, 10, "the stream's job ending")
    assert not [r for r in caplog.records if "socket.send()" in r.getMessage()]


@pytest.fixture(scope="module")
def scripted(model_dir):
    with Server(create_app(ScriptedRuntime(model_dir, max_context=1024), max_queue=3, max_tokens_limit=1000)) as s:
        yield s


def test_abandoned_non_streamed_request_is_cancelled(scripted):
    """A client that gives up on a non-streamed request after 0.3 s: its job stops within 1 s."""
    engine = scripted.engine
    before, tokens_before = engine.cancelled, engine.tokens_generated
    body = {"prompt": "the door", "max_tokens": 1000, "temperature": 1.0, "seed": SLOW_SEEDS[0]}  # >= 5 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(scripted.url + "/v1/completions", json=body, timeout=0.3)  # closes the connection
    idle_after = wait_until(lambda: not engine.busy, 1.0, "the engine going idle after the client left")
    assert engine.cancelled == before + 1
    assert engine.tokens_generated - tokens_before < 1000
    print(f"abandoned non-streamed request: engine idle {idle_after:.3f} s after the client left")


def test_abandoned_queued_requests_never_run(scripted):
    """Requests queued behind a held job whose clients leave are skipped, not generated."""
    engine, rt = scripted.engine, scripted.app.state.serve.runtime
    before, done_before = engine.cancelled, engine.completed
    rt.release.clear()
    held = threading.Thread(target=httpx.post, args=(scripted.url + "/v1/completions",),
                            kwargs={"json": {"prompt": "the", "max_tokens": 2, "seed": HOLD_SEED}, "timeout": 60})
    held.start()
    wait_until(lambda: engine.busy, 10, "the held job starting")
    body = {"prompt": "the door", "max_tokens": 1000, "temperature": 1.0, "seed": 2}
    leavers = [threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, httpx.post, scripted.url
                                                             + "/v1/completions", json=body, timeout=0.3))
               for _ in range(3)]
    for t in leavers:
        t.start()
    for t in leavers:
        t.join(10)
    time.sleep(0.3)  # each job's wait polls its client every 0.1 s
    rt.release.set()
    held.join(30)
    wait_until(lambda: not engine.busy and engine.queued == 0, 2.0, "the queue draining")
    assert engine.cancelled == before + 3 and engine.completed == done_before + 1


def test_injected_fault_fails_only_its_request(scripted):
    url = scripted.url + "/v1/completions"
    bad = httpx.post(url, json={"prompt": "the", "max_tokens": 4, "seed": FAULT_SEED}, timeout=10)
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["type"] == "server_error" and "RuntimeError: injected fault" in err["message"]
    with httpx.stream("POST", url, json={"prompt": "the", "max_tokens": 4, "seed": FAULT_SEED, "stream": True},
                      timeout=10) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "injected fault" in json.loads(lines[0][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
    ok = httpx.post(url, json={"prompt": "the", "max_tokens": 4, "seed": 1}, timeout=10)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert scripted.engine.worker_alive and scripted.engine.failed >= 2


def test_a_model_error_is_a_500_and_counted(scripted):
    """A NumericalError (weights not finite): 500 model_error, or for a stream an error event with that code
    after the 200; counted in edge_runtime_failed_jobs (it is the model's fault, not the request's)."""
    url = scripted.url + "/v1/completions"
    failed = scripted.engine.failed
    bad = httpx.post(url, json={"prompt": "the", "max_tokens": 4, "seed": NAN_SEED}, timeout=10)
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "model_error"
    with httpx.stream("POST", url, json={"prompt": "the", "max_tokens": 4, "seed": NAN_SEED, "stream": True},
                      timeout=10) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and json.loads(lines[0][6:])["error"]["code"] == "model_error"
    assert scripted.engine.failed == failed + 2


@pytest.mark.parametrize("sampling", [
    {"temperature": 1e-308}, {"temperature": 5e-324}, {"temperature": 1e-300, "top_p": 1e-300},
    {"temperature": 2.0, "top_p": 5e-324}, {"temperature": 0.0}])
def test_extreme_but_valid_sampling_values(server, sampling):
    """Denormal and tiny temperatures are greedy in effect; they used to raise inside the sampler."""
    body = {"prompt": "the quick brown", "max_tokens": 3, "seed": 3, **sampling}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    greedy = httpx.post(server.url + "/v1/completions", json={**body, "temperature": 0.0}, timeout=30)
    if sampling.get("temperature", 1.0) < 1e-30:
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("raw", [b'"temperature": NaN', b'"temperature": Infinity', b'"temperature": 1e999',
                                 b'"top_p": -0.0', b'"temperature": -5e-324'])
def test_non_finite_or_negative_sampling_values_are_422(server, raw):
    body = b'{"prompt": "the", "max_tokens": 2, ' + raw + b"}"
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] in ("temperature", "top_p")


@pytest.mark.parametrize("where", ["prompt", "content", "stop"])
def test_lone_surrogate_is_422(server, where):
    text = "a\ud800b"
    if where == "content":
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    else:
        url, body = "/v1/completions", {"prompt": text if where == "prompt" else "the", "max_tokens": 2}
        if where == "stop":
            body["stop"] = [text]
    r = httpx.post(server.url + url, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith(where if where != "content" else "messages")


def test_stop_as_one_string_or_a_list(server):
    """OpenAI clients send stop as a string or a list; a stop the text reaches ends it there."""
    body = {"prompt": "the", "max_tokens": 24, "temperature": 0}
    full = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full.strip()[:2]
    assert len(stop) == 2  # the model says something to stop at
    for value in (stop, [stop, "zzzq"]):
        r = httpx.post(server.url + "/v1/completions", json={**body, "stop": value})
        choice = r.json()["choices"][0]
        assert r.status_code == 200 and choice["finish_reason"] == "stop"
        assert choice["text"] == full[:full.index(stop)]


@pytest.mark.parametrize("stop, param, message", [
    ("", "stop.0", "at least 1 character"), (["ok", ""], "stop.1", "at least 1 character"),
    ("x" * 65, "stop.0", "at most 64 characters"), (["a"] * 5, "stop", "at most 4 items"),
    (5, "stop", "must be a string or a list of strings"),
])
def test_bad_stop_is_422_in_the_request_terms(server, stop, param, message):
    """The error names the request's field, not pydantic's internals (validator reprs, union member tags)."""
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2, "stop": stop})
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == param and message in err["message"]
    assert "[" not in err["message"] and "0x" not in err["message"] and "Value error" not in err["message"]


def test_metric_labels_are_bounded(server):
    """Random paths are all counted as "other": the exposition does not grow with them."""
    with httpx.Client() as h:
        for i in range(50):
            h.get(server.url + f"/no/such/{i}")
        size = len(h.get(server.url + "/metrics").text)
        for i in range(50, 250):
            h.get(server.url + f"/no/such/{i}?x={i}")
        text = h.get(server.url + "/metrics").text
    assert len(text) <= size + 32  # the counters' digits only
    assert "/no/such" not in text and 'endpoint="other",status="404"' in text


def test_pathological_chat_template_does_not_freeze(model_dir, tmp_path):
    """Nested range(100000) loops: the render is killed at its deadline; meanwhile /health answers."""
    import shutil

    import yaml

    m = shutil.copytree(model_dir, tmp_path / "m")
    manifest = yaml.safe_load((m / "manifest.yaml").read_text())
    manifest["chat_template"] = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                                 "{{ messages[0].content }}")
    (m / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    rt = edge_runtime.load(m, backend="cpu", max_context=128, profile=None)
    with Server(create_app(rt)) as s:
        result: dict = {}
        chat = threading.Thread(target=lambda: result.update(r=httpx.post(
            s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)))
        t0 = time.monotonic()
        chat.start()
        time.sleep(0.3)
        health = httpx.get(s.url + "/health", timeout=1)
        assert health.status_code == 200 and health.json()["busy"] is False
        chat.join(30)
        took = time.monotonic() - t0
        assert result["r"].status_code == 400 and "longer than" in result["r"].json()["error"]["message"]
        assert took < 5
        again = httpx.post(s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=10)
        assert again.status_code == 200


def test_api_key(model_dir):
    rt = edge_runtime.load(model_dir, backend="cpu", max_context=128)
    with Server(create_app(rt, api_key="sekrit")) as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        ok = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200


def test_sigterm_finishes_stream_and_exits(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--backend", "cpu", "--max-context", "512",
                             "--shutdown-grace", "60"],  # the generation under way may finish
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
        body = {"prompt": "the door", "max_tokens": 300, "temperature": 1.0, "seed": 2, "stream": True}
        lines: list[str] = []
        with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and not lines:
                    os.kill(proc.pid, signal.SIGTERM)  # mid-stream
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"  # ran to its end
        # uvicorn re-raises the signal after its graceful shutdown: exit by SIGTERM, as daemons do
        assert proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stopping_ends_queued_requests_at_once_and_the_running_one_after_the_grace(model_dir):
    """What SIGTERM or Ctrl-C does (uvicorn's should_exit, set here since a thread gets no signals): the queued
    request gets a 503 at once, the running stream an error event after the grace, and the daemon is gone soon
    after. Under plain uvicorn the queued request started after the signal and both ran to the end, or to
    uvicorn's forced cancel 30 s later."""
    from edge_runtime.serve.server import Daemon

    app = create_app(ScriptedRuntime(model_dir, max_context=1024), max_queue=3, max_tokens_limit=1000)
    port, engine = free_port(), app.state.engine
    daemon = Daemon(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"), engine, grace_s=0.5)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    wait_until(lambda: daemon.started, 20, "the daemon starting")
    url, lines, queued = f"http://127.0.0.1:{port}/v1/completions", [], {}

    def waiting():
        queued["r"] = httpx.post(url, json={"prompt": "the", "max_tokens": 2}, timeout=60)
        queued["t"] = time.monotonic()

    body = {"prompt": "the door", "max_tokens": 1000, "temperature": 1.0, "seed": SLOW_SEEDS[0], "stream": True}
    waiter = threading.Thread(target=waiting)
    with httpx.Client(timeout=60) as h, h.stream("POST", url, json=body) as r:  # >= 5 s of generation
        for line in r.iter_lines():
            if line.startswith("data: {") and not lines:
                waiter.start()
                wait_until(lambda: engine.queued == 1, 10, "the second request queuing")
                t0 = time.monotonic()
                daemon.should_exit = True
            if line:
                lines.append(line)
    stream_ended = time.monotonic() - t0
    waiter.join(10)
    thread.join(20)
    assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "shutting_down"
    assert queued["t"] - t0 < 2.0  # at once, not after the running job (>= 5 s of generation)
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])["error"]
    assert err["code"] == "shutting_down" and "stopped after" in err["message"]
    assert 0.5 <= stream_ended < 3.0 and not thread.is_alive()
    assert engine.completed == 0 and engine.cancelled == 2


def test_health_shows_the_live_selection(tmp_path):
    """The default model on a fake Jetson profile: /health reports the policy's selection, and after a power-mode
    switch (nothing reloaded) the new mode and knobs."""
    rt = edge_runtime.load(profile="jetson-orin-nano-8gb", power_mode="15W", backend="cpu", max_context=256)
    with Server(create_app(rt, max_queue=2, max_tokens_limit=64)) as s:
        before = httpx.get(s.url + "/health").json()["runtime"]
        assert before["profile"] == "jetson-orin-nano-8gb" and before["power_mode"] == "15W"
        assert before["knobs"] == rt.decoder.alphas and before["selection"]["power_mode"] == "15W"
        rt.set_power_mode("7W")
        after = httpx.get(s.url + "/health").json()["runtime"]
        assert after["power_mode"] == "7W" and after["knobs"] == rt.decoder.alphas
        assert after["knobs"] != before["knobs"]  # the slower mode reads fewer bytes (issue 15's policy)
        assert after["selection"]["ffn_bytes_fraction"] < before["selection"]["ffn_bytes_fraction"]
