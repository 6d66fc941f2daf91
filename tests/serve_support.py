"""Shared by the daemon's tests: uvicorn in a thread of the test process, and a Runtime subclass with
scripted behaviours chosen by the request's seed (a fault, a job that waits for the test's signal, and
a slow device: the test model decodes thousands of tokens/s, a Jetson with a 7B model about 20)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from edge_runtime.errors import NumericalError
from edge_runtime.pack.loader import load_packed
from edge_runtime.runtime import Runtime

FAULT_SEED = 4242  # the job raises RuntimeError("injected fault") inside the engine's worker
NAN_SEED = 4444  # the job raises NumericalError, as a model whose weights are not finite does
HOLD_SEED = 4343  # the job waits until ScriptedRuntime.release is set (at most 30 s), then generates
SLOW_SEEDS = range(5000, 6000)  # every token takes 5 ms more


class ScriptedRuntime(Runtime):
    def __init__(self, model_dir, max_context: int = 256):
        super().__init__(load_packed(model_dir), backend="cpu", max_context=max_context)
        self.release = threading.Event()

    def stream_events(self, prompt, **kw):
        if kw.get("seed") == FAULT_SEED:
            raise RuntimeError("injected fault")
        if kw.get("seed") == NAN_SEED:
            raise NumericalError("the model computed a NaN or infinite logit at position 3")
        if kw.get("seed") == HOLD_SEED:
            self.release.wait(30)
        for item in super().stream_events(prompt, **kw):
            if kw.get("seed") in SLOW_SEEDS:
                time.sleep(0.005)
            yield item


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread of this process, so that tests can look at the engine."""

    def __init__(self, app):
        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical"))
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

    @property
    def engine(self):
        return self.app.state.engine


def wait_until(cond, timeout: float, what: str) -> float:
    """Seconds until cond() held; fails the test after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.005)
    return time.monotonic() - t0
