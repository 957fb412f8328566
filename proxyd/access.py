"""One access line per request, and the single place where ProxydError becomes an HTTP answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxyd.errors import ProxydError, error_response
from proxyd.forward import Outcome
from proxyd.log import get_logger, info, is_enabled
from proxyd.metrics import Children, Metrics

if TYPE_CHECKING:
    from proxyd.tracing import RequestTrace

ACCESS_LOGGER = "proxyd.access"
access_log = get_logger(ACCESS_LOGGER)


@dataclass(slots=True)
class AccessRecord:
    app: str | None = None
    user: str | None = None
    client: str | None = None
    session: str | None = None  # "cached" | "new"
    reason: str | None = None
    outcome: Outcome | None = None
    trace: RequestTrace | None = None  # [tracing] on (proxyd/tracing.py)


_RECORD_KEY = web.RequestKey("proxyd_access", AccessRecord)


def access_record(request: web.Request) -> AccessRecord:
    return request[_RECORD_KEY]


def resource_metadata_url(public_url: str, request: web.Request) -> str | None:
    app = request.match_info.get("app")
    if app is None:
        return None
    # RFC 9728 §3.1: the well-known suffix is inserted before the resource's path.
    return f"{public_url}/.well-known/oauth-protected-resource/mcp/apps/{app}"


def _observer(metrics: Metrics) -> Callable[[str, str, int, float, AccessRecord], None]:
    requests = Children(metrics.requests)
    duration = Children(metrics.duration)
    errors = Children(metrics.request_errors)
    added = Children(metrics.added_latency)

    def observe(app: str, method: str, status: int, elapsed: float, record: AccessRecord) -> None:
        requests.get(app, method, status).inc()
        duration.get(app).observe(elapsed)
        if record.reason is not None:
            # Reasons are proxyd.errors' constants: a bounded set, like the apps.
            errors.get(app, record.reason).inc()
        outcome = record.outcome
        if outcome is not None and outcome.upstream_seconds:
            added.get(app).observe(max(0.0, elapsed - outcome.upstream_seconds))

    return observe


def access_middleware(public_url: str, metrics: Metrics | None = None) -> Middleware:
    observe = _observer(metrics) if metrics is not None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        record = AccessRecord()
        request[_RECORD_KEY] = record
        status = 0
        response: web.StreamResponse | None = None
        try:
            try:
                response = await handler(request)
            except ProxydError as err:
                record.reason = err.reason
                response = error_response(
                    err, resource_metadata=resource_metadata_url(public_url, request)
                )
            status = response.status
            outcome = record.outcome
            if outcome is not None and outcome.broken == "client_disconnected":
                # The upstream answered, the client left before the end: nginx's 499, as for
                # a client gone earlier (issue 10: this was recorded as the upstream's 200).
                status = 499
                record.reason = "client_disconnected"
            return response
        except asyncio.CancelledError:
            status = 499  # nginx's "client closed request"
            record.reason = "client_disconnected"
            raise
        except web.HTTPException as exc:
            # aiohttp's own answers (no route: 404, wrong method on a fixed route: 405) are
            # raised, not returned; without this they were logged as 500.
            status = exc.status
            raise
        except Exception:
            status = 500  # aiohttp logs the traceback and answers 500
            raise
        finally:
            elapsed = time.perf_counter() - started
            if record.trace is not None:
                record.trace.end(status, record, response)
            _log(request, record, status, elapsed)
            if observe is not None and record.app is not None:
                observe(record.app, request.method, status, elapsed, record)

    return middleware


def _log(request: web.Request, record: AccessRecord, status: int, elapsed: float) -> None:
    if not is_enabled(logging.INFO):
        return  # access lines are info: nothing to build at level warning and above
    outcome = record.outcome
    fields: dict[str, object] = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round(elapsed * 1000, 2),
        "client": record.client or request.remote,
    }
    if record.app is not None:
        fields["app"] = record.app
    if record.user is not None:
        fields["user"] = record.user
        fields["session"] = record.session
    if record.reason is not None:
        fields["reason"] = record.reason
    if outcome is not None:
        fields["upstream"] = outcome.upstream
        fields["upstream_status"] = outcome.status
        fields["bytes_in"] = outcome.bytes_up
        fields["bytes_out"] = outcome.bytes_down
        if outcome.broken:
            fields["broken"] = outcome.broken
    if record.trace is not None:
        fields["trace_id"] = record.trace.trace_id
    info(access_log, ACCESS_LOGGER, "request", fields)
