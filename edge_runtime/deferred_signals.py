"""Ctrl-C and SIGTERM held back over a few operations that must happen together (renames of files a
manifest checksums): delivered when the block ends, with the handlers that were in force."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Only the main thread receives signals; elsewhere this does nothing. A signal whose handler was not set
    from Python (getsignal() is None: an embedding application's C handler) is left alone, as restoring it
    is impossible from here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for s in signums:
        if signal.getsignal(s) is not None:
            previous[s] = signal.signal(s, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        first: BaseException | None = None
        for s in dict.fromkeys(caught):  # every one delivered, though an earlier one's handler raised
            try:
                signal.raise_signal(s)
            except BaseException as e:  # KeyboardInterrupt, SystemExit from a handler
                first = first or e
        if first is not None:
            raise first
