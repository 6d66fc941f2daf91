"""`edge-runtime chat`: the terminal conversation. It outlives its context: when the conversation no longer
fits, the oldest exchanges are forgotten (the system message stays), and a message that fails (too long on
its own, undecodable text) is reported and dropped while the conversation goes on."""

from __future__ import annotations

import sys
from collections.abc import Callable

from edge_runtime.errors import EdgeRuntimeError

Message = dict[str, str]


def fit_history(prompt_tokens: Callable[[list[Message]], int], history: list[Message], budget: int
                ) -> tuple[list[Message], int]:
    """The newest suffix of the conversation (system message kept) whose prompt has at most `budget` tokens,
    and how many messages were dropped. The newest user message is never dropped: if it does not fit on its
    own, the caller's generation reports that."""
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system):]
    dropped = 0
    while len(turns) > 1 and prompt_tokens(system + turns) > budget:
        cut = 2 if len(turns) > 2 and turns[0]["role"] == "user" else 1  # a user message and its reply
        turns = turns[cut:]
        dropped += cut
    return system + turns, dropped


def run_chat(rt, system: str | None, max_new_tokens: int, temperature: float, top_p: float,
             read_line: Callable[[str], str] = input) -> int:
    """The read-reply loop until an empty line or end of input. rt: a Runtime."""
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    context = rt.decoder.max_context
    reserve = min(max_new_tokens, context // 2)  # room kept for the reply when old turns are dropped

    def prompt_tokens(messages: list[Message]) -> int:
        return len(rt.prepare_prompt(messages)[0])

    print("edge-runtime chat: empty line or Ctrl-D to quit, /reset to forget the conversation", file=sys.stderr)
    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        if line == "/reset":
            history = history[:1] if system else []
            continue
        try:  # on a copy: a message that fails leaves the conversation before it as it was
            asked, dropped = fit_history(prompt_tokens, history + [{"role": "user", "content": line}],
                                         context - 1 - reserve)
            stream = rt.stream(asked, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
            reply = [next(stream, "")]  # a prompt that cannot run fails here, before the reply is begun
        except EdgeRuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"(forgot the {dropped} oldest messages to fit the {context}-token context)", file=sys.stderr)
        print("model> " + reply[0], end="", flush=True)
        for piece in stream:
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        if rt.last_result is not None and rt.last_result.finish_reason == "context":  # else cut without a word
            print(f"(the reply stopped at the end of the {context}-token context)", file=sys.stderr)
        history = asked + [{"role": "assistant", "content": "".join(reply).strip()}]
