"""Prometheus metrics of one sink consumer, labelled by sink (and rule, reason, state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class _RuleCounters:
    def __init__(self, metrics: SinkMetrics, rule: str) -> None:
        self.routed = metrics.routed.labels(metrics.sink, rule)
        self.delivered = metrics.delivered.labels(metrics.sink, rule)
        self.failed = metrics.mapping_errors.labels(metrics.sink, rule)


class SinkMetrics:
    def __init__(self, sink: str, registry: CollectorRegistry) -> None:
        self.sink = sink

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ["sink", *labels], registry=registry)

        self._consumed = counter("router_sink_consumed", "Events read from Kafka")
        self._filtered = counter("router_sink_filtered", "Events no rule routed (committed)")
        self.routed = counter("router_sink_routed", "Rule outputs produced", "rule")
        self.delivered = counter("router_sink_delivered", "Rule outputs delivered", "rule")
        self.mapping_errors = counter("router_sink_mapping_errors", "Rule failures", "rule")
        self._retried = counter("router_sink_retried", "Outputs scheduled for another attempt")
        self._dead = counter("router_sink_dead_lettered", "Outputs dead-lettered", "reason")
        self._throttled = counter(
            "router_sink_throttled_seconds", "Time waited for the sink's rate limits"
        )
        self._requests = Histogram(
            "router_sink_request_seconds",
            "HTTP request latency by status (error = no response)",
            ["sink", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self._batch = Histogram(
            "router_sink_batch_size",
            "Events per HTTP request",
            ["sink"],
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=registry,
        )
        self._lag = Gauge(
            "router_sink_consumer_lag",
            "Records between the consumer's position and the end of the partition",
            ["sink", "topic", "partition"],
            registry=registry,
        )
        self._state = Gauge(
            "router_sink_state",
            "1 for the sink's current state",
            ["sink", "state"],
            registry=registry,
        )
        self._inflight = Gauge(
            "router_sink_inflight_events",
            "Events read and not yet finished",
            ["sink"],
            registry=registry,
        )
        self.consumed = self._consumed.labels(sink)
        self.filtered = self._filtered.labels(sink)
        self.retried = self._retried.labels(sink)
        self.throttled_seconds = self._throttled.labels(sink)
        self.batch_size = self._batch.labels(sink)
        self.inflight = self._inflight.labels(sink)
        self._rules: dict[str, _RuleCounters] = {}

    def rule(self, rule_id: str) -> _RuleCounters:
        counters = self._rules.get(rule_id)
        if counters is None:
            counters = self._rules[rule_id] = _RuleCounters(self, rule_id)
        return counters

    @property
    def dead_lettered(self) -> Any:
        return _Bound(self._dead, self.sink)

    @property
    def request_seconds(self) -> Any:
        return _Bound(self._requests, self.sink)

    @property
    def lag(self) -> Any:
        return _BoundLag(self._lag, self.sink)

    @property
    def state(self) -> Any:
        return _Bound(self._state, self.sink)


class _Bound:
    def __init__(self, metric: Any, sink: str) -> None:
        self._metric = metric
        self._sink = sink

    def labels(self, *values: str) -> Any:
        return self._metric.labels(self._sink, *values)


class _BoundLag(_Bound):
    def labels(self, *values: str) -> Any:
        partition, topic = values
        return self._metric.labels(self._sink, topic, partition)
