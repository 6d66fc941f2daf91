"""POST /v1/completions and /v1/chat/completions, streamed (SSE) or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from edge_runtime.model.generate import GenerationResult
from edge_runtime.serve import stream
from edge_runtime.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from edge_runtime.serve.state import ServeState

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "deadline": "length",
          "cancelled": "stop"}


def _usage(res: GenerationResult) -> dict:
    n = len(res.token_ids)
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": n, "total_tokens": res.prompt_tokens + n}


def _streamed(state: ServeState, job, req: SamplingRequest, head: dict,
              choice: Callable[[str, str | None, bool], dict]) -> StreamingResponse:
    """SSE chunks: head (id, object, created, model) and one choice each; with stream_options.include_usage,
    "usage": null on each and a last chunk with no choices and the usage, as OpenAI streams them."""
    with_usage = req.include_usage()

    def chunk(text, finish, first):
        body = {**head, "choices": [choice(text, finish, first)]}
        return {**body, "usage": None} if with_usage else body

    usage = (lambda res: {**head, "choices": [], "usage": _usage(res)}) if with_usage else None
    return StreamingResponse(stream.sse(job, chunk, FINISH, state.metrics, usage), media_type="text/event-stream")


def router(state: ServeState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        params = state.params(req, req.max_completion_tokens or req.max_tokens)
        job = await state.submit([m.model_dump() for m in req.messages], params, req.stream)
        cid, created, model_id = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_id
        if req.stream:
            def choice(text, finish, first):
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) if not finish else {}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id}
            return _streamed(state, job, req, head, choice)
        res = await stream.result(job, request, state.metrics)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "finish_reason": FINISH[res.finish_reason]}], "usage": _usage(res)}

    @r.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params = state.params(req, req.max_tokens)
        job = await state.submit(req.prompt, params, req.stream)
        cid, created, model_id = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_id
        if req.stream:
            def choice(text, finish, _first):
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            head = {"id": cid, "object": "text_completion", "created": created, "model": model_id}
            return _streamed(state, job, req, head, choice)
        res = await stream.result(job, request, state.metrics)
        return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": res.text, "logprobs": None,
                             "finish_reason": FINISH[res.finish_reason]}], "usage": _usage(res)}

    return r
