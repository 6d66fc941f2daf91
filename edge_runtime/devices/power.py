"""Watching the power mode: a thread polls a reader and calls back on every change."""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable


class PowerModeWarning(UserWarning):
    """A power-mode change the runtime could not act on (a custom nvpmodel mode the profile lacks): the previous
    selection stays in place and watching goes on."""


def _report(message: str) -> None:
    """A PowerModeWarning; under -W error (or a test suite's filterwarnings = error) the warning is an exception,
    which must not end the watcher's thread either, so it is printed instead."""
    try:
        warnings.warn(message, PowerModeWarning, stacklevel=1)
    except Warning:
        print(f"edge-runtime: warning: {message}", file=sys.stderr)


class PowerModeWatcher:
    """Polls `read_mode()` every `interval_s`; calls `on_change(new_mode)` for the first reading and then whenever
    the value changes.
    Paired start/stop; a reader that raises is treated as "unknown" (None) for that poll, and a callback that
    raises is reported as a PowerModeWarning: the thread must outlive a mode it cannot act on, to act on the next."""

    def __init__(self, read_mode: Callable[[], str | None], on_change: Callable[[str | None], None],
                 interval_s: float = 1.0):
        self.read_mode = read_mode
        self.on_change = on_change
        self.interval_s = interval_s
        self.current: str | None = None  # start() acts on the first reading: the runtime may be set to another
        self._reader_failing = False  # one warning per run of failed reads, not one per poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-runtime-power-watch", daemon=True)

    def _read(self) -> str | None:
        try:
            mode = self.read_mode()
        except OSError:  # the built-in reader's files and nvpmodel come and go: not worth a warning
            return None
        except Exception as e:  # a user's reader (a ROS topic, a file it parses): one failed poll must not end
            if not self._reader_failing:  # the watching, nor fill a journal with a line per poll
                _report(f"the power-mode reader raised {type(e).__name__}: {e}; its polls count as unknown "
                        f"until it reads again")
            self._reader_failing = True
            return None
        self._reader_failing = False
        return mode

    def start(self) -> PowerModeWatcher:
        """Act on the mode the board is in now, in the caller's thread, then poll for changes."""
        self._poll()
        self._thread.start()
        return self

    def _poll(self) -> None:
        mode = self._read()
        if mode is not None and mode != self.current:
            self.current = mode
            try:
                self.on_change(mode)
            except Exception as e:  # whatever it was, the next change must still be seen
                _report(f"power mode {mode!r} not applied ({e}); the previous selection stays")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
