"""`edge-runtime chat`: a conversation longer than the context goes on (oldest turns forgotten), and a message
that fails is reported and dropped without ending the conversation."""

from __future__ import annotations

import pytest

import edge_runtime
from edge_runtime.chat_repl import fit_history, run_chat


def _tokens(messages):  # a stand-in prompt length: one token a character, ten for each message's framing
    return sum(10 + len(m["content"]) for m in messages)


def test_fit_history_drops_the_oldest_exchanges_first():
    system = {"role": "system", "content": "be brief"}
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    newest = {"role": "user", "content": "question 4"}
    history = [system] + turns + [newest]
    kept, dropped = fit_history(_tokens, history, budget=_tokens([system] + turns[4:] + [newest]))
    assert kept == [system] + turns[4:] + [newest] and dropped == 4
    kept, dropped = fit_history(_tokens, history, budget=10**6)
    assert kept == history and dropped == 0


def test_fit_history_never_drops_the_newest_message():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "x" * 500}]
    kept, dropped = fit_history(_tokens, history, budget=20)
    assert kept == history[-1:] and dropped == 2


@pytest.fixture(scope="module")
def rt():
    with edge_runtime.load(profile=None, backend="cpu", max_context=128) as runtime:
        yield runtime


def test_chat_outlives_its_context_and_survives_a_bad_message(rt, capsys, monkeypatch):
    lines = [f"tell me about the sea and the ship number {i}" for i in range(10)]
    lines.insert(3, "the sea " * 200)  # too long on its own for a 128-token context
    lines.insert(5, "\udcff broken bytes")  # what Python makes of undecodable stdin bytes
    feed = iter(lines)
    sent = []  # the conversation each generation was asked to continue
    real_stream = rt.stream
    monkeypatch.setattr(rt, "stream", lambda messages, **kw: (sent.append(list(messages)), real_stream(messages,
                                                                                                     **kw))[1])

    def read_line(_prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert run_chat(rt, "You are a sailor.", max_new_tokens=16, temperature=0.0, top_p=1.0,
                    read_line=read_line) == 0
    out, err = capsys.readouterr()
    assert out.count("model> ") == len(lines) - 2  # a reply to every message but the two that failed
    assert "oldest messages to fit the 128-token context" in err
    assert err.count("error: ") == 2 and "context holds 128" in err and "not valid UTF-8" in err
    assert len(out.rsplit("model> ", 1)[1].strip()) > 0  # the last question, after both errors, got a reply
    after_long = next(m for m in sent if m[-1]["content"] == lines[4])
    before_long = next(m for m in sent if m[-1]["content"] == lines[2])
    # the failed message is not in the conversation, and what came before it is (trimmed only to fit)
    assert all(m["content"] != lines[3] for m in after_long)
    assert after_long[-3]["content"] == lines[2] and after_long[-2]["role"] == "assistant"
    assert after_long[0] == before_long[0] == {"role": "system", "content": "You are a sailor."}


def test_a_reply_cut_by_the_context_says_so(rt, capsys):
    """--max-new-tokens past what the context leaves: the reply ends mid-sentence, and chat says why."""
    feed = iter(["tell me about the sea"])

    def read_line(_prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert run_chat(rt, None, max_new_tokens=500, temperature=0.0, top_p=1.0, read_line=read_line) == 0
    assert rt.last_result.finish_reason == "context"
    assert "(the reply stopped at the end of the 128-token context)" in capsys.readouterr().err
