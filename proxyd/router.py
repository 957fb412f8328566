"""UpstreamRouter: which app server gets a request, and what to do when it fails (step 6).

The server a legacy MCP session is pinned to, or a random healthy one; a connect failure before
anything was sent tries another (``upstream.max_attempts``); every outcome feeds the passive
health checks.
"""

from __future__ import annotations

import time

from aiohttp import web
from multidict import CIMultiDict

from proxyd.access import AccessRecord
from proxyd.auth.session import Session
from proxyd.body import BodyFilter
from proxyd.errors import ConnectFailed, UpstreamError
from proxyd.forward import Forwarder, Outcome
from proxyd.log import get_logger
from proxyd.mcp.exchange import Exchange
from proxyd.mcp.pinning import SessionPinning
from proxyd.registry import App, Registry
from proxyd.tracing import upstream_attempt

log = get_logger("proxyd.upstream")


class UpstreamRouter:
    def __init__(
        self,
        registry: Registry,
        forwarder: Forwarder,
        pinning: SessionPinning,
        max_attempts: int,
    ) -> None:
        self.registry = registry
        self.forwarder = forwarder
        self.pinning = pinning
        self.max_attempts = max_attempts

    async def send(
        self,
        request: web.Request,
        app: App,
        session: Session,
        exchange: Exchange,
        headers: CIMultiDict[str],
        record: AccessRecord,
        tools_filter: BodyFilter | None = None,
    ) -> web.StreamResponse:
        """To the pinned server, or to a random healthy one with failover on connect errors."""
        health = self.registry.health
        tried: list[str] = []
        while True:
            pin = exchange.pin
            target = pin.server if pin is not None else self._next_server(app, tried)
            outcome = record.outcome = Outcome(upstream=target, app=app.name)
            hook = None
            if not exchange.modern:
                hook = self.pinning.response_hook(
                    app, session.identity, target, pin, exchange.client_id
                )
            with upstream_attempt(record, request.method, target, headers, outcome) as attempt:
                try:
                    sent = time.perf_counter()
                    response = await self.forwarder.forward(
                        request, target, headers, outcome, exchange.body, hook, tools_filter
                    )
                    # The exchange with the app server (issue 14: proxyd's added latency is the
                    # request's duration minus this).
                    outcome.upstream_seconds = time.perf_counter() - sent
                except ConnectFailed as exc:
                    health.passive_failure(app.name, target, exc.reason)
                    if pin is not None:
                        # The session's server is down: 404 (re-initialize), not 502 (issue 3
                        # §3); it used to be a 502 until passive checks ejected the server.
                        raise self.pinning.unreachable(
                            app, session.identity, pin, exc.reason
                        ) from None
                    tried.append(target)
                    retry = (
                        pin is None
                        and len(tried) < self.max_attempts
                        and self._has_untried(app, tried)
                    )
                    if not retry:
                        raise
                    attempt.failover(exc.reason)
                    log.warning("upstream_failover", app=app.name, server=target, reason=exc.reason)
                    continue
                except UpstreamError as exc:
                    health.passive_failure(app.name, target, exc.reason)
                    raise
                if outcome.status >= 500 or outcome.broken in (
                    "upstream_reset",
                    "upstream_idle_timeout",
                ):
                    health.passive_failure(app.name, target, outcome.broken or "http_5xx")
                else:
                    health.passive_success(app.name, target)
                return response

    def _next_server(self, app: App, tried: list[str]) -> str:
        return self.registry.pick(app, exclude=tried)

    def _has_untried(self, app: App, tried: list[str]) -> bool:
        return any(
            s not in tried and self.registry.health.available(app.name, s) for s in app.servers
        )
