"""Reports from a monitor JSONL file or a tegrastats log: a JSON summary and PNG plots (matplotlib)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from edge_runtime.atomic_write import atomic_write_text
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.monitor.summary import summarize
from edge_runtime.monitor.tegrastats import parse_log

NUMBERS = ("power_mw", "ram_used_mb", "ram_total_mb", "cpu_load_pct", "gpu_load_pct", "gpu_mhz")  # or null
PER_NAME = ("rails_mw", "temps_c")  # {name: number} or null
MAX_MAGNITUDE = 1e12  # past any reading or epoch time; 1e308 is finite but overflows the plots' axes and the sums


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_MAGNITUDE


def _sample(rec) -> bool:
    """A sample the summary and plots can use: a numeric time, and each known field of the right type."""
    return (isinstance(rec, dict) and _number(rec.get("t"))
            and all(rec.get(k) is None or _number(rec[k]) for k in NUMBERS)
            and all(rec.get(k) is None or (isinstance(rec[k], dict) and all(map(_number, rec[k].values())))
                    for k in PER_NAME))


def load_jsonl(path: Path) -> tuple[list[dict], list[float], int]:
    """(samples, token times, unusable lines: not JSON, or not a sample or token event of the recorder's
    shape). Token events are {"event": "token", "t": ...}."""
    records, tokens, bad = [], [], 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise EdgeRuntimeError(f"cannot read {path}: {e.strerror}") from None
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            bad += 1
            continue
        if isinstance(rec, dict) and rec.get("event") == "token" and _number(rec.get("t")):
            tokens.append(float(rec["t"]))
        elif _sample(rec):
            records.append(rec)
        else:
            bad += 1
    return records, sorted(tokens), bad


def load_tegrastats(path: Path, interval_s: float = 1.0) -> tuple[list[dict], int]:
    """(samples, unusable lines). Times are the lines' timestamps, or, in a log without any, tegrastats' interval.
    In a log with timestamps a line without one (cut off and merged with the next when tegrastats restarted
    into the same --logfile) is unusable: index time next to epoch time would stretch the plots over 55 years."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise EdgeRuntimeError(f"cannot read {path}: {e.strerror}") from None
    samples, bad = parse_log(lines)
    timed = [s for s in samples if s.timestamp is not None]
    if timed:
        bad += len(samples) - len(timed)
        samples = timed
    records = []
    for i, s in enumerate(samples):
        rec = s.to_record()
        rec["t"] = rec["ts"] if rec["ts"] is not None else i * interval_s
        records.append(rec)
    return records, bad


def _series(plt, t: list[float], records: list[dict], key: str, names: list[str], ylabel: str, title: str,
            path: Path, total: list[float] | None = None) -> None:
    """One line per name of records[i][key] over time (NaN where a sample lacks it), plus a dashed total."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in names:
        ax.plot(t, [(r.get(key) or {}).get(name, np.nan) for r in records], label=name)
    if total is not None:
        ax.plot(t, total, "k--", label="total")
    ax.set(xlabel="time (s)", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(records: list[dict], tokens: list[float], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    t0 = records[0]["t"] if records else 0.0
    t = [r["t"] - t0 for r in records]
    rails = sorted({k for r in records for k in (r.get("rails_mw") or {})})
    if rails or any(r.get("power_mw") is not None for r in records):
        total = [r["power_mw"] if r.get("power_mw") is not None else np.nan for r in records]
        _series(plt, t, records, "rails_mw", rails, "power (mW)", "power by rail", out_dir / "power.png", total)
        written.append("power.png")
    sensors = sorted({k for r in records for k in (r.get("temps_c") or {})})
    if sensors:
        _series(plt, t, records, "temps_c", sensors, "°C", "temperature", out_dir / "temperature.png")
        written.append("temperature.png")
    if len(tokens) >= 3:
        tok = np.asarray(tokens)
        gaps = np.diff(tok) * 1000
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        centers = tok[1:] - t0
        a1.plot(centers, 1000 / gaps, ".", ms=2)
        a1.set(xlabel="time (s)", ylabel="tokens/s", title="decode rate per token")
        qs = [50, 90, 95, 99]
        a2.bar([f"p{q}" for q in qs], [np.percentile(gaps, q) for q in qs])
        a2.set(ylabel="ms", title="inter-token latency")
        fig.tight_layout()
        fig.savefig(out_dir / "tokens.png", dpi=110)
        plt.close(fig)
        written.append("tokens.png")
    return written


def make_report(source: Path, out_dir: Path, tegrastats: bool = False) -> dict:
    if tegrastats:
        records, bad = load_tegrastats(source)
        tokens: list[float] = []
    else:
        records, tokens, bad = load_jsonl(source)
    if not records:
        as_tegrastats = not tegrastats and load_tegrastats(source)[0]
        hint = "; it reads as a tegrastats log: add --tegrastats" if as_tegrastats else ""
        raise EdgeRuntimeError(f"{source} holds no samples ({bad} unparseable lines){hint}")
    if importlib.util.find_spec("matplotlib") is None:  # checked before anything is written
        raise EdgeRuntimeError("report draws its plots with matplotlib: pip install matplotlib (in a checkout, "
                               "pip install '.[monitor]' installs it with the other monitoring extras)")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, tokens)
    summary["unparseable_lines"] = bad
    summary["plots"] = plot(records, tokens, out_dir)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
