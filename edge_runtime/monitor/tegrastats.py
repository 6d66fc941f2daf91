"""Parse tegrastats lines (every Orin form; see DESIGN.md section 6).

  [MM-DD-YYYY HH:MM:SS] RAM used/totalMB (lfb NxZMB) SWAP used/totalMB (cached NMB)
  CPU [load%@MHz,...|off,...] EMC_FREQ %@MHz GR3D_FREQ %[@MHz|@[MHz,MHz]] [GR3D2_FREQ %@MHz] name@tempC ...
  RAIL currentmW/averagemW ...
The average is cumulative since tegrastats started, so only the current value is used. Orin Nano and
NX report VDD_IN (the module input) as the total; AGX Orin has no VDD_IN, so the total is the sum of
its rails. Some JetPack 5 releases print a second GPU partition (GR3D2_FREQ): its clock joins the list and the
load is the busier one. A rail can read a little below zero at idle (AGX's VDD_CPU_CV -398mW): kept, as the
sysfs sampler keeps it; "NC" (not connected) is no rail. A sensor that is off reads -256C (AGX Orin's
CV0..CV2 when the DLAs sleep) and is left out. A line that cannot be parsed raises TegrastatsParseError (an
impossible date, a number longer than any reading: a line cut and merged with the next when tegrastats
restarts into the same log); readers count and skip those.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

_TS = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D2?_FREQ (\d+)%(?:@\[([\d,\s]+)\]|@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (-?\d+)mW/(-?\d+)mW")


_MAX_DIGITS = 7  # 9,999,999: more than any MB, MHz, mW or % reading; 400 digits would reach the plots as inf
_SENSOR_OFF_C = -256.0
_YEARS = (1970, 2100)  # a board without network time may log 1970; anything outside is a corrupted line


class TegrastatsParseError(ValueError):
    pass


def _bounded(text: str, digits: str) -> str:
    """text, when its integer part `digits` is no longer than any real reading's."""
    if len(digits) > _MAX_DIGITS:
        raise TegrastatsParseError(f"implausible reading {text[:12]}... ({len(digits)} digits)")
    return text


def _int(text: str) -> int:
    return int(_bounded(text, text))


def _float(text: str) -> float:
    """A reading such as 48.5 or -256."""
    return float(_bounded(text, text.lstrip("-").split(".")[0]))


@dataclass
class TegrastatsSample:
    timestamp: datetime.datetime | None
    ram_used_mb: int
    ram_total_mb: int
    swap_used_mb: int | None
    cpu_load_pct: list[float | None]  # None for a core that is off
    cpu_mhz: list[int | None]
    emc_load_pct: float | None
    gpu_load_pct: float | None
    gpu_mhz: list[int]  # one per GPC when reported, else empty
    temps_c: dict[str, float] = field(default_factory=dict)
    rails_mw: dict[str, int] = field(default_factory=dict)  # current values

    @property
    def total_mw(self) -> int | None:
        """VDD_IN where present (Nano, NX), else the sum of rails (AGX)."""
        if "VDD_IN" in self.rails_mw:
            return self.rails_mw["VDD_IN"]
        return sum(self.rails_mw.values()) if self.rails_mw else None

    def to_record(self) -> dict:
        cores = [x for x in self.cpu_load_pct if x is not None]
        return {
            "ts": self.timestamp.timestamp() if self.timestamp else None,
            "ram_used_mb": self.ram_used_mb, "ram_total_mb": self.ram_total_mb,
            "cpu_load_pct": sum(cores) / len(cores) if cores else None,
            "gpu_load_pct": self.gpu_load_pct, "gpu_mhz": max(self.gpu_mhz) if self.gpu_mhz else None,
            "temps_c": dict(self.temps_c), "rails_mw": dict(self.rails_mw), "power_mw": self.total_mw,
        }


def parse_line(line: str) -> TegrastatsSample:
    text = line.strip()
    ts = None
    m = _TS.match(text)
    if m:
        try:
            ts = datetime.datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
        except ValueError:  # 02-30-2025, 25:00:00
            raise TegrastatsParseError(f"impossible timestamp {m.group(1)!r}") from None
        if not _YEARS[0] <= ts.year <= _YEARS[1]:  # year 1 has no epoch time; 9999 would stretch the plots
            raise TegrastatsParseError(f"implausible timestamp {m.group(1)!r}")
        text = text[m.end():]
    ram = _RAM.search(text)
    if not ram:
        raise TegrastatsParseError(f"no RAM field in tegrastats line: {line[:80]!r}")
    swap = _SWAP.search(text)
    loads: list[float | None] = []
    mhz: list[int | None] = []
    cpu = _CPU.search(text)
    if cpu:
        for core in cpu.group(1).split(","):
            core = core.strip()
            if core == "off" or not core:
                loads.append(None)
                mhz.append(None)
                continue
            cm = re.fullmatch(r"(\d+)%(?:@(\d+))?", core)
            if not cm:
                raise TegrastatsParseError(f"bad CPU entry {core!r}")
            loads.append(_float(cm.group(1)))
            mhz.append(_int(cm.group(2)) if cm.group(2) else None)
    emc = _EMC.search(text)
    gpu_loads: list[float] = []
    gpu_mhz: list[int] = []
    for gr3d in _GR3D.finditer(text):
        gpu_loads.append(_float(gr3d.group(1)))
        if gr3d.group(2):
            gpu_mhz += [_int(v.strip()) for v in gr3d.group(2).split(",") if v.strip()]
        elif gr3d.group(3):
            gpu_mhz.append(_int(gr3d.group(3)))
    rails = {name: _int(cur) for name, cur, _avg in _RAIL.findall(text) if name != "NC"}
    temps = {name: _float(v) for name, v in _TEMP.findall(text) if name not in ("EMC_FREQ", "GR3D_FREQ")}
    temps = {name: v for name, v in temps.items() if v > _SENSOR_OFF_C}
    return TegrastatsSample(
        timestamp=ts, ram_used_mb=_int(ram.group(1)), ram_total_mb=_int(ram.group(2)),
        swap_used_mb=_int(swap.group(1)) if swap else None, cpu_load_pct=loads, cpu_mhz=mhz,
        emc_load_pct=_float(emc.group(1)) if emc else None, gpu_load_pct=max(gpu_loads) if gpu_loads else None,
        gpu_mhz=gpu_mhz, temps_c=temps, rails_mw=rails)


def parse_log(lines) -> tuple[list[TegrastatsSample], int]:
    """(samples, number of unparseable non-empty lines skipped)."""
    samples, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            samples.append(parse_line(line))
        except TegrastatsParseError:
            bad += 1
    return samples, bad
