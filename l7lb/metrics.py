# -*- test-case-name: tests.test_admin -*-
"""
Metrics in Prometheus form.

The hot path only adds to plain integers and bucket counts keyed by bounded
labels (route, pool and backend names from the configuration, status class);
prometheus-client turns them into the exposition format when /metrics is
scraped, through a custom collector, so a request pays a few dictionary
updates and no metric-library locking.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

# Latency buckets in seconds, from a fast local hop to a slow backend.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """
    Bucket counts and a sum, per label tuple.
    """

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, ...], list[int]] = defaultdict(
            lambda: [0] * (len(BUCKETS) + 1)
        )
        self.sums: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        self.counts[labels][bisect_left(BUCKETS, seconds)] += 1
        self.sums[labels] += seconds

    def family(
        self, name: str, documentation: str, label_names: list[str]
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, counts in self.counts.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            family.add_metric(list(labels), buckets, self.sums[labels])
        return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(code: int) -> str:
    return _CLASSES[code // 100] if 100 <= code <= 599 else "other"


class Metrics:
    """
    What l7lb counts as it serves; read by L{BalancerCollector}.
    """

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str, str]] = Counter()
        self.request_seconds = Histogram()
        self.upstream_seconds = Histogram()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connections_open = 0
        self.connections_total = 0
        self.health_checks: Counter[tuple[str, str, str]] = Counter()

    def request(
        self,
        route: str,
        pool: str,
        backend: str,
        code: int,
        seconds: float,
        received: int,
        sent: int,
    ) -> None:
        self.requests[(route, pool, backend, status_class(code))] += 1
        self.request_seconds.observe((route,), seconds)
        self.bytes_received += received
        self.bytes_sent += sent

    def upstream(self, pool: str, backend: str, seconds: float) -> None:
        self.upstream_seconds.observe((pool, backend), seconds)


class BalancerCollector(Collector):
    """
    Builds the metric families at scrape time from L{Metrics} and the
    running balancer's state (C{state()} returns its pools and policies).
    """

    def __init__(self, metrics: Metrics, state: Callable[[], Any]) -> None:
        self.metrics = metrics
        self.state = state

    def collect(self) -> Iterator[Any]:
        metrics = self.metrics
        requests = CounterMetricFamily(
            "l7lb_requests",
            "Requests answered, by route, pool, backend and status class.",
            labels=["route", "pool", "backend", "code"],
        )
        for labels, count in metrics.requests.items():
            requests.add_metric(list(labels), count)
        yield requests
        yield metrics.request_seconds.family(
            "l7lb_request_duration_seconds",
            "Time from a request's head to the end of its answer.",
            ["route"],
        )
        yield metrics.upstream_seconds.family(
            "l7lb_upstream_response_seconds",
            "Time from sending a request to a backend to its response headers.",
            ["pool", "backend"],
        )
        sent = CounterMetricFamily(
            "l7lb_sent_bytes", "Response body bytes sent to clients."
        )
        sent.add_metric([], metrics.bytes_sent)
        yield sent
        received = CounterMetricFamily(
            "l7lb_received_bytes", "Request body bytes received from clients."
        )
        received.add_metric([], metrics.bytes_received)
        yield received
        connections = GaugeMetricFamily(
            "l7lb_client_connections", "Client connections open now."
        )
        connections.add_metric([], metrics.connections_open)
        yield connections
        accepted = CounterMetricFamily(
            "l7lb_client_connections_accepted", "Client connections accepted."
        )
        accepted.add_metric([], metrics.connections_total)
        yield accepted
        checks = CounterMetricFamily(
            "l7lb_health_checks",
            "Active health checks, by pool, backend and result.",
            labels=["pool", "backend", "result"],
        )
        for check, count in metrics.health_checks.items():
            checks.add_metric(list(check), count)
        yield checks
        yield from self._state_families()

    def _state_families(self) -> Iterator[Any]:
        pools, policies = self.state()
        total = GaugeMetricFamily(
            "l7lb_requests_in_flight", "Requests being forwarded to backends now."
        )
        total.add_metric([], sum(pool.inflight for pool in pools.values()))
        yield total
        up = GaugeMetricFamily(
            "l7lb_backend_up",
            "1 when the backend is in rotation, else 0.",
            labels=["pool", "backend"],
        )
        inflight = GaugeMetricFamily(
            "l7lb_backend_requests_in_flight",
            "Requests in flight to the backend.",
            labels=["pool", "backend"],
        )
        ejections = CounterMetricFamily(
            "l7lb_backend_ejections",
            "Times passive health ejected the backend.",
            labels=["pool", "backend"],
        )
        retries = CounterMetricFamily(
            "l7lb_retries", "Requests retried on another backend.", labels=["pool"]
        )
        queued = CounterMetricFamily(
            "l7lb_queued", "Requests that waited in the pool's queue.", labels=["pool"]
        )
        shed = CounterMetricFamily(
            "l7lb_shed",
            "Requests refused because the caps and the queue were full.",
            labels=["pool"],
        )
        for pool in pools.values():
            retries.add_metric([pool.name], pool.retried)
            queued.add_metric([pool.name], pool.queued)
            shed.add_metric([pool.name], pool.shed)
            for backend in pool.backends:
                labels = [pool.name, backend.address]
                up.add_metric(labels, 1 if backend.in_rotation else 0)
                inflight.add_metric(labels, backend.inflight)
                passive = backend.passive
                ejections.add_metric(labels, passive.total_ejections if passive else 0)
        limited = CounterMetricFamily(
            "l7lb_ratelimit_refused",
            "Requests refused by a route's rate limit.",
            labels=["route"],
        )
        allowed = CounterMetricFamily(
            "l7lb_ratelimit_allowed",
            "Requests that took a token of a route's rate limit.",
            labels=["route"],
        )
        for name, policy in policies.items():
            if policy.limiter is not None:
                limited.add_metric([name], policy.limiter.refused)
                allowed.add_metric([name], policy.limiter.allowed)
        yield from (up, inflight, ejections, retries, queued, shed, limited, allowed)


def registry(collector: BalancerCollector) -> CollectorRegistry:
    """
    A registry of l7lb's own metrics only (no process or platform metrics,
    whose label sets are not l7lb's to bound).
    """
    result = CollectorRegistry(auto_describe=False)
    result.register(collector)
    return result
