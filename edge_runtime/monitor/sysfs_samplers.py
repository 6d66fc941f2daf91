"""Samplers that read Linux sysfs: thermal zones (any Linux board) and the Jetson integrated GPU's load and clock.

On a Jetson, NVML gives no temperature, load or power for the integrated GPU (zeros, or not supported), so
these are where `monitor` gets them, as tegrastats does:
- ThermalSampler: /sys/class/thermal/thermal_zone*/type ("cpu-thermal", "gpu-thermal", "tj-thermal", ...) and
  temp in integer millidegrees C. A sensor that is off (Orin's CV0..CV2 while the DLAs sleep) reads -256 C or
  fails to read: left out, as the tegrastats parser leaves it out.
- TegraGpuSampler: the GPU's devfreq node (/sys/class/devfreq/17000000.gpu on Orin with JetPack 6,
  17000000.ga10b with JetPack 5: cur_freq in Hz, and the device's load in tenths of a percent), or the older
  load files (/sys/devices/platform/gpu.0/load, /sys/devices/gpu.0/load) when devfreq is not there.
`root` points the reads at a fake tree in tests.
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_runtime.monitor.samplers import read_int

_SENSOR_OFF_C = -256.0
_ZONE_SUFFIX = re.compile(r"[-_]?therm(al)?$", re.IGNORECASE)
_GPU_NAMES = (".ga10b", ".gv11b")  # the devfreq node of Orin's (JetPack 5: 17000000.ga10b) and Xavier's GPU
_OLD_LOAD_FILES = ("sys/devices/platform/bus@0/17000000.gpu/load", "sys/devices/platform/17000000.gpu/load",
                   "sys/devices/platform/gpu.0/load", "sys/devices/gpu.0/load")


class ThermalSampler:
    name = "thermal"

    def __init__(self, root: str | Path = "/"):
        self.zones: list[tuple[str, Path]] = []  # (sensor name, its temp file)
        for zone in sorted(Path(root).glob("sys/class/thermal/thermal_zone*")):
            try:
                kind = (zone / "type").read_text().strip()
            except OSError:
                continue
            name = _ZONE_SUFFIX.sub("", kind) or kind
            if name and (zone / "temp").exists() and name not in (n for n, _ in self.zones):
                self.zones.append((name, zone / "temp"))

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def sample(self) -> dict:
        temps = {}
        for name, path in self.zones:
            milli = read_int(path)
            if milli is not None and milli / 1000.0 > _SENSOR_OFF_C:
                temps[name] = milli / 1000.0
        return {"temps_c": temps} if temps else {}


class TegraGpuSampler:
    name = "tegra-gpu"

    def __init__(self, root: str | Path = "/"):
        root = Path(root)
        nodes = sorted(d for d in root.glob("sys/class/devfreq/*") if "gpu" in d.name or d.name.endswith(_GPU_NAMES))
        self.freq_file = next((d / "cur_freq" for d in nodes if (d / "cur_freq").exists()), None)
        loads = [d / "device/load" for d in nodes] + [root / p for p in _OLD_LOAD_FILES]
        self.load_file = next((p for p in loads if p.exists()), None)

    @property
    def available(self) -> bool:
        return self.load_file is not None or self.freq_file is not None

    def sample(self) -> dict:
        out = {}
        load = read_int(self.load_file) if self.load_file else None
        if load is not None:
            out["gpu_load_pct"] = load / 10.0  # the file counts tenths of a percent, 0..1000
        hz = read_int(self.freq_file) if self.freq_file else None
        if hz is not None:
            out["gpu_mhz"] = hz / 1e6
        return out
