"""Point-in-time readers. Each returns a flat dict of the fields it knows (missing ones left out).

- Ina3221Sampler: Jetson's INA3221 power monitors through sysfs hwmon (in*_label, in*_input mV,
  curr*_input mA). Labels "NC" (not connected) and the "sum of shunt voltages" channel are skipped.
  The total is VDD_IN where present (Nano, NX), else the sum of the rails (AGX has no VDD_IN).
- NvmlSampler: desktop GPUs through nvidia-ml-py (power, the total-energy counter, clocks, temperature).
- SystemSampler: psutil (CPU load, memory).
`root` points the sysfs reads at a fake tree in tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import psutil


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class Ina3221Sampler:
    name = "ina3221"

    def __init__(self, root: str | Path = "/"):
        self.channels: list[tuple[str, Path, Path]] = []  # (label, voltage file, current file)
        base = Path(root) / "sys/bus/i2c/devices"
        for dev in sorted(base.glob("*")) if base.is_dir() else []:
            try:
                if "ina3221" not in (dev / "name").read_text():
                    continue
            except OSError:
                continue
            for hw in sorted(dev.glob("hwmon/hwmon*")):
                for label_file in sorted(hw.glob("in*_label")):
                    idx = re.match(r"in(\d+)_label", label_file.name).group(1)
                    label = label_file.read_text().strip()
                    if label.upper() == "NC" or "sum" in label.lower():
                        continue
                    self.channels.append((label, hw / f"in{idx}_input", hw / f"curr{idx}_input"))

    @property
    def available(self) -> bool:
        return bool(self.channels)

    def sample(self) -> dict:
        rails = {}
        for label, vfile, cfile in self.channels:
            mv, ma = read_int(vfile), read_int(cfile)
            if mv is not None and ma is not None:
                rails[label] = mv * ma / 1000.0  # mW
        if not rails:
            return {}
        total = rails.get("VDD_IN", sum(rails.values()))
        return {"rails_mw": rails, "power_mw": total}


class NvmlSampler:
    name = "nvml"

    def __init__(self, index: int = 0):
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # ImportError, NVMLError (no driver, no GPU): simply unavailable
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def sample(self) -> dict:
        if self._nvml is None:
            return {}
        n, h = self._nvml, self._handle
        out = {}
        for key, fn in (("power_mw", lambda: n.nvmlDeviceGetPowerUsage(h)),
                        ("energy_mj", lambda: n.nvmlDeviceGetTotalEnergyConsumption(h)),
                        ("gpu_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                        ("mem_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),
                        ("gpu_temp_c", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                        ("gpu_load_pct", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu)):
            try:
                out[key] = float(fn())
            except n.NVMLError:
                continue
        if "gpu_temp_c" in out:
            out["temps_c"] = {"gpu": out.pop("gpu_temp_c")}
        return out

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None


class SystemSampler:
    name = "psutil"
    available = True

    def __init__(self):
        psutil.cpu_percent(None)  # the first call only primes the counter

    def sample(self) -> dict:
        vm = psutil.virtual_memory()
        return {"cpu_load_pct": psutil.cpu_percent(None), "ram_used_mb": (vm.total - vm.available) / 2**20,
                "ram_total_mb": vm.total / 2**20}
