"""Prometheus text exposition of the recorder's latest sample (a custom collector, so that every scrape
reads the newest values without extra threads)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from edge_runtime.monitor.recorder import Recorder
from edge_runtime.monitor.summary import live_rates


class RecorderCollector:
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def collect(self):
        rec = self.recorder.latest()
        rails = GaugeMetricFamily("edge_runtime_rail_power_milliwatts", "power by rail", labels=["rail"])
        for name, mw in (rec.get("rails_mw") or {}).items():
            rails.add_metric([name], mw)
        yield rails
        temps = GaugeMetricFamily("edge_runtime_temperature_celsius", "temperature by sensor", labels=["sensor"])
        for name, c in (rec.get("temps_c") or {}).items():
            temps.add_metric([name], c)
        yield temps
        for key, metric, help_ in (("power_mw", "edge_runtime_power_milliwatts", "total power"),
                                   ("cpu_load_pct", "edge_runtime_cpu_load_percent", "CPU load"),
                                   ("gpu_load_pct", "edge_runtime_gpu_load_percent", "GPU load"),
                                   ("gpu_mhz", "edge_runtime_gpu_clock_mhz", "GPU clock"),
                                   ("ram_used_mb", "edge_runtime_ram_used_megabytes", "RAM in use")):
            if rec.get(key) is not None:
                yield GaugeMetricFamily(metric, help_, value=float(rec[key]))
        rates = live_rates(self.recorder)
        for key, metric, help_ in (("tokens_per_s", "edge_runtime_tokens_per_second", "decode tokens/s"),
                                   ("joules_per_token", "edge_runtime_joules_per_token", "energy per token")):
            if rates.get(key) is not None:
                yield GaugeMetricFamily(metric, help_, value=rates[key])
        if rec.get("power_mode"):
            info = InfoMetricFamily("edge_runtime_power_mode", "current power mode")
            info.add_metric([], {"mode": str(rec["power_mode"])})
            yield info


def registry_for(recorder: Recorder) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RecorderCollector(recorder))
    return registry
