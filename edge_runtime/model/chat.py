"""Chat messages -> prompt text: the model's own Jinja template when it has one, else a plain default.

The default, for models trained without a template (such as the embedded one):
    [system text, blank line]
    User: <content>
    Assistant: <content>
    ...
    Assistant:
Generation should then stop at "\nUser:" so that the model does not write the next user turn.

A model's template runs in Jinja's immutable sandbox, and its output is capped at MAX_RENDER_CHARS.
The sandbox cannot bound time (two nested loops over range(100000) run for hours): the daemon renders
in a child process with a deadline (edge_runtime.serve.templates); in-process callers (the CLI's chat,
the library) trust the model they load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edge_runtime.errors import EdgeRuntimeError, install_extra
from edge_runtime.model import chat_sandbox

ROLES = ("system", "user", "assistant")
DEFAULT_STOP = ("\nUser:",)
MAX_RENDER_CHARS = 1 << 22  # 4 Mi characters: four times the daemon's default largest request body


def check_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    if not messages:
        raise EdgeRuntimeError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise EdgeRuntimeError(f"message {i} needs a role in {ROLES} and a string content")
        out.append({"role": role, "content": content})
    return out


def default_template(messages: Sequence[dict[str, str]]) -> str:
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n")
        else:
            parts.append(f"{m['role'].capitalize()}: {m['content'].strip()}")
    return "\n".join(parts) + "\nAssistant:"


def render_template(template: str, messages: list[dict[str, str]], special: dict[str, str] | None = None,
                    max_chars: int = MAX_RENDER_CHARS) -> str:
    """The model's template in the immutable sandbox, in this process (jinja2: the `serve` extra)."""
    try:
        import jinja2  # noqa: F401 (only to say what is missing)
    except ImportError:
        raise EdgeRuntimeError("this model has a chat template; rendering it needs jinja2 "
                               f"({install_extra('serve')})") from None
    try:
        return chat_sandbox.render(chat_sandbox.compile_template(template), messages, special or {}, max_chars)
    except chat_sandbox.TemplateError as e:
        raise EdgeRuntimeError(str(e)) from None


def render_chat(messages: Sequence[Any], template: str | None, special: dict[str, str] | None = None) -> str:
    """Render with the model's template or the default."""
    msgs = check_messages(messages)
    if not template:
        return default_template(msgs)
    return render_template(template, msgs, special)
