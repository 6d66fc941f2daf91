"""GET /v1/models, /health and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_runtime.serve.state import ServeState


def router(state: ServeState) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "edge-runtime"}]}

    @r.get("/health")
    async def health():
        e = state.engine
        return {"status": "ok", "model": state.model_id, "busy": e.busy, "queued": e.queued,
                "worker_alive": e.worker_alive, "backend": state.runtime.backend.name,
                "runtime": state.runtime.health_info()}

    @r.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return r
