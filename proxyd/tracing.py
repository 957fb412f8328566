"""OpenTelemetry traces of MCP requests over OTLP/HTTP (issue 14 §1); off without an endpoint.

``Tracing`` owns the exporter: a TracerProvider of this instance (never the global one: one per
app, like ``Metrics``), a batching processor whose queue is bounded here, and an exporter that
counts what it sends and what is lost (``proxyd_trace_spans_exported_total``,
``proxyd_trace_spans_dropped_total{reason}``). Spans leave from the SDK's worker thread: the
event loop only appends to a deque, and a collector that is down costs requests nothing.

``RequestTracer`` (one per installed configuration) opens a ``RequestTrace`` per request. With
tracing off the handler holds ``None`` and no span, context or carrier is ever made.

A request's SERVER span starts once its parent is known: the ``traceparent`` header, else the
JSON-RPC ``params._meta.traceparent`` (MCP), which is only read after the token was verified.
Work done before that (a new token's verification, a JWKS fetch) is recorded as timed steps
and emitted as the server span's children, with their own start and end times, once it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from multidict import CIMultiDict
from opentelemetry import trace as otel
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxyd import __version__
from proxyd.config import Settings, TracingSettings
from proxyd.log import get_logger
from proxyd.metrics import Metrics
from proxyd.netaddr import is_trusted

if TYPE_CHECKING:
    from aiohttp import web

    from proxyd.access import AccessRecord
    from proxyd.forward import Outcome
    from proxyd.mcp.exchange import Exchange

log = get_logger("proxyd.tracing")

ROUTE: Final = "/mcp/apps/{app}"
MAX_QUEUE: Final = 2048  # spans waiting for export; beyond it new ones are dropped and counted
BATCH: Final = 512
EXPORT_TIMEOUT: Final = 10.0  # one export with its retries (the SDK's default)
CLOSE_TIMEOUT: Final = 5.0  # the final flush at shutdown, at most
STOP_TIMEOUT: Final = 2.0  # then, retries stopped, for the worker thread to end
FAILURE_LOG_INTERVAL: Final = 60.0
# OTel HTTP semantic conventions: http.request.method is one of these, else "_OTHER".
_KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
# W3C Trace Context §3: the two fields; validation (version, lengths, hex, all-zero ids) is the
# SDK propagator's, and a field it refuses gives no context at all (no parent, no link).
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_EXPORT_LOGGERS: Final = ("opentelemetry.exporter.otlp", "opentelemetry.sdk._shared_internal")

# The request being traced, for the steps its token verification takes (in tasks created on
# its behalf too: asyncio copies the context into them). Only set while tracing is on.
_CURRENT: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "proxyd_trace", default=None
)
_OPEN_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar(
    "proxyd_trace_step", default=None
)


# ---------------------------------------------------------------------------------------------
# The exporter side: counted, bounded, closed in bounded time.


class _ExportLog(logging.Filter):
    """Keeps the exporter's last complaint for proxyd's own (structured, rate-limited) warning;
    the SDK's unstructured lines would otherwise reach stderr for every failed batch."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.last = record.getMessage()[:300]
        return False


