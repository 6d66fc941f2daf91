"""Power, clocks, memory and per-token latency: samplers, a background recorder, exporters, reports."""
