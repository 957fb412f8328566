"""The MCP endpoint ``/mcp/apps/{app}``: DESIGN.md's request path, one step per line.

Each step's body lives with its owner: the session with ``auth.gate.SessionGate``, the MCP
rules and the roles with ``mcp.gate.McpGate``, the choice of server and failover with
``router.UpstreamRouter``. An established session costs a hash and a cache lookup; only a new
token pays for config matching, key fetching and signature checks.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from multidict import CIMultiDict

from proxyd.access import AccessRecord, access_record
from proxyd.auth.assertion import AssertionSigner
from proxyd.auth.gate import SessionGate
from proxyd.auth.session import Session
from proxyd.body import request_headers
from proxyd.clock import Clocks
from proxyd.config import Settings
from proxyd.cors import allowed_origins
from proxyd.errors import Forbidden, HeadersTooLarge, MethodNotAllowed, NotFound, ProxydError
from proxyd.mcp.audit import AuditContext, Auditor
from proxyd.mcp.exchange import Exchange
from proxyd.mcp.gate import McpGate
from proxyd.mcp.pinning import SESSION_HEADER
from proxyd.netaddr import ClientView, client_view
from proxyd.registry import App, Registry
from proxyd.router import UpstreamRouter
from proxyd.tracing import RequestTrace, RequestTracer

__all__ = ["Clocks", "McpHandler"]  # Clocks: also where tests have always imported it from

MCP_METHODS = ("POST", "GET", "DELETE")


class McpHandler:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        sessions: SessionGate,
        mcp: McpGate,
        router: UpstreamRouter,
        signer: AssertionSigner,
        auditor: Auditor,
        clocks: Clocks,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sessions = sessions
        self.mcp = mcp
        self.router = router
        self.signer = signer
        self.auditor = auditor
        self.clocks = clocks
        self.tracer = tracer  # None: tracing off, nothing made per request
        self._allowed_origins = allowed_origins(settings.server)  # CORS uses the same set

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = access_record(request)
        trace = self.begin_trace(request, record)
        check_method(request)
        check_header_size(request, self.settings.server.max_header_size)
        app = self.find_app(request, record)
        self.check_origin(request)
        client = self.client_view(request, record)
        authorization = request.headers.get("Authorization")
        session = await self.sessions.session_for(app, authorization, client, record)
        access = self.mcp.app_access(app, session)
        audit = AuditContext(self.auditor, app, session, client, time.perf_counter(), trace)
        exchange = await self.mcp.exchange(request, app, session, audit)
        if trace is not None:
            trace.read(exchange)  # MCP's _meta may carry the trace context
        refusal = self.mcp.enforce_tools(app, exchange, access, audit)
        if refusal is not None:
            if trace is not None:
                trace.decision = "denied"
            return refusal
        headers = self.upstream_headers(request, session, client, exchange, app)
        tools_filter = self.mcp.tools_filter(exchange, access, headers)
        try:
            response = await self.router.send(
                request, app, session, exchange, headers, record, tools_filter
            )
        except ProxydError as err:
            audit.exchange(request.method, exchange, err.status, record.outcome, allowed=True)
            raise
        except asyncio.CancelledError:
            # The client left (mid-stream, or before the answer): what reached the upstream
            # is still recorded, with nginx's 499.
            audit.exchange(request.method, exchange, 499, record.outcome, allowed=True)
            raise
        outcome = record.outcome
        audit.exchange(request.method, exchange, outcome.status if outcome else 0, outcome, True)
        return response

    async def close(self) -> None:
        await self.sessions.close()

    def begin_trace(self, request: web.Request, record: AccessRecord) -> RequestTrace | None:
        # The only tracing cost of a request with tracing off is this test.
        if self.tracer is None:
            return None
        return self.tracer.begin(request, record)

    def find_app(self, request: web.Request, record: AccessRecord) -> App:
        app = self.registry.get(request.match_info["app"])
        if app is None:
            raise NotFound("unknown app", reason="unknown_app")
        record.app = app.name
        return app

    def check_origin(self, request: web.Request) -> None:
        # MCP transport spec (2025-11-25 §Security Warning): validate Origin to stop DNS
        # rebinding; requests without Origin come from non-browser clients.
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in self._allowed_origins:
            raise Forbidden("origin not allowed", reason="origin_not_allowed")

    def client_view(self, request: web.Request, record: AccessRecord) -> ClientView:
        h = request.headers
        view = client_view(
            request.remote,
            # Every X-Forwarded-For line, in order (RFC 9110 §5.3: same as one comma-joined
            # line). Reading only the first let a client's own line shadow the hop a trusted
            # proxy added as a separate line (HAProxy's `option forwardfor` does so).
            xff=", ".join(h.getall("X-Forwarded-For", ())) or None,
            xfp=h.get("X-Forwarded-Proto"),
            xfh=h.get("X-Forwarded-Host"),
            scheme=request.scheme,
            host=request.host,
            trusted=self.settings.server.trusted_proxies,
        )
        record.client = view.address
        return view

    def upstream_headers(
        self,
        request: web.Request,
        session: Session,
        client: ClientView,
        exchange: Exchange,
        app: App | None = None,
    ) -> CIMultiDict[str]:
        identity_header = self.settings.identity.header
        assertion = self.signer.assertion_for(session, self.clocks.wall())
        extra = {
            "X-Forwarded-For": client.forwarded_for,
            "X-Forwarded-Proto": client.proto,
            "X-Forwarded-Host": client.host,
            identity_header: assertion,
        }
        headers = request_headers(request.headers, extra, identity_header)
        if exchange.pin is not None:
            headers[SESSION_HEADER] = exchange.pin.upstream_id
        elif exchange.modern:
            headers.popall(SESSION_HEADER, None)  # the stateless era has no sessions
        if app is not None and app.upstream_auth is not None:
            # [apps.upstream_auth], read at install: replaces any line of that name the
            # client sent (its own Authorization is already gone, request_headers).
            name, value = app.upstream_auth
            headers[name] = value
        return headers


def check_method(request: web.Request) -> None:
    if request.method not in MCP_METHODS:
        raise MethodNotAllowed(f"method {request.method} not allowed", MCP_METHODS)


def check_header_size(request: web.Request, limit: int) -> None:
    # aiohttp answers oversized headers with 400 at its own (higher) ceiling; below it we
    # answer 431 (RFC 6585 §5) with the configured limit, as users of large IdP tokens expect.
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if size > limit:
        raise HeadersTooLarge(f"request headers exceed the limit of {limit} bytes")