class CountingExporter(SpanExporter):
    """The OTLP exporter, counting what the collector accepted and what was lost on the way."""

    def __init__(self, inner: SpanExporter, metrics: Metrics, on_failure: Any = None) -> None:
        self._inner = inner
        self._exported = metrics.trace_spans_exported
        self._failed = metrics.trace_spans_dropped.labels("export_failed")
        self._on_failure = on_failure
        self.handed = 0  # spans taken off the queue (written by the export thread only)
        self.closing = False
        self.last_failed = False  # the latest export failed: the collector looks unreachable
        self._failed_while_closing = False
        self._stopped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        count = len(spans)
        self.handed += count
        if self._failed_while_closing:
            # Shutting down with the collector unreachable: no retries for each batch left.
            self._failed.inc(count)
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        except Exception:  # noqa: BLE001 - an exporter bug must not stop the SDK's worker
            result = SpanExportResult.FAILURE
        self.last_failed = result is not SpanExportResult.SUCCESS
        if result is SpanExportResult.SUCCESS:
            self._exported.inc(count)
        else:
            self._failed.inc(count)
            self._failed_while_closing = self.closing
            if self._on_failure is not None:
                self._on_failure(count)
        return result

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._inner.shutdown()

    def stop_retries(self) -> None:
        """From the closing thread: an export retrying with back-off (the OTLP exporter tries
        for up to its timeout) gives up at once, and any later one fails at once; so the SDK's
        worker thread ends now, not up to EXPORT_TIMEOUT after the close."""
        self.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class BoundedProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor behind a bound of our own, so that every lost span is
    counted. The SDK's queue is a deque of the same size that silently drops its oldest span
    when full; here a span is refused (and counted) while ``MAX_QUEUE`` spans have been queued
    and not yet handed to the exporter, which keeps the SDK's deque from ever overflowing."""

    def __init__(self, exporter: CountingExporter, metrics: Metrics) -> None:
        self._exporter = exporter
        self._batch = BatchSpanProcessor(
            exporter, max_queue_size=MAX_QUEUE, max_export_batch_size=BATCH
        )  # the schedule delay: OTEL_BSP_SCHEDULE_DELAY, default 5 s
        self._full = metrics.trace_spans_dropped.labels("queue_full")
        self._shutdown = metrics.trace_spans_dropped.labels("shutdown")
        self.queued = 0  # spans given to the batch processor (the loop's thread only)
        self.closed = False

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        if self.closed:
            self._shutdown.inc()
            return
        if self.queued - self._exporter.handed >= MAX_QUEUE:
            self._full.inc()
            return
        self.queued += 1
        self._batch.on_end(span)

    def waiting(self) -> int:
        return max(0, self.queued - self._exporter.handed)

    def shutdown(self) -> None:
        self.closed = True
        self._batch.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


class Tracing:
    """The long-lived part: provider, processor, exporter. Built in ``open_resources`` (the
    running loop's thread), closed by its exit stack."""

    def __init__(self, settings: TracingSettings, metrics: Metrics) -> None:
        self._loop = asyncio.get_running_loop()
        self._last_failure_log = 0.0
        self._export_log = _ExportLog()
        for name in _EXPORT_LOGGERS:
            logging.getLogger(name).addFilter(self._export_log)
        inner = OTLPSpanExporter(
            endpoint=f"{settings.otlp_endpoint}/v1/traces",
            headers=settings.headers.reveal(),  # the secret goes to the exporter, nowhere else
            timeout=EXPORT_TIMEOUT,
        )
        self.exporter = CountingExporter(inner, metrics, self._export_failed)
        self.processor = BoundedProcessor(self.exporter, metrics)
        self._dropped_at_shutdown = metrics.trace_spans_dropped.labels("shutdown")
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create(
                {"service.name": settings.service_name, "service.version": __version__}
            ),
            shutdown_on_exit=False,  # the exit stack closes it, in bounded time
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("proxyd", __version__)
        log.info(
            "tracing_enabled",
            endpoint=settings.otlp_endpoint,
            sample_ratio=settings.sample_ratio,
            service_name=settings.service_name,
            headers=list(settings.headers.names),  # names only: the values are secrets
        )

    def _export_failed(self, count: int) -> None:
        # The export thread: the warning is written on the loop's thread, at most once a minute.
        now = time.monotonic()
        if now - self._last_failure_log < FAILURE_LOG_INTERVAL:
            return
        self._last_failure_log = now
        error = self._export_log.last
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to tell
            self._loop.call_soon_threadsafe(self._log_failure, count, error)

    @staticmethod
    def _log_failure(count: int, error: str | None) -> None:
        log.warning(
            "trace_export_failed",
            spans=count,
            error=error,
            detail="spans are dropped and counted in proxyd_trace_spans_dropped_total",
        )

    async def close(self) -> None:
        """Flush what is queued and stop the worker, waiting at most ``CLOSE_TIMEOUT``: the SDK
        blocks (a thread join, exports with retries), so it runs on a thread of its own."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self.exporter.closing = True

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # closed already: we stopped waiting
                    loop.call_soon_threadsafe(settle)

        if self.exporter.last_failed:
            # The collector is unreachable: the queue cannot be flushed, and an export still
            # retrying would keep the worker thread alive past the close.
            self.exporter.stop_retries()
        # A daemon thread: one stuck on an unreachable collector never holds the exit up.
        threading.Thread(target=shutdown, name="proxyd-tracing-close", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), CLOSE_TIMEOUT)
        except TimeoutError:
            # Still flushing (a slow collector): stop the retries, then the worker ends.
            self.exporter.stop_retries()
            try:
                await asyncio.wait_for(asyncio.shield(done), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("tracing_close_timeout", waited=CLOSE_TIMEOUT + STOP_TIMEOUT)
        left = self.processor.waiting()
        if left:
            self._dropped_at_shutdown.inc(left)
        for name in _EXPORT_LOGGERS:
            logging.getLogger(name).removeFilter(self._export_log)


# ---------------------------------------------------------------------------------------------
# Per request.


class RequestTracer:
    """What the configuration in force says about traces: whom to believe, what to record."""

    def __init__(self, tracing: Tracing, settings: Settings) -> None:
        self.tracer = tracing.tracer
        self.trusted = settings.server.trusted_proxies
        self.trust_all = settings.tracing.trust_client_context
        self.include_user = settings.tracing.include_user

    def begin(self, request: web.Request, record: AccessRecord) -> RequestTrace:
        trace = RequestTrace(self, request)
        record.trace = trace
        return trace


class Step:
    """A timed piece of a request's work, emitted as a child span when its parent exists."""

    __slots__ = ("attributes", "end_ns", "error", "kind", "name", "parent", "span", "start_ns")

    def __init__(
        self, name: str, kind: SpanKind, attributes: Mapping[str, str], parent: Step | None
    ) -> None:
        self.name = name
        self.kind = kind
        self.attributes = dict(attributes)
        self.parent = parent
        self.start_ns = time.time_ns()
        self.end_ns: int | None = None
        self.error: str | None = None
        self.span: Span | None = None

    def fail(self, error_type: str) -> None:
        self.error = error_type


