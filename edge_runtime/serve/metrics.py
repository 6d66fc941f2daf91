"""Prometheus metrics of the daemon. Request labels are bounded: the endpoint is the route's path when
the request matched a route, else "other", so random paths cannot grow the registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from edge_runtime.serve.engine import Engine

OTHER = "other"


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.routes: frozenset[str] = frozenset()  # filled in by create_app once the routes exist
        self.requests = Counter("edge_runtime_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("edge_runtime_generated_tokens", "tokens generated", registry=self.registry)
        g = Gauge("edge_runtime_queue_depth", "requests waiting", registry=self.registry)
        g.set_function(lambda: engine.queued)
        g = Gauge("edge_runtime_busy", "1 while a generation runs", registry=self.registry)
        g.set_function(lambda: float(engine.busy))
        g = Gauge("edge_runtime_decode_tokens_per_second", "tokens/s of the last finished request",
                  registry=self.registry)
        g.set_function(lambda: engine.last_tokens_per_s)
        g = Gauge("edge_runtime_cancelled_jobs", "jobs cancelled because their client left (or at shutdown)",
                  registry=self.registry)
        g.set_function(lambda: engine.cancelled)
        g = Gauge("edge_runtime_failed_jobs", "jobs that ended in an internal or model error", registry=self.registry)
        g.set_function(lambda: engine.failed)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.routes else OTHER, str(status)).inc()
