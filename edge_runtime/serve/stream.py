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
UsageChunk = Callable[[GenerationResult], dict]  # the result -> the chunk that carries its token counts


async def sse(job: Job, chunk: Chunk, finish: dict[str, str], metrics: Metrics,
              usage: UsageChunk | None = None) -> AsyncIterator[str]:
    """The job's events as server-sent events; with usage (stream_options.include_usage), one more chunk after
    the finish_reason chunk, before [DONE], carries the token counts. Events already waiting go out in one
    write: the event loop then runs between two writes and sees a client that has gone after one write to its
    closed socket, not after a backlog of them (asyncio logs "socket.send() raised exception." for each past
    the fifth)."""
    try:
        first, done = True, False
        while not done:
            out: list[str] = []
            item = await job.events.get()
            while True:
                if isinstance(item, Exception):
                    out.append(f"data: {json.dumps(ServeError.from_job_error(item).body())}\n\n")
                    done = True
                elif isinstance(item, Piece):
                    if item.text or first:
                        out.append(f"data: {json.dumps(chunk(item.text, None, first))}\n\n")
                        first = False
                else:
                    metrics.tokens.inc(len(item.token_ids))
                    out.append(f"data: {json.dumps(chunk('', finish[item.finish_reason], False))}\n\n")
                    if usage is not None:
                        out.append(f"data: {json.dumps(usage(item))}\n\n")
                    done = True
                if done or job.events.empty():
                    break
                item = job.events.get_nowait()
            if done:
                out.append("data: [DONE]\n\n")
            if out:
                yield "".join(out)
    finally:
        job.cancel.set()  # the client left early, or the stream ended: either way nothing more to do
