"""Prometheus metrics of the ingest service, on a registry owned by each app instance.

A registry per app (not the process-global default) keeps tests independent and lets one process
host several apps, as the benchmark does.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Produce latency spans sub-millisecond acks on a local broker to the 10 s produce timeout.
_PRODUCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "router_ingest_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=registry,
        )
        self.events_accepted = Counter(
            "router_ingest_events_accepted",
            "Events acknowledged by Kafka and answered 2xx, by source (webhook, track)",
            ["source"],
            registry=registry,
        )
        self.rejected = Counter(
            "router_ingest_rejected",
            "Requests refused with all their events, by route and reason",
            ["route", "reason"],
            registry=registry,
        )
        self.produce_seconds = Histogram(
            "router_ingest_produce_seconds",
            "Time from handing a request's events to Kafka until all are acknowledged (or fail)",
            buckets=_PRODUCE_BUCKETS,
            registry=registry,
        )
        # Labelled children, looked up once: .labels() costs microseconds on every request.
        self._children: dict[tuple[Any, ...], Any] = {}
        self.inflight = Gauge(
            "router_ingest_inflight_requests",
            "Requests currently waiting for Kafka acknowledgement",
            registry=registry,
        )

    def _child(self, metric: Counter, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, route: str, status: str) -> Any:
        return self._child(self.requests, route, status)

    def accepted(self, source: str) -> Any:
        return self._child(self.events_accepted, source)

    def rejection(self, route: str, reason: str) -> Any:
        return self._child(self.rejected, route, reason)
