"""uvicorn's server with the daemon's way of stopping. On SIGTERM or SIGINT uvicorn waits for every open
response before it shuts the app down, and after its graceful timeout cancels them (asyncio tracebacks, a
stream cut without an error). So at the signal the engine is told first: queued jobs end at once (a 503, or
an error event for a stream), the running generation gets a grace period and is then stopped at its next
token with an error its client sees. Every response ends at the first token past the grace (a prefill under
way finishes first), and the process exits."""

from __future__ import annotations

import socket

import uvicorn

from edge_runtime.serve.engine import Engine

FORCE_AFTER_S = 10.0  # past the grace, uvicorn's own cancel: a response that never ends


class Daemon(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float):
        config.timeout_graceful_shutdown = int(grace_s + FORCE_AFTER_S)
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.interrupt(self.grace_s)
        await super().shutdown(sockets)
