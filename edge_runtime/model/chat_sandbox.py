"""A model's Jinja chat template in the immutable sandbox, with an output cap; also a child-process
server for it (`python -I chat_sandbox.py MAX_CHARS MEMORY_BYTES`), so that the daemon can kill a
template that runs too long. This file imports nothing of edge_runtime: the child starts in a fraction
of the time the package takes, and with -I it sees no PYTHONPATH or working directory.

Protocol: one JSON line per message. The first line in is the template (a JSON string); then each
line in is {"messages": [...], "special": {...}} and each line out {"ok": true, "text": ...} or
{"ok": false, "error": "one line"}.
"""

from __future__ import annotations

import json
import sys


class TemplateError(ValueError):
    """The template failed, or wrote more than its cap; the message is one line."""


class _Refused(Exception):
    """raise_exception(message) in a template: the template's own reason for refusing the messages."""


def _raise_exception(message):
    raise _Refused(str(message))


def _tojson(value, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


def compile_template(template: str):
    """The environment transformers gives chat templates: {% break %} / {% continue %}, raise_exception,
    strftime_now, and a tojson that leaves non-ASCII text as it is."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(template)
    except Exception as e:  # jinja2's syntax errors and whatever the compiler raises
        raise TemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None


def render(compiled, messages: list[dict[str, str]], special: dict[str, str], max_chars: int) -> str:
    """Streamed, so that the cap holds while the template runs."""
    parts, n = [], 0
    try:
        for chunk in compiled.generate(messages=messages, add_generation_prompt=True, **special):
            n += len(chunk)
            if n > max_chars:
                raise TemplateError(f"the model's chat template wrote more than {max_chars} characters")
            parts.append(chunk)
    except TemplateError:
        raise
    except _Refused as e:  # e.g. Gemma's "System role not supported"
        raise TemplateError(f"the model's chat template refused these messages: {e}") from None
    except Exception as e:  # a template error names the template's problem; it is the model's, not ours
        raise TemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    return "".join(parts)


def _one_line(e: Exception) -> str:
    return (str(e).splitlines() or ["template error"])[0]


def _serve(max_chars: int, memory_bytes: int) -> None:
    import resource

    # a template that allocates without bound fails here (MemoryError), not in the machine's OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        compiled, failure = compile_template(json.loads(sys.stdin.readline())), None
    except TemplateError as e:
        compiled, failure = None, _one_line(e)
    for line in sys.stdin:
        try:
            if failure:
                raise TemplateError(failure)
            req = json.loads(line)
            out = {"ok": True, "text": render(compiled, req["messages"], req["special"], max_chars)}
        except TemplateError as e:
            out = {"ok": False, "error": _one_line(e)}
        except MemoryError:
            out = {"ok": False, "error": f"the model's chat template used more than {memory_bytes >> 20} MiB"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
