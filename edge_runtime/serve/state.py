"""What the routes share: the runtime, the engine, metrics, the prompt preparer and the limits; and the
one way a request becomes a queued Job."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from edge_runtime.runtime import Runtime
from edge_runtime.serve.engine import Engine, Job, QueueFull, Stopping
from edge_runtime.serve.handlers import ServeError
from edge_runtime.serve.metrics import Metrics
from edge_runtime.serve.prompts import PromptPreparer
from edge_runtime.serve.schemas import SamplingRequest


@dataclass
class ServeState:
    runtime: Runtime
    engine: Engine
    metrics: Metrics
    prompts: PromptPreparer
    max_tokens_limit: int
    default_max_tokens: int

    @property
    def model_id(self) -> str:
        return self.runtime.name

    def params(self, req: SamplingRequest, max_tokens: int | None) -> dict:
        """Keyword arguments of Runtime.stream_events (the sampling values are validated by the schema)."""
        n = max_tokens or min(self.default_max_tokens, self.max_tokens_limit)  # no max_tokens: never refused
        if n > self.max_tokens_limit:
            raise ServeError(400, f"max_tokens {n} is over this server's limit of {self.max_tokens_limit}",
                             "max_tokens_too_large")
        return {"max_new_tokens": n, "temperature": req.temperature, "top_p": req.top_p,
                "top_k": max(req.top_k or 0, 0), "repetition_penalty": req.repetition_penalty or 1.0, "seed": req.seed,
                "stop": req.stop_list()}

    async def submit(self, prompt: str | Sequence[dict[str, str]], params: dict, stream: bool) -> Job:
        ids, implied_stop = await self.prompts.prepare(prompt)
        ctx = self.runtime.decoder.max_context
        if not ids:
            raise ServeError(400, "the prompt is empty after tokenisation")
        if len(ids) >= ctx:
            raise ServeError(400, f"prompt has {len(ids)} tokens; the context holds {ctx}", "context_length_exceeded")
        params = {**params, "stop": list(params["stop"]) + list(implied_stop),
                  "max_new_tokens": min(params["max_new_tokens"], ctx - len(ids))}
        try:
            return self.engine.submit(Job(ids, params, asyncio.get_running_loop(), stream))
        except Stopping as e:
            raise ServeError.from_job_error(e) from None
        except QueueFull as e:
            raise ServeError(429, "the server is busy: queue full", "queue_full",
                             {"Retry-After": str(e.retry_after_s)}) from None
