"""Pure ASGI middleware (no BaseHTTPMiddleware: it hides the client's disconnect from the routes, so a
non-streamed request whose client left would run to its end).

BodyLimit: refuse request bodies over `limit` bytes with 413, before parsing them.
Gate: the API key on /v1/* (compared in constant time) and the request counter by endpoint and status.
"""

from __future__ import annotations

import hmac

from edge_runtime.serve.handlers import ServeError
from edge_runtime.serve.metrics import Metrics


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or {}).get(b"content-length")
        too_big = ServeError(413, f"request body over {self.limit} bytes", "body_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big.response()(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_big
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, limited_receive, tracking_send)
        except ServeError as e:  # raised while the body was being read (chunked uploads have no length)
            if started:
                raise
            return await e.response()(scope, receive, send)


class Gate:
    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def _authorised(self, scope) -> bool:
        if self.expected is None or not scope["path"].startswith("/v1/"):
            return True
        got = dict(scope.get("headers") or {}).get(b"authorization", b"")
        return hmac.compare_digest(got, self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what is counted when the app fails before it starts a response

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not self._authorised(scope):
                return await ServeError(401, "invalid or missing API key").response()(scope, receive, counting_send)
            return await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(scope["path"], status)
