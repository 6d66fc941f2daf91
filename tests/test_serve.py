"""The daemon, driven over real HTTP on 127.0.0.1: the official openai client, errors, queueing,
disconnects, metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread of this process, so that tests can look at the engine."""

    def __init__(self, app):
        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


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


def test_openai_client_streaming_equals_non_streaming(server):
    c = client(server)
    kw = {"model": "m", "messages": [{"role": "user", "content": "a robot"}], "max_tokens": 12,
          "temperature": 0.9, "seed": 11}
    whole = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


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


def test_concurrent_clients_complete_or_429(server, model_dir):
    """8 clients x 5 requests, queue of 3: each request completes with exactly its own tokens, or is
    refused with 429 and Retry-After; none is lost."""
    rt = edge_runtime.load(model_dir, backend="cpu", max_context=1024)
    rt.set_sparsity(1.0)
    outcomes: list[tuple] = []
    lock = threading.Lock()

    def one(i: int, j: int) -> None:
        seed = 100 * i + j
        body = {"prompt": "the door", "max_tokens": 40, "temperature": 1.0, "seed": seed, "stream": j % 2 == 0}
        with httpx.Client(timeout=60) as h:
            if body["stream"]:
                with h.stream("POST", server.url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        rec = (seed, r.status_code, r.headers.get("retry-after"), None)
                    else:
                        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                                       if line.startswith("data: {"))
                        rec = (seed, 200, None, text)
            else:
                r = h.post(server.url + "/v1/completions", json=body)
                rec = (seed, r.status_code, r.headers.get("retry-after"),
                       r.json()["choices"][0]["text"] if r.status_code == 200 else None)
        with lock:
            outcomes.append(rec)

    threads = [threading.Thread(target=lambda i=i: [one(i, j) for j in range(5)]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 40
    assert {o[1] for o in outcomes} <= {200, 429}
    assert all(o[2] and int(o[2]) >= 1 for o in outcomes if o[1] == 429)
    done = [o for o in outcomes if o[1] == 200]
    assert done
    for seed, _, _, text in done:
        assert text == rt.generate("the door", max_new_tokens=40, temperature=1.0, seed=seed).text


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
                             "--port", str(port), "--backend", "cpu", "--max-context", "512"],
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
