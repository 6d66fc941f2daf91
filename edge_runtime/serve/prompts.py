"""Prompt -> token ids for the daemon, off the event loop: a chat template renders in the template
child (with its deadline), tokenisation runs in a worker thread under PREPARE_TIMEOUT_S. The event loop
only awaits, so /health, streaming and SIGTERM stay responsive whatever a model's template does."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.chat import check_messages
from edge_runtime.runtime import Runtime
from edge_runtime.serve.handlers import ServeError
from edge_runtime.serve.templates import RENDER_TIMEOUT_S, TemplateRenderer

PREPARE_TIMEOUT_S = RENDER_TIMEOUT_S + 8.0  # tokenising the largest body takes well under a second


class PromptPreparer:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        template = runtime.model.manifest.get("chat_template")
        self.renderer = TemplateRenderer(template) if template else None

    def _prepare(self, prompt: str | Sequence[dict[str, str]]) -> tuple[list[int], tuple[str, ...]]:
        """(ids, implied stop strings), blocking. A string or a chat without a model template goes
        through Runtime.prepare_prompt (linear time); a model template renders in the child."""
        if isinstance(prompt, str) or self.renderer is None:
            return self.runtime.prepare_prompt(prompt)
        # the same special tokens Runtime.prepare_prompt hands to an in-process render
        messages, special = check_messages(prompt), self.runtime._special_tokens()
        text = self.renderer.render(messages, special)
        # the template writes its own BOS
        return self.runtime.encode_chat(text, messages, lambda m: self.renderer.render(m, special), False), ()

    async def prepare(self, prompt: str | Sequence[dict[str, str]]) -> tuple[list[int], tuple[str, ...]]:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._prepare, prompt), PREPARE_TIMEOUT_S)
        except EdgeRuntimeError as e:
            raise ServeError(400, str(e)) from None
        except TimeoutError:
            raise ServeError(503, f"preparing the prompt took longer than {PREPARE_TIMEOUT_S:g} s",
                             "prompt_timeout") from None

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
