"""Hypothesis against the running daemon (uvicorn on 127.0.0.1, real HTTP): extreme floats (0, denormals,
1e308, NaN, infinities, negatives), empty, huge and invalid strings (lone surrogates, NUL), odd JSON types,
odd bodies, paths and methods. No 5xx except the injected fault, no hang (each request has 20 s), and the
engine answers normally afterwards."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_runtime.serve.app import create_app  # noqa: E402
from tests.helpers import packed_llama  # noqa: E402
from tests.serve_support import FAULT_SEED, ScriptedRuntime, Server  # noqa: E402

EXAMPLES = 300
FLOATS = st.sampled_from([0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1e-308, 1e-300, 1e-30, 0.5, 1.0, 2.0,
                          2.0000000000000004, 1e308, 1.7976931348623157e308, float("nan"), float("inf"),
                          float("-inf"), -1.0, -5e-324]) | st.floats()
INTS = st.sampled_from([0, 1, 2, 3, -1, FAULT_SEED, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]) | st.integers()
STRINGS = st.sampled_from(["", "the", "a\ud800b", "\udfff", "\x00", "é" * 3, "the door " * 40_000,
                           "x" * 1_100_000]) | st.text(max_size=40)
ODD = st.sampled_from([None, True, False, [], {}, [1, "a"], {"a": 1}])
VALUE = st.one_of(FLOATS, INTS, STRINGS, ODD)
SAMPLING = {"max_tokens": st.one_of(st.integers(1, 4), INTS, VALUE), "temperature": st.one_of(FLOATS, VALUE),
            "top_p": st.one_of(FLOATS, VALUE), "seed": st.one_of(INTS, VALUE), "stop": st.one_of(
                STRINGS, st.lists(STRINGS, max_size=6), VALUE), "stream": st.one_of(st.booleans(), VALUE),
            "n": st.one_of(st.just(1), VALUE), "model": VALUE, "max_completion_tokens": VALUE}
MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]) | VALUE,
                                           "content": STRINGS | VALUE}), VALUE)
COMPLETION = st.fixed_dictionaries({}, optional={"prompt": st.one_of(STRINGS, VALUE), **SAMPLING})
CHAT = st.fixed_dictionaries({}, optional={"messages": st.one_of(st.lists(MESSAGE, max_size=4), VALUE), **SAMPLING})
# valid bodies at the edges of every range: these reach the sampler and the engine
EDGE_SAMPLING = {"max_tokens": st.integers(1, 4), "temperature": st.sampled_from([0.0, 5e-324, 1e-308, 1e-300, 1.0,
                                                                                  2.0]) | st.floats(0, 2),
                 "top_p": st.sampled_from([5e-324, 1e-300, 0.5, 1.0]) | st.floats(0, 1, exclude_min=True),
                 "seed": st.sampled_from([0, FAULT_SEED, 2**63 - 1]) | st.integers(0, 2**63 - 1),
                 "stream": st.booleans(), "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4)}
EDGE_TEXT = st.sampled_from(["the", "é", "\x00", "the door " * 20]) | st.text(min_size=1, max_size=40)
EDGE = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/completions"),
              st.fixed_dictionaries({"prompt": EDGE_TEXT}, optional=EDGE_SAMPLING)),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                     "content": EDGE_TEXT}), min_size=1, max_size=3)},
        optional=EDGE_SAMPLING)))
REQUEST = st.one_of(
    EDGE,
    st.tuples(st.just("POST"), st.just("/v1/completions"), COMPLETION),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), CHAT),
    st.tuples(st.sampled_from(["POST", "PUT"]), st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              VALUE),  # a body that is not an object at all
    st.tuples(st.sampled_from(["GET", "DELETE", "POST"]),
              st.sampled_from(["/health", "/metrics", "/v1/models", "/v1/", "/%ff", "/v1/completions/x"])
              | st.text("abc/%.?&=", max_size=20).map(lambda p: "/" + p), ODD),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("torch")
    model = packed_llama(tmp_path_factory.mktemp("fuzz"), act="relu", seed=13)
    with Server(create_app(ScriptedRuntime(model, max_context=256), max_queue=4, max_tokens_limit=4)) as s:
        yield s


def _injected(body, response_text: str) -> bool:
    return isinstance(body, dict) and body.get("seed") == FAULT_SEED and "injected fault" in response_text


def test_fuzz_endpoints(server):
    by_status: dict[int, int] = {}

    @given(request=REQUEST)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def one(request):
        method, path, body = request
        content = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals, surrogates as \\ud800
        # a hang fails with httpx.TimeoutException
        with httpx.Client(timeout=20) as h, h.stream(method, server.url + path, content=content,
                                                     headers={"content-type": "application/json"}) as r:
            text = r.read().decode("utf-8", "replace")
        by_status[r.status_code] = by_status.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            assert r.status_code == 500 and _injected(body, text), (method, path, content[:300], text[:300])
        if r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", ""):
            assert text.rstrip().endswith("data: [DONE]")
            assert "server_error" not in text or _injected(body, text), text[:300]

    one()
    print(f"fuzz: {sum(by_status.values())} requests, by status {dict(sorted(by_status.items()))}")
    assert sum(by_status.values()) >= EXAMPLES
    assert by_status.get(200, 0) >= 10 and by_status.get(422, 0) >= 10  # generation and refusal both reached
    engine = server.engine
    assert engine.worker_alive and not engine.busy and engine.queued == 0
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "the", "max_tokens": 4, "seed": 1}, timeout=10)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.url + "/health", timeout=5).json()["status"] == "ok"
