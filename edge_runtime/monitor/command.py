"""`edge-runtime monitor`: sample until Ctrl-C, a duration, or the wrapped command's exit; show a live
view, write JSONL, serve Prometheus. A wrapped edge-runtime process reports its token times through
the EDGE_RUNTIME_TOKEN_LOG file (time.monotonic() is one clock for the whole machine)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from edge_runtime.devices.detect import mode_reader, read_power_mode
from edge_runtime.errors import install_extra
from edge_runtime.monitor.recorder import Recorder
from edge_runtime.monitor.samplers import Ina3221Sampler, NvmlSampler, SystemSampler
from edge_runtime.monitor.summary import live_rates, summarize
from edge_runtime.monitor.sysfs_samplers import TegraGpuSampler, ThermalSampler
from edge_runtime.monitor.token_log import TOKEN_LOG_ENV


def default_samplers(root: str = "/") -> list:
    """On a Jetson (its INA3221 rails or its GPU's sysfs are there) NVML is left out: for the integrated GPU it
    reads zeros or nothing, and a power of 0 mW would overwrite the rails' total (later samplers win)."""
    jetson = [s for s in (Ina3221Sampler(root), TegraGpuSampler(root)) if s.available]
    gpu = [] if jetson else [s for s in (NvmlSampler(),) if s.available]
    return jetson + gpu + [s for s in (ThermalSampler(root), SystemSampler()) if s.available]


def power_mode_reader(root: Path = Path("/"), recheck_s: float = 5.0) -> Callable[[], str | None]:
    """The power mode for each sample: its name (nvpmodel's status file and the board's config, as the runtime's
    watcher reads them), else "id N", else None. A process started every sample would load the CPU whose power is
    measured, so nvpmodel itself is asked once per mode id the status file gives, and without that file at most
    every recheck_s seconds."""
    named = mode_reader(None, root)
    by_id: dict[int, str | None] = {}
    last = [-recheck_s, None]  # (when, name): the last answer without a status file

    def read() -> str | None:
        _, mode_id = read_power_mode(root, use_nvpmodel=False)
        if mode_id is None:
            if time.monotonic() - last[0] >= recheck_s:
                last[:] = [time.monotonic(), named()]
            return last[1]
        if mode_id not in by_id:
            by_id[mode_id] = named() or f"id {mode_id}"
        return by_id[mode_id]

    return read


def _table(rec: dict, rates: dict):
    from rich.table import Table

    t = Table(title="edge-runtime monitor", show_header=False)
    for rail, mw in sorted((rec.get("rails_mw") or {}).items()):
        t.add_row(f"rail {rail}", f"{mw:.0f} mW")
    for key, label, fmt in (("power_mw", "total power", "{:.0f} mW"), ("cpu_load_pct", "CPU load", "{:.0f} %"),
                            ("gpu_load_pct", "GPU load", "{:.0f} %"), ("gpu_mhz", "GPU clock", "{:.0f} MHz"),
                            ("ram_used_mb", "RAM used", "{:.0f} MB"), ("power_mode", "power mode", "{}")):
        if rec.get(key) is not None:
            t.add_row(label, fmt.format(rec[key]))
    for name, c in sorted((rec.get("temps_c") or {}).items()):
        t.add_row(f"temp {name}", f"{c:.1f} °C")
    if rates.get("tokens_per_s"):
        t.add_row("tokens/s", f"{rates['tokens_per_s']:.1f}")
    if rates.get("joules_per_token"):
        t.add_row("J/token", f"{rates['joules_per_token']:.4f}")
    return t


def _read_tokens(path: Path, offset: int, recorder: Recorder) -> int:
    try:
        with open(path) as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset
    complete = chunk[: chunk.rfind("\n") + 1]
    for line in complete.splitlines():
        t = float(line)
        recorder.on_token(t)
        if recorder.jsonl is not None:
            recorder.jsonl.write({"event": "token", "t": t})
    return offset + len(complete)


def _live_view():
    """rich's live table on a terminal, started; None when stdout is not one, or rich (the monitor extra) is
    missing: the samples and the summary need no live view."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.live import Live
    except ImportError:
        print(f"edge-runtime: note: no live view without rich ({install_extra('monitor')})", file=sys.stderr)
        return None
    live = Live(_table({}, {}), refresh_per_second=4)
    live.start()
    return live


def _exit_status(returncode: int) -> int:
    """Popen's -N for a child killed by signal N is 128 + N in a shell's terms (sys.exit(-9) would be 247)."""
    return 128 - returncode if returncode < 0 else returncode


TIMED_OUT = 124  # timeout(1)'s status for a command stopped when its time ran out
GRACE_S = 10.0  # SIGTERM's time to exit before SIGKILL


def _stop(proc: subprocess.Popen) -> int:
    """Terminate the wrapped command and what it started (`sh -c 'a & b'`: the work is in its children), kill
    whatever ignores SIGTERM for GRACE_S; the command's Popen return code. The children are found through psutil
    rather than a process group of their own: a command in a background group stops at its first read of the
    terminal (SIGTTIN), which an interactive `edge-runtime chat` does."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:  # it has just exited
        children = []
    t_end = time.monotonic() + GRACE_S
    for p in [proc, *children]:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            p.terminate()
    try:
        code = proc.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    _, alive = psutil.wait_procs(children, timeout=max(0.0, t_end - time.monotonic()))
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return code


def run_monitor(interval_ms: float, jsonl_path: str | None, prometheus_port: int | None, duration_s: float | None,
                command: list[str]) -> int:
    """Sample until the wrapped command ends (its exit status is returned, 128 + N for a command killed by signal
    N, as a shell reports it), the duration passes or Ctrl-C. A command still running when the duration
    passes is stopped with what it started, and the status is 124, as timeout(1) gives: it must not outlive
    its monitor. Whatever fails in setup (a command that does not exist, a busy port) still stops the sampler
    and removes the token file."""
    recorder = Recorder(default_samplers(), interval_s=interval_ms / 1000.0, power_mode=power_mode_reader(),
                        jsonl_path=jsonl_path).start()
    fd, name = tempfile.mkstemp(prefix="edge-runtime-tokens-")
    os.close(fd)
    token_file = Path(name)
    live = proc = None
    offset, t_end, code = 0, (time.monotonic() + duration_s) if duration_s else None, 0
    try:
        if prometheus_port is not None:
            from prometheus_client import start_http_server

            from edge_runtime.monitor.prometheus import registry_for

            start_http_server(prometheus_port, addr="127.0.0.1", registry=registry_for(recorder))
        live = _live_view()  # before the command starts: nothing after it may fail and leave it running
        if command:
            proc = subprocess.Popen(command, env={**os.environ, TOKEN_LOG_ENV: str(token_file)})
        try:
            while True:
                time.sleep(min(0.25, interval_ms / 1000.0))
                offset = _read_tokens(token_file, offset, recorder)
                if live is not None:
                    live.update(_table(recorder.latest(), live_rates(recorder)))
                if proc is not None and proc.poll() is not None:
                    code = _exit_status(proc.returncode)
                    break
                if t_end is not None and time.monotonic() >= t_end:
                    if proc is not None:
                        _stop(proc)
                        code = TIMED_OUT
                        print(f"edge-runtime: monitor: --duration {duration_s:g} s passed; stopped {command[0]}",
                              file=sys.stderr)
                    break
        except KeyboardInterrupt:
            if proc is not None:
                code = _exit_status(_stop(proc))
        except BaseException:  # the monitor failed: the command it watches does not outlive it unwatched
            if proc is not None and proc.poll() is None:
                _stop(proc)
            raise
    finally:
        if live is not None:
            live.stop()
        offset = _read_tokens(token_file, offset, recorder)  # the last tokens, into the JSONL before it closes
        recorder.stop()
        token_file.unlink(missing_ok=True)
    summary = summarize(recorder.snapshot(), list(recorder.token_times))
    print(json.dumps(summary), file=sys.stderr if sys.stdout.isatty() else sys.stdout)
    return code
