"""Signals held back over a block are all delivered when it ends, with the handlers that were in force."""

from __future__ import annotations

import signal

import pytest

from edge_runtime.deferred_signals import signals_deferred


def test_every_signal_is_delivered_after_the_block():
    heard: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, _f: heard.append(s))
    try:
        done = []
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            done.append("block ran to its end")
        assert done == ["block ran to its end"]
        assert heard == [signal.SIGTERM]  # not lost behind the KeyboardInterrupt
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_quiet_block_changes_nothing():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals_deferred():
        pass
    assert {s: signal.getsignal(s) for s in before} == before