class _NoStep:
    __slots__ = ()

    def fail(self, error_type: str) -> None:
        pass


_NO_STEP: Final = _NoStep()


@contextmanager
def step(
    name: str, attributes: Mapping[str, str], *, client: bool = False
) -> Iterator[Step | _NoStep]:
    """Time ``name`` as a child of the request being traced (nothing when there is none): a
    new token's verification, a JWKS fetch. An exception ends it with its error.type."""
    trace = _CURRENT.get()
    if trace is None:
        yield _NO_STEP
        return
    kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
    note = Step(name, kind, attributes, _OPEN_STEP.get())
    trace.steps.append(note)
    token = _OPEN_STEP.set(note)
    try:
        yield note
    except BaseException as exc:
        if note.error is None:
            note.fail(error_type(exc))
        raise
    finally:
        _OPEN_STEP.reset(token)
        note.end_ns = time.time_ns()
        trace.flush_steps()


def error_type(exc: BaseException) -> str:
    """OTel's error.type: proxyd's reason code when there is one, else the exception's class."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else type(exc).__qualname__


class RequestTrace:
    """One request's SERVER span (OTel HTTP semantic conventions, plus MCP's and proxyd's
    attributes), its recorded steps and its upstream attempts."""

    __slots__ = (
        "_context",
        "_owner",
        "_request",
        "_token",
        "_trace_id",
        "attempted",
        "decision",
        "ended",
        "exchange",
        "span",
        "start_ns",
        "steps",
    )

    def __init__(self, owner: RequestTracer, request: web.Request) -> None:
        self._owner = owner
        self._request = request
        self.start_ns = time.time_ns()
        self.span: Span | None = None
        self._context: Context | None = None
        self.exchange: Exchange | None = None
        self.decision: str | None = None
        self.attempted = False
        self.ended = False
        self.steps: list[Step] = []
        self._trace_id: str | None = None
        self._token = _CURRENT.set(self)

    # -- the server span ----------------------------------------------------------------------

    def read(self, exchange: Exchange) -> None:
        """The request's MCP reading: its ``_meta`` may carry the trace context; the span
        starts now if it has not yet (an invalid message's audit record may have started it)."""
        self.exchange = exchange
        if self.span is None:
            self._start(exchange)

    @property
    def trace_id(self) -> str:
        """32 hex digits (W3C Trace Context §3.2.2.3), for the access line and the audit."""
        if self._trace_id is None:  # read by the access line and each audit record
            self._trace_id = format(self._started().get_span_context().trace_id, "032x")
        return self._trace_id

    def _started(self) -> Span:
        if self.span is None:
            self._start(self.exchange)
        assert self.span is not None
        return self.span

    def _start(self, exchange: Exchange | None) -> None:
        request = self._request
        owner = self._owner
        remote = _client_context(request, exchange)
        parent = Context()  # explicit: never whatever OTel context the loop holds
        links: list[Link] = []
        if remote is not None:
            if owner.trust_all or is_trusted(request.remote, owner.trusted):
                parent = otel.set_span_in_context(otel.NonRecordingSpan(remote), parent)
            else:
                # Not continued (a client cannot choose proxyd's trace or force its sampling),
                # yet kept: OTel's span links relate a trace to a causal one it does not join.
                links.append(Link(remote))
        method = request.method if request.method in _KNOWN_METHODS else "_OTHER"
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "http.route": ROUTE,
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        }
        host, port = _host_port(request.host)
        attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        span = owner.tracer.start_span(
            f"{method if method != '_OTHER' else 'HTTP'} {ROUTE}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
            start_time=self.start_ns,
        )
        self.span = span
        self._context = otel.set_span_in_context(span, Context())
        self.flush_steps()

    def end(self, status: int, record: AccessRecord, answer: web.StreamResponse | None) -> None:
        """At the access line: the answer's status and everything the request learned."""
        span = self._started()
        self.ended = True
        _CURRENT.reset(self._token)
        if not span.is_recording():
            span.end()
            return
        attributes: dict[str, str | int] = {"http.response.status_code": status}
        if record.client is not None:
            attributes["client.address"] = record.client
        if record.app is not None:
            attributes["proxyd.app"] = record.app
        reason = record.reason
        decision = self.decision
        if decision is None:
            # Refused by proxyd itself (token, origin, limiter, policy…) before any upstream;
            # a 499 is the client leaving, not a refusal.
            refused = reason is not None and 400 <= status < 500 and status != 499
            decision = "denied" if refused and not self.attempted else "allowed"
        attributes["proxyd.decision"] = decision
        if reason is not None:
            attributes["proxyd.reason"] = reason
        if record.user is not None and self._owner.include_user:
            attributes["enduser.id"] = record.user
        exchange = self.exchange
        if exchange is not None:
            _mcp_attributes(attributes, exchange)
        session_id = answer.headers.get("Mcp-Session-Id") if answer is not None else None
        if session_id is None and exchange is not None:
            session_id = exchange.client_id
        if session_id is not None:
            attributes["mcp.session.id"] = session_id
        outcome = record.outcome
        if status >= 500:
            # HTTP semconv: a server span is an error for 5xx only (4xx is the client's).
            attributes["error.type"] = reason or str(status)
            span.set_status(Status(StatusCode.ERROR))
        elif outcome is not None and outcome.broken and outcome.broken != "client_disconnected":
            attributes["error.type"] = outcome.broken
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)
        span.end()

    # -- children ------------------------------------------------------------------------------

    def flush_steps(self) -> None:
        """Emit the steps that ended, parents first (a step's list index follows its start)."""
        context = self._context
        if context is None or self.ended:
            return
        tracer = self._owner.tracer
        for note in self.steps:
            if note.span is not None or note.end_ns is None:
                continue
            parent = note.parent
            if parent is None:
                where = context
            elif parent.span is None:
                continue  # emitted after its parent, once that one ends
            else:
                where = otel.set_span_in_context(parent.span, Context())
            span = tracer.start_span(
                note.name,
                context=where,
                kind=note.kind,
                attributes=note.attributes,
                start_time=note.start_ns,
            )
            if note.error is not None:
                span.set_attribute("error.type", note.error)
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=note.end_ns)
            note.span = span

    def attempt(
        self, method: str, target: str, headers: CIMultiDict[str], outcome: Outcome
    ) -> Attempt:
        """A CLIENT span for one try of one app server; its context goes upstream."""
        self.attempted = True
        self._started()
        assert self._context is not None
        url = _split_origin(target)
        attributes: dict[str, str | int] = {
            "http.request.method": method if method in _KNOWN_METHODS else "_OTHER",
            "server.address": url[0],
            "server.port": url[1],
            "url.full": target,
        }
        span = self._owner.tracer.start_span(
            method if method in _KNOWN_METHODS else "HTTP",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        # W3C Trace Context §2.2: proxyd is a participant, so the app server gets proxyd's
        # span as parent; the client's fields (trusted or not) are replaced, never forwarded.
        headers.popall("traceparent", None)
        headers.popall("tracestate", None)
        _PROPAGATOR.inject(headers, context=otel.set_span_in_context(span, Context()))
        return Attempt(span, outcome)


class Attempt:
    """``with trace.attempt(...)`` around one forward: ends the span with what happened."""

    __slots__ = ("_outcome", "span")

    def __init__(self, span: Span, outcome: Outcome) -> None:
        self.span = span
        self._outcome = outcome

    def __enter__(self) -> Attempt:
        return self

    def failover(self, reason: str) -> None:
        """This server failed before the request was sent, and another one is tried."""
        self.span.set_attributes({"proxyd.failover.reason": reason, "error.type": reason})
        self.span.set_status(Status(StatusCode.ERROR))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self.span
        outcome = self._outcome
        if outcome.status:
            span.set_attribute("http.response.status_code", outcome.status)
        error = None
        if exc is not None:
            error = error_type(exc)
        elif outcome.status >= 500:
            error = str(outcome.status)
        elif outcome.broken is not None and outcome.broken != "client_disconnected":
            error = outcome.broken
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class _NoAttempt:
    """Tracing off: the router's ``with`` costs two calls, nothing is made."""

    __slots__ = ()

    def __enter__(self) -> _NoAttempt:
        return self

    def failover(self, reason: str) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


_NO_ATTEMPT: Final = _NoAttempt()


def upstream_attempt(
    record: AccessRecord,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    outcome: Outcome,
) -> Attempt | _NoAttempt:
    trace = record.trace
    if trace is None:
        return _NO_ATTEMPT
    return trace.attempt(method, target, headers, outcome)


# ---------------------------------------------------------------------------------------------
# Helpers.


def _client_context(request: web.Request, exchange: Exchange | None) -> SpanContext | None:
    """The client's trace context: the ``traceparent`` header, else MCP's
    ``params._meta.traceparent`` (where SDKs that trace put it); a malformed one is none."""
    headers = request.headers
    parents = headers.getall("traceparent", ())
    if parents:
        # W3C Trace Context §3.2: more than one traceparent field is invalid.
        if len(parents) > 1:
            return None
        states = headers.getall("tracestate", ())
        return _extract(parents[0], ",".join(states) if states else None)
    meta = exchange.param("_meta") if exchange is not None else None
    if isinstance(meta, dict):
        parent = meta.get("traceparent")
        state = meta.get("tracestate")
        if isinstance(parent, str):
            return _extract(parent, state if isinstance(state, str) else None)
    return None


def _extract(traceparent: str, tracestate: str | None) -> SpanContext | None:
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier, context=Context())
    span_context = otel.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def _mcp_attributes(attributes: dict[str, str | int], exchange: Exchange) -> None:
    # OTel semantic conventions for MCP (gen-ai/mcp): method, tool, JSON-RPC id.
    method = exchange.method
    if method is None:
        return
    attributes["mcp.method.name"] = method
    if method == "tools/call":
        name = exchange.param("name")
        if isinstance(name, str):
            attributes["gen_ai.tool.name"] = name
    message = exchange.message
    rpc_id = message.get("id") if message is not None else None
    if isinstance(rpc_id, str | int) and not isinstance(rpc_id, bool):
        attributes["jsonrpc.request.id"] = str(rpc_id)


def _host_port(host: str) -> tuple[str, int | None]:
    """The Host header's name and port (``[v6]:port`` included)."""
    if host.startswith("["):
        end = host.find("]")
        name, rest = (host[1:end], host[end + 1 :]) if end > 0 else (host, "")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return name, int(port) if port.isdigit() else None


def _split_origin(target: str) -> tuple[str, int]:
    parts = urlsplit(target)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port
