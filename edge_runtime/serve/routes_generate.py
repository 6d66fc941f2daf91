"""POST /v1/completions and /v1/chat/completions, streamed (SSE) or not."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from edge_runtime.model.generate import GenerationResult
from edge_runtime.serve import stream
from edge_runtime.serve.schemas import ChatCompletionRequest, CompletionRequest
from edge_runtime.serve.state import ServeState

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "deadline": "length",
          "cancelled": "stop"}


def _usage(res: GenerationResult) -> dict:
    n = len(res.token_ids)
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": n, "total_tokens": res.prompt_tokens + n}


def router(state: ServeState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        params = state.params(req, req.max_completion_tokens or req.max_tokens)
        job = await state.submit([m.model_dump() for m in req.messages], params, req.stream)
        cid, created, model_id = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_id
        if req.stream:
            def chunk(text, finish, first):
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) if not finish else {}
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return StreamingResponse(stream.sse(job, chunk, FINISH, state.metrics), media_type="text/event-stream")
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
            def chunk(text, finish, _first):
                return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return StreamingResponse(stream.sse(job, chunk, FINISH, state.metrics), media_type="text/event-stream")
        res = await stream.result(job, request, state.metrics)
        return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": res.text, "logprobs": None,
                             "finish_reason": FINISH[res.finish_reason]}], "usage": _usage(res)}

    return r
