"""Chat messages -> prompt text: the model's own Jinja template when it has one, else a plain default.

The default, for models trained without a template (such as the embedded one):
    [system text, blank line]
    User: <content>
    Assistant: <content>
    ...
    Assistant:
Generation should then stop at "\nUser:" so that the model does not write the next user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edge_runtime.errors import EdgeRuntimeError

ROLES = ("system", "user", "assistant")
DEFAULT_STOP = ("\nUser:",)


def _check(messages: Sequence[Any]) -> list[dict[str, str]]:
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


def render_chat(messages: Sequence[Any], template: str | None, special: dict[str, str] | None = None) -> str:
    """Render with the model's template (needs jinja2, part of the `serve` extra) or the default."""
    msgs = _check(messages)
    if not template:
        return default_template(msgs)
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EdgeRuntimeError("this model has a chat template; rendering it needs jinja2 "
                               "(pip install 'edge-runtime[serve]')") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=msgs, add_generation_prompt=True, **(special or {}))
    except Exception as e:  # a template error names the template's problem; it is the model's, not ours
        raise EdgeRuntimeError(f"the model's chat template failed: {e}") from None
