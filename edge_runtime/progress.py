"""Progress of a command that runs for minutes, on stderr: tqdm's bar on a terminal; elsewhere (a log file,
nohup, `ssh host cmd`, a systemd unit) a plain line at most every `every_s` seconds, since a bar's carriage
returns make one unreadable line in a log and no output at all looks like a hang."""

from __future__ import annotations

import sys
import time
from typing import TextIO

EVERY_S = 30.0


class Progress:
    """Call as progress(done, total); use as a context manager (the bar is removed on exit)."""

    def __init__(self, desc: str, unit: str, stream: TextIO | None = None, every_s: float = EVERY_S):
        self.stream = stream or sys.stderr
        self.desc, self.unit, self.every_s = desc, unit, every_s
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=1, desc=desc, unit=unit, leave=False, file=self.stream)
        self._start = self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.total, self._bar.n = total, done
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(f"edge-runtime: {self.desc}: {done}/{total} {self.unit}s, {now - self._start:.0f} s",
                  file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
