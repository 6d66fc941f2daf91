"""The daemon's chat-template renderer: one child process (edge_runtime/model/chat_sandbox.py) with a
deadline per render. A thread cannot be stopped, and Jinja's sandbox bounds neither time nor loops, so
a pathological template (nested range(100000) loops) would hold a thread, the GIL's share of the event
loop and SIGTERM handling for hours; a child is killed at the deadline and started again on the next
render. The child's address space is capped (RLIMIT_AS), its output by MAX_RENDER_CHARS.

render() blocks: call it from a worker thread, never on the event loop. Renders are serialised (one
child); a slow template delays other chat requests by at most the deadline.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model import chat_sandbox
from edge_runtime.model.chat import MAX_RENDER_CHARS

CHILD = Path(chat_sandbox.__file__)
RENDER_TIMEOUT_S = 2.0
CHILD_MEMORY_BYTES = 1 << 30


class TemplateRenderer:
    def __init__(self, template: str, timeout_s: float = RENDER_TIMEOUT_S, max_chars: int = MAX_RENDER_CHARS,
                 memory_bytes: int = CHILD_MEMORY_BYTES):
        self.template, self.timeout_s = template, timeout_s
        self.max_chars, self.memory_bytes = max_chars, memory_bytes
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.killed = 0  # children killed at the deadline

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            # -I: no PYTHONPATH, no working directory, no user site; the child imports jinja2 only
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(CHILD), str(self.max_chars), str(self.memory_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                encoding="utf-8")
            self._proc.stdin.write(json.dumps(self.template) + "\n")
            self._proc.stdin.flush()
        return self._proc

    def start(self) -> None:
        """Start the child now (it takes ~0.1 s) rather than at the first chat request."""
        with self._lock:
            self._child()

    def render(self, messages: list[dict[str, str]], special: dict[str, str]) -> str:
        with self._lock:
            proc = self._child()
            try:
                proc.stdin.write(json.dumps({"messages": messages, "special": special}) + "\n")
                proc.stdin.flush()
                line = self._read_line(proc, time.monotonic() + self.timeout_s)
            except (OSError, ValueError):  # the child died (its memory cap, a crash): start a fresh one next time
                self._kill()
                raise EdgeRuntimeError("the model's chat template crashed its renderer") from None
        if line is None:
            raise EdgeRuntimeError(f"the model's chat template took longer than {self.timeout_s:g} s to render")
        reply = json.loads(line)
        if not reply["ok"]:
            raise EdgeRuntimeError(reply["error"])
        return reply["text"]

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> str | None:
        """The child's reply, or None (and the child killed) at the deadline."""
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0.0))
        if not ready:
            self._kill()
            self.killed += 1
            return None
        line = proc.stdout.readline()  # the child writes whole lines: the rest follows at once
        if not line:
            raise OSError("renderer exited")
        return line

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(OSError):  # a broken pipe to a dead child
                    f.close()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()
