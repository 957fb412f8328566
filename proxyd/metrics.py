"""Prometheus metrics (prometheus-client), one registry per app instance — no globals.

Counters and histograms are updated on the request path; state that already lives elsewhere
(upstream health, JWKS age, config generation) is read at scrape time by collectors, so the
hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Request latency, from a cached small POST (~1 ms) to long streams.
# Time added by proxyd: tens of microseconds to a few milliseconds.
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


_M = TypeVar("_M", Counter, Gauge, Histogram)


class Children(Generic[_M]):
    """A labelled metric's children, each looked up once: prometheus-client's ``labels()``
    takes a lock and builds a tuple per call, a measurable share of a request (issue 15).

    Label values come from the configuration or from bounded sets (proxyd.errors' reason
    codes, statuses, the tool names of ``mcp.toolcalls``); ``bound`` only guards against a
    surprise. Forgetting a child forgets nothing counted: prometheus-client keeps it.
    """

    __slots__ = ("_bound", "_children", "_metric")

    def __init__(self, metric: _M, bound: int = 10_000) -> None:
        self._metric: _M = metric
        self._bound = bound
        self._children: dict[tuple[object, ...], _M] = {}

    def get(self, *labels: object) -> _M:
        child = self._children.get(labels)
        if child is None:
            if len(self._children) >= self._bound:
                self._children.clear()
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "proxyd_requests",
            "Requests answered, by app, method and status.",
            ["app", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "proxyd_request_duration_seconds",
            "Time from request to the end of the answer.",
            ["app"],
            buckets=_BUCKETS,
            registry=r,
        )
        # Issue 14 §2 (the dashboard): answers other than a success, by the stable reason code
        # of proxyd's answer (a constant of proxyd.errors, so a bounded label set).
        self.request_errors = Counter(
            "proxyd_request_errors",
            "Requests answered with a proxyd error (or cut), by app and reason code.",
            ["app", "reason"],
            registry=r,
        )
        # What proxyd adds: a forwarded request's time minus its exchange with the app server
        # (from writing the request upstream to the end of the answer).
        self.added_latency = Histogram(
            "proxyd_added_latency_seconds",
            "Time proxyd adds to a forwarded request (its duration minus the upstream exchange).",
            ["app"],
            buckets=_ADDED_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "proxyd_mcp_tool_calls",
            "MCP tools/call requests by app, tool and decision (allowed, denied, step_up). Tool "
            "names other than those the roles name are labelled as the first 64 seen per app, "
            "then _other; names outside MCP's tool name rules are _invalid.",
            ["app", "tool", "decision"],
            registry=r,
        )
        self.open_streams = Gauge(
            "proxyd_open_streams",
            "Streamed answers (SSE, chunked) being relayed now.",
            ["app"],
            registry=r,
        )
        self.auth = Counter(
            "proxyd_auth",
            "Token verifications, by outcome and reason.",
            ["outcome", "reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "proxyd_rate_limited",
            "Requests answered 429, by limit.",
            ["limit"],
            registry=r,
        )
        # The shared state backend (Redis): failed calls, decisions made without it (failed or
        # skipped during the back-off), and whether it answers.
        self.state_errors = Counter(
            "proxyd_state_backend_errors",
            "Failed calls to the shared state backend, by operation.",
            ["op"],
            registry=r,
        )
        self.state_fallbacks = Counter(
            "proxyd_state_backend_fallbacks",
            "Operations answered without the shared state backend (down or failing), by operation.",
            ["op"],
            registry=r,
        )
        self.state_up = Gauge(
            "proxyd_state_backend_up",
            "1 while the shared state backend answers, 0 while proxyd runs without it.",
            ["backend"],
            registry=r,
        )
        self.reloads = Counter(
            "proxyd_config_reloads",
            "Configuration reloads, by source and result.",
            ["source", "result"],
            registry=r,
        )
        # The MCP listener's connections (proxyd/listener.py). The gauge is read at scrape
        # time from the listener's own count (set_function): accepting pays nothing for it.
        self.open_connections = Gauge(
            "proxyd_open_connections",
            "Client connections open on the MCP listener.",
            registry=r,
        )
        self.connections_refused = Counter(
            "proxyd_connections_refused",
            "Client connections closed at accept: server.max_connections were open.",
            registry=r,
        )
        self.connections_closed = Counter(
            "proxyd_connections_closed",
            "Client connections closed by proxyd before a request was read, by reason "
            "(header_timeout: the head did not arrive in time; headers_too_large: answered "
            "431).",
            ["reason"],
            registry=r,
        )

        # [apps.tls] insecure_skip_verify (issue 13 §2): set on start and on each reload.
        self.upstream_tls_insecure = Gauge(
            "proxyd_upstream_tls_insecure",
            "1 for each app whose servers' TLS certificates are not verified "
            "([apps.tls] insecure_skip_verify = true).",
            ["app"],
            registry=r,
        )

        # [tracing] (issue 14 §1, proxyd/tracing.py): spans handed to the collector, and spans
        # lost (the export queue full, an export that failed, the queue left at shutdown).
        # Updated from the exporter's thread: prometheus-client's counters take a lock.
        self.trace_spans_exported = Counter(
            "proxyd_trace_spans_exported",
            "Spans the OTLP collector accepted.",
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "proxyd_trace_spans_dropped",
            "Spans lost before reaching the OTLP collector, by reason (queue_full, "
            "export_failed, shutdown).",
            ["reason"],
            registry=r,
        )
        for reason in ("queue_full", "export_failed", "shutdown"):
            self.trace_spans_dropped.labels(reason)  # at 0 from the start, for rate() and alerts

    def set_insecure_apps(self, apps: Iterable[str]) -> None:
        self.upstream_tls_insecure.clear()
        for app in apps:
            self.upstream_tls_insecure.labels(app=app).set(1)

    def collect_with(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def gauge(
    name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]
) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def counter(
    name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family
