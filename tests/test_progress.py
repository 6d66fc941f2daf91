"""Progress lines for commands that run for minutes, where stderr is not a terminal (logs, nohup, ssh)."""

from __future__ import annotations

import io

from edge_runtime.progress import Progress


def test_a_log_gets_plain_lines_no_oftener_than_asked():
    log = io.StringIO()
    with Progress("calibrate", "step", stream=log, every_s=0.0) as progress:
        progress(3, 40)
        progress(4, 40)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("edge-runtime: calibrate: 3/40 steps, ")
    assert "\r" not in log.getvalue()

    quiet = io.StringIO()
    with Progress("calibrate", "step", stream=quiet, every_s=3600.0) as progress:
        progress(3, 40)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    with Progress("calibrate", "step", stream=term, every_s=0.0) as progress:
        progress(7, 40)
        assert "7/40" in term.getvalue()
