"""The daemon's FastAPI application, put together: engine, metrics, prompt preparer, middleware (body
limit, API key, request counting), error handlers and the routes (routes_generate, routes_info)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from edge_runtime.runtime import Runtime
from edge_runtime.serve import routes_generate, routes_info
from edge_runtime.serve.engine import Engine
from edge_runtime.serve.handlers import install_handlers
from edge_runtime.serve.metrics import Metrics
from edge_runtime.serve.middleware import BodyLimit, Gate
from edge_runtime.serve.prompts import PromptPreparer
from edge_runtime.serve.state import ServeState


def create_app(runtime: Runtime, api_key: str | None = None, max_queue: int = 8, max_tokens_limit: int = 512,
               max_body_bytes: int = 1 << 20, default_max_tokens: int = 128) -> FastAPI:
    engine = Engine(runtime, max_queue)
    state = ServeState(runtime, engine, Metrics(engine), PromptPreparer(runtime), max_tokens_limit,
                       default_max_tokens)

    @asynccontextmanager
    async def lifespan(_app):
        await asyncio.to_thread(engine.start)  # again, when a test client ran an earlier lifespan
        if state.prompts.renderer is not None:
            await asyncio.to_thread(state.prompts.renderer.start)
        yield
        await asyncio.to_thread(engine.shutdown)
        state.prompts.close()

    app = FastAPI(title="edge-runtime", version="1", lifespan=lifespan)
    app.state.engine = engine
    app.state.serve = state
    install_handlers(app)
    routers = [routes_generate.router(state), routes_info.router(state)]
    for r in routers:
        app.include_router(r)
    # the metric labels: our routes' paths (none has a path parameter) and FastAPI's docs routes
    state.metrics.routes = frozenset(getattr(r, "path", None) for x in [app, *routers] for r in x.routes) - {None}
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Gate, metrics=state.metrics, api_key=api_key)  # outermost: 401 and 413 are counted
    return app
