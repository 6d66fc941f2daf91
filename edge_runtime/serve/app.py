"""FastAPI application: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.generate import GenerationResult, Piece
from edge_runtime.runtime import Runtime
from edge_runtime.serve.engine import Engine, Job, QueueFull
from edge_runtime.serve.schemas import ChatCompletionRequest, CompletionRequest, _Sampling, error_body

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "deadline": "length",
          "cancelled": "stop"}


class ServeError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before parsing them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            resp = JSONResponse(error_body(f"request body over {self.limit} bytes", code="body_too_large"), 413)
            return await resp(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ServeError(413, f"request body over {self.limit} bytes", "body_too_large")
            return message

        return await self.app(scope, limited_receive, send)


def _metrics(registry: CollectorRegistry, engine: Engine) -> dict:
    m = {
        "requests": Counter("edge_runtime_requests", "HTTP requests by endpoint and status",
                            ["endpoint", "status"], registry=registry),
        "tokens": Counter("edge_runtime_generated_tokens", "tokens generated", registry=registry),
    }
    Gauge("edge_runtime_queue_depth", "requests waiting", registry=registry).set_function(lambda: engine.queued)
    Gauge("edge_runtime_busy", "1 while a generation runs", registry=registry).set_function(
        lambda: float(engine.busy))
    Gauge("edge_runtime_decode_tokens_per_second", "tokens/s of the last finished request",
          registry=registry).set_function(lambda: engine.last_tokens_per_s)
    return m


def create_app(runtime: Runtime, api_key: str | None = None, max_queue: int = 8, max_tokens_limit: int = 512,
               max_body_bytes: int = 1 << 20, default_max_tokens: int = 128) -> FastAPI:
    engine = Engine(runtime, max_queue)
    registry = CollectorRegistry()
    metrics = _metrics(registry, engine)
    model_id = runtime.name

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="edge-runtime", version="1", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ServeError)
    async def _serve_error(_req, exc: ServeError):
        type_ = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
        return JSONResponse(error_body(str(exc), type_, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        status = 400 if first.get("type") == "json_invalid" else 422
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(msg, param=where or None), status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            resp = JSONResponse(error_body("invalid or missing API key", "authentication_error"), 401)
        else:
            try:
                resp = await call_next(request)
            except ServeError as e:  # raised by the body limit while the body was being read
                resp = JSONResponse(error_body(str(e), code=e.code), e.status)
        metrics["requests"].labels(request.url.path, str(resp.status_code)).inc()
        return resp

    def _params(req: _Sampling, max_tokens: int | None) -> dict:
        n = max_tokens or default_max_tokens
        if n > max_tokens_limit:
            raise ServeError(400, f"max_tokens {n} is over this server's limit of {max_tokens_limit}",
                             "max_tokens_too_large")
        return {"max_new_tokens": n, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                "stop": req.stop_list()}

    def _submit(prompt, params: dict, stream: bool) -> Job:
        try:
            ids, implied_stop = runtime.prepare_prompt(prompt)
        except EdgeRuntimeError as e:
            raise ServeError(400, str(e)) from None
        ctx = runtime.decoder.max_context
        if len(ids) >= ctx:
            raise ServeError(400, f"prompt has {len(ids)} tokens; the context holds {ctx}",
                             "context_length_exceeded")
        params["stop"] = list(params["stop"]) + list(implied_stop)
        params["max_new_tokens"] = min(params["max_new_tokens"], ctx - len(ids))
        try:
            return engine.submit(Job(ids, params, asyncio.get_running_loop(), stream))
        except QueueFull as e:
            raise ServeError(429, "the server is busy: queue full", "queue_full",
                             {"Retry-After": str(e.retry_after_s)}) from None

    async def _result(job: Job, request: Request) -> GenerationResult:
        """Wait for the job's result; cancel it if the client disconnects meanwhile."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel.set()
                    continue
                if isinstance(item, Exception):
                    raise ServeError(400, str(item))
                if isinstance(item, GenerationResult):
                    metrics["tokens"].inc(len(item.token_ids))
                    return item
        finally:
            if job.result is None:
                job.cancel.set()

    async def _sse(job: Job, chunk) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text piece, a final chunk with finish_reason, [DONE]."""
        try:
            first = True
            while True:
                item = await job.events.get()
                if isinstance(item, Exception):
                    yield f"data: {json.dumps(error_body(str(item)))}\n\n"
                    break
                if isinstance(item, Piece):
                    if item.text or first:
                        yield f"data: {json.dumps(chunk(item.text, None, first))}\n\n"
                        first = False
                    continue
                metrics["tokens"].inc(len(item.token_ids))
                yield f"data: {json.dumps(chunk('', FINISH[item.finish_reason], False))}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # the client left early, or the stream ended: either way nothing more to do

    def _usage(res: GenerationResult) -> dict:
        n = len(res.token_ids)
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": n, "total_tokens": res.prompt_tokens + n}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        params = _params(req, req.max_completion_tokens or req.max_tokens)
        job = _submit([m.model_dump() for m in req.messages], params, req.stream)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(text, finish, first):
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) if not finish else {}
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return StreamingResponse(_sse(job, chunk), media_type="text/event-stream")
        res = await _result(job, request)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "finish_reason": FINISH[res.finish_reason]}], "usage": _usage(res)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params = _params(req, req.max_tokens)
        job = _submit(req.prompt, params, req.stream)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(text, finish, _first):
                return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return StreamingResponse(_sse(job, chunk), media_type="text/event-stream")
        res = await _result(job, request)
        return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": res.text, "logprobs": None,
                             "finish_reason": FINISH[res.finish_reason]}], "usage": _usage(res)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "edge-runtime"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "busy": engine.busy, "queued": engine.queued}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
