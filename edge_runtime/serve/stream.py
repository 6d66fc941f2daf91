"""A job's events to the client: the whole result (waiting, and cancelling the job when the client
disconnects) or server-sent events (one chunk per text piece, a final chunk with finish_reason, [DONE])."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request

from edge_runtime.model.generate import GenerationResult, Piece
from edge_runtime.serve.engine import Job
from edge_runtime.serve.handlers import ServeError
from edge_runtime.serve.metrics import Metrics

DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request looks for its client's disconnect


async def result(job: Job, request: Request, metrics: Metrics) -> GenerationResult:
    """Wait for the job's result; cancel it if the client disconnects meanwhile."""
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                continue
            if isinstance(item, Exception):
                raise ServeError.from_job_error(item)
            if isinstance(item, GenerationResult):
                metrics.tokens.inc(len(item.token_ids))
                return item
    finally:
        if job.result is None:
            job.cancel.set()


Chunk = Callable[[str, str | None, bool], dict]  # (text, finish_reason, first) -> one chunk body


async def sse(job: Job, chunk: Chunk, finish: dict[str, str], metrics: Metrics) -> AsyncIterator[str]:
    try:
        first = True
        while True:
            item = await job.events.get()
            if isinstance(item, Exception):
                yield f"data: {json.dumps(ServeError.from_job_error(item).body())}\n\n"
                break
            if isinstance(item, Piece):
                if item.text or first:
                    yield f"data: {json.dumps(chunk(item.text, None, first))}\n\n"
                    first = False
                continue
            metrics.tokens.inc(len(item.token_ids))
            yield f"data: {json.dumps(chunk('', finish[item.finish_reason], False))}\n\n"
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # the client left early, or the stream ended: either way nothing more to do
