"""`/metrics` in the Prometheus text format (prometheus_client, one registry per server).

    vla_serve_requests_total{protocol, outcome}    answered requests; outcome ok | bad_request | not_found |
                                                   too_large | busy | error
    vla_serve_latency_seconds{stage}               per request: prep (decode + pre-process), queue (ready ->
                                                   forward starts), compute (the batched forward), total
    vla_serve_batch_size                           requests per batched forward
    vla_serve_batches_total{outcome}               batched forwards (ok | error)
    vla_serve_sessions                             open sessions
"""

from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vla_serve_requests", "Answered requests by protocol and outcome",
                                ["protocol", "outcome"], registry=r)
        self.latency = Histogram("vla_serve_latency_seconds", "Per-request latency by stage",
                                 ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vla_serve_batch_size", "Requests per batched forward",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batches = Counter("vla_serve_batches", "Batched forwards by outcome", ["outcome"], registry=r)
        self.sessions = Gauge("vla_serve_sessions", "Open sessions", registry=r)

    def batch(self, size: int, failed: bool) -> None:
        self.batch_size.observe(size)
        self.batches.labels("error" if failed else "ok").inc()

    def request(self, protocol: str, outcome: str, timing: dict | None = None) -> None:
        self.requests.labels(protocol, outcome).inc()
        if timing:
            for stage, key in (("prep", "prep_ms"), ("queue", "queue_ms"), ("compute", "compute_ms"),
                               ("total", "infer_ms")):
                self.latency.labels(stage).observe(timing[key] / 1e3)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
