"""A background thread that samples at a fixed interval into a bounded buffer, with the power mode in
every record, per-token timestamps from the runtime, and joules per token by integrating power over
each token's interval (trapezoids over the samples, linear between them)."""

from __future__ import annotations

import collections
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable

import numpy as np


class JsonlSink:
    """Appends JSON records to a file from several threads. A write that fails (a full disk) ends the file with
    one warning, not the monitoring: the telemetry must never stop the command it watches."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a")  # noqa: SIM115 (closed in close)
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as e:
                print(f"edge-runtime: warning: monitor: cannot write {self.path} ({e.strerror or e}); the JSONL "
                      f"stops here, monitoring goes on", file=sys.stderr)
                self._close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):  # the data it could not flush is already reported lost
            self._file.close()
        self._file = None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._close()


class Recorder:
    def __init__(self, samplers: list, interval_s: float = 0.1, capacity: int = 36000,
                 power_mode: Callable[[], str | None] | None = None, jsonl_path: str | None = None):
        self.samplers = [s for s in samplers if getattr(s, "available", True)]
        self.interval_s = interval_s
        self.records: collections.deque[dict] = collections.deque(maxlen=capacity)
        self.token_times: collections.deque[float] = collections.deque(maxlen=capacity)
        self.power_mode = power_mode
        self.jsonl = JsonlSink(jsonl_path) if jsonl_path else None  # samples and token events; closed in stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-runtime-monitor", daemon=True)
        self._lock = threading.Lock()

    def sample_once(self) -> dict:
        rec: dict = {"t": time.monotonic(), "wall": time.time()}
        for s in self.samplers:
            for k, v in s.sample().items():
                if isinstance(v, dict):
                    rec.setdefault(k, {}).update(v)
                else:
                    rec[k] = v
        if self.power_mode is not None:
            rec["power_mode"] = self.power_mode()
        with self._lock:
            self.records.append(rec)
        if self.jsonl is not None:
            self.jsonl.write(rec)
        return rec

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None

    def on_token(self, t: float | None = None) -> None:
        """The runtime calls this as each token is produced (time.monotonic())."""
        self.token_times.append(time.monotonic() if t is None else t)

    def latest(self) -> dict:
        with self._lock:
            return dict(self.records[-1]) if self.records else {}

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.records)


def energy_per_token(records: list[dict], token_times: list[float]) -> list[float]:
    """Joules for each interval between consecutive token timestamps: power (W) interpolated linearly
    between samples and integrated by trapezoids over the interval. Needs samples spanning the tokens."""
    pts = [(r["t"], r["power_mw"] / 1000.0) for r in records if r.get("power_mw") is not None]
    if len(pts) < 2 or len(token_times) < 2:
        return []
    t, p = np.array([a for a, _ in pts]), np.array([b for _, b in pts])
    out = []
    for a, b in zip(token_times, token_times[1:], strict=False):
        inner = (t > a) & (t < b)
        xs = np.concatenate([[a], t[inner], [b]])
        ys = np.interp(xs, t, p)
        out.append(float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs))))
    return out


def energy_from_counter(records: list[dict], start: float, end: float) -> float | None:
    """Joules from NVML's total-energy counter (mJ) between two monotonic times, interpolated."""
    pts = [(r["t"], r["energy_mj"]) for r in records if r.get("energy_mj") is not None]
    if len(pts) < 2:
        return None
    t, e = np.array([a for a, _ in pts]), np.array([b for _, b in pts])
    return float((np.interp(end, t, e) - np.interp(start, t, e)) / 1000.0)
