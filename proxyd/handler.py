"""The MCP endpoint ``/mcp/apps/{app}``: DESIGN.md's request path, one step per line.

An established session costs a hash and a cache lookup; only a new token pays for config
matching, key fetching and signature checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from proxyd.access import AccessRecord, access_record
from proxyd.auth.appauth import Authenticator, AuthSnapshot
from proxyd.auth.assertion import AssertionSigner
from proxyd.auth.bearer import bearer_token
from proxyd.auth.session import FOREIGN_VERSION, Session, SessionStore, session_key
from proxyd.config import AuditSettings, Settings
from proxyd.errors import (
    Forbidden,
    HeadersTooLarge,
    InvalidToken,
    MethodNotAllowed,
    NotFound,
    ProxydError,
    UpstreamError,
)
from proxyd.forward import ConnectFailed, Forwarder, Outcome, RequestBody, request_headers
from proxyd.log import get_logger
from proxyd.mcp.audit import AuditContext, Auditor
from proxyd.mcp.era import (
    check_framing,
    check_routing_headers,
    inflated,
    is_modern,
    message_kind,
    parse_message,
)
from proxyd.mcp.exchange import Exchange
from proxyd.mcp.filter import ToolsListFilter
from proxyd.mcp.pinning import SESSION_HEADER, SessionPinning
from proxyd.mcp.policy import Access, Policy
from proxyd.metrics import Metrics
from proxyd.netaddr import ClientView, client_view
from proxyd.ratelimit import Limits
from proxyd.registry import App, Registry

log = get_logger("proxyd.auth")

MCP_METHODS = ("POST", "GET", "DELETE")


@dataclass(frozen=True, slots=True)
class Clocks:
    monotonic: Callable[[], float]
    wall: Callable[[], float]


class McpHandler:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        sessions: SessionStore,
        authenticator: Authenticator,
        forwarder: Forwarder,
        signer: AssertionSigner,
        clocks: Clocks,
        limits: Limits,
        pinning: SessionPinning,
        metrics: Metrics,
        policy: Policy | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sessions = sessions
        self.authenticator = authenticator
        self.forwarder = forwarder
        self.signer = signer
        self.clocks = clocks
        self.limits = limits
        self.pinning = pinning
        self.metrics = metrics
        self.policy = policy or Policy(())
        self.auditor = auditor or Auditor(AuditSettings())
        public = settings.server.public_url
        self._allowed_origins = settings.server.allowed_origins | {_origin_of(public)}
        self._pending: dict[str, asyncio.Future[Session]] = {}
        # (snapshot generation, config, app) → whether the config selects the app. App labels
        # only change with a reload, which builds a new handler; the snapshot's generation
        # moves with every app auth config change: the hot path pays a dict lookup.
        self._covers: dict[tuple[int, str, str], bool] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = access_record(request)
        check_method(request)
        check_header_size(request, self.settings.server.max_header_size)
        app = self.find_app(request, record)
        self.check_origin(request)
        client = self.client_view(request, record)
        session = await self.session_for(app, request, client, record)
        access = self.app_access(app, session)
        audit = AuditContext(self.auditor, app, session, client, time.perf_counter())
        exchange = await self.mcp_exchange(request, app, session, audit)
        refusal = self.enforce_tools(exchange, access, audit)
        if refusal is not None:
            return refusal
        headers = self.upstream_headers(request, session, client, exchange)
        tools_filter = self.tools_filter(request.method, exchange, access, headers)
        try:
            response = await self.forward(
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

    def app_access(self, app: App, session: Session) -> Access:
        access = self.policy.access(session.key, session.identity, app.name, app.labels)
        if not access.app_allowed:
            raise Forbidden("access to this app is denied by proxyd policy", reason="app_denied")
        return access

    def enforce_tools(
        self, exchange: Exchange, access: Access, audit: AuditContext
    ) -> web.Response | None:
        """A tools/call for a tool the session may not use is answered here, never forwarded."""
        if exchange.method != "tools/call" or access.unrestricted:
            return None
        name = exchange.param("name")
        if isinstance(name, str) and access.tool_allowed(name):
            return None
        assert exchange.message is not None
        if exchange.kind == "notification":
            # No id, so no answer to give (JSON-RPC §4.1): accepted, dropped, audited.
            audit.exchange("POST", exchange, 202, None, allowed=False)
            return web.Response(status=202)
        audit.exchange("POST", exchange, 200, None, allowed=False)
        # Teleport's answer: HTTP 200, JSON-RPC -32602 with the same id, a clear message.
        return web.json_response(
            {
                "jsonrpc": "2.0",
                "id": exchange.message.get("id"),
                "error": {
                    "code": -32602,
                    "message": f"access to tool {name!r} is denied by proxyd policy",
                },
            }
        )

    def tools_filter(
        self, http_method: str, exchange: Exchange, access: Access, headers: CIMultiDict[str]
    ) -> ToolsListFilter | None:
        """Under restricting roles, every answer is read for tool lists (proxyd.mcp.filter)."""
        if access.unrestricted:
            return None
        message = exchange.message
        is_request = message is not None and exchange.kind == "request"
        request_id = message.get("id") if message is not None and is_request else None
        strict = exchange.method == "tools/list" and exchange.kind == "request"
        # An answer proxyd must read: ask for it uncompressed (RFC 9110 §12.5.3: no
        # Accept-Encoding at all would mean "any coding").
        headers["Accept-Encoding"] = "identity"
        return ToolsListFilter(access, request_id=request_id, strict=strict)

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

    async def session_for(
        self, app: App, request: web.Request, client: ClientView, record: AccessRecord
    ) -> Session:
        try:
            token = bearer_token(request.headers.get("Authorization"))
        except ProxydError:
            await self.limits.unauthenticated(client.address)
            raise
        key = session_key(app.name, token)
        session = await self.sessions.get(key)
        charge = True
        if session is not None:
            identity = session.identity
            snapshot = self.authenticator.store.snapshot
            version = snapshot.versions.get(identity.config)
            # The config must still select this app: the fingerprint (shared sessions) and
            # version (local ones) cover the config, not the app's labels, which another
            # instance or a reload may set so that no config here accepts the token for it.
            covers = self._config_covers(snapshot, identity.config, app)
            if version == identity.config_version and covers:
                record.user, record.session = session.username, "cached"
                if self.limits.per_user_is_shared:
                    await self.limits.shared_per_user(identity)
                else:
                    self.limits.per_user(identity)  # in memory: no await on the hot path
                return session
            # The app auth config this session came from changed or went away (issue 4):
            # removed ends the session, changed verifies the token again under the new one.
            # A session shared by another instance under a config that differs here
            # (FOREIGN_VERSION) is verified again too, even if this instance lacks the config.
            await self.sessions.delete(key)
            if version is None and identity.config_version != FOREIGN_VERSION:
                self.metrics.auth.labels("failure", "config_removed").inc()
                log.info(
                    "session_ended",
                    app=app.name,
                    user=identity.username,
                    config=identity.config,
                    reason="config_removed",
                )
                raise InvalidToken(
                    "the app auth config of this session was removed", reason="config_removed"
                )
            charge = False  # an established client, not an unauthenticated one
        pending = self._pending.get(key)
        if pending is None and charge:
            # Everything below costs crypto or a key fetch: the per-address limiter goes
            # first, so a flood of guessed tokens is turned away for a dict lookup.
            await self.limits.unauthenticated(client.address)
            # A shared limiter waits for Redis: another request with this token may have
            # started the verification meanwhile (in memory this never suspends).
            pending = self._pending.get(key)
        if pending is None:
            # Single flight: a client opening its GET stream and POSTs at once with a new
            # token pays one verification and one limiter token, not one per request.
            pending = asyncio.ensure_future(self._new_session(key, app, token, client))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        session = await asyncio.shield(pending)
        record.user, record.session = session.username, "new"
        return session

    def _config_covers(self, snapshot: AuthSnapshot, name: str, app: App) -> bool:
        memo = (snapshot.generation, name, app.name)
        covers = self._covers.get(memo)
        if covers is None:
            config = snapshot.config(name)
            covers = config is not None and config.app_labels.matches(app.labels)
            if len(self._covers) > 4096:  # older generations: never asked again
                self._covers.clear()
            self._covers[memo] = covers
        return covers

    def _settled(self, key: str, done: asyncio.Future[Session]) -> None:
        self._pending.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have gone away

    async def _new_session(self, key: str, app: App, token: str, client: ClientView) -> Session:
        try:
            identity = await self.authenticator.authenticate(app.name, app.labels, token)
            if identity.expires_at <= self.clocks.wall():
                # Past exp, accepted only by the verification leeway: the session would have
                # TTL 0 and the upstream an assertion expired at birth, so the session is over.
                raise InvalidToken("token has expired", reason="expired")
        except ProxydError as err:
            self.metrics.auth.labels("failure", err.reason).inc()
            log.info("auth_rejected", app=app.name, client=client.address, reason=err.reason)
            self.auditor.emit(
                "app_auth.verify.failure",
                app=app.name,
                client=client.address,
                config=err.config,
                reason=err.reason,
            )
            raise
        self.metrics.auth.labels("success", "verified").inc()
        self.auditor.emit(
            "app_auth.verify.success",
            app=app.name,
            client=client.address,
            user=identity.username,
            issuer=identity.issuer,
            config=identity.config,
        )
        session = await self.sessions.create(key, app.name, identity)
        log.info(
            "session_created",
            app=app.name,
            user=identity.username,
            config=identity.config,
            client=client.address,
            expires_in=round(session.expires_at - self.clocks.wall(), 1),
        )
        return session

    async def close(self) -> None:
        pending = list(self._pending.values())
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def mcp_exchange(
        self, request: web.Request, app: App, session: Session, audit: AuditContext
    ) -> Exchange:
        limit = self.settings.server.max_request_body
        try:
            check_framing(request.method, request.headers, request.body_exists)
        except ProxydError as err:
            audit.invalid(request, err)
            raise
        modern = is_modern(request.headers)
        client_id = None if modern else request.headers.get(SESSION_HEADER)
        pin = None
        if client_id is not None:
            pin = self.pinning.open(app, session.identity, client_id)
        if request.method != "POST":
            return Exchange(modern, RequestBody.empty(), pin, client_id)
        # A POST carries one JSON-RPC message: read (bounded, 413) and parse it for the era
        # check, tool policy and audit. Batches were removed in 2025-06-18: refused explicitly.
        timeout = self.settings.server.body_timeout
        body = await RequestBody.read_all(request, limit, timeout)
        try:
            encodings = request.headers.getall("Content-Encoding", [])
            raw = inflated(body.data or b"", encodings, limit)
            message = parse_message(raw)
            kind = message_kind(message)
            if modern:
                # 2026-07-28: stateless, any server; the routing headers must mirror the body.
                check_routing_headers(request.headers, message)
        except ProxydError as err:
            audit.invalid(request, err)
            raise
        return Exchange(modern, body, pin, client_id, message, kind)

    def upstream_headers(
        self, request: web.Request, session: Session, client: ClientView, exchange: Exchange
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
        return headers

    async def forward(
        self,
        request: web.Request,
        app: App,
        session: Session,
        exchange: Exchange,
        headers: CIMultiDict[str],
        record: AccessRecord,
        tools_filter: ToolsListFilter | None = None,
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
            try:
                response = await self.forwarder.forward(
                    request, target, headers, outcome, exchange.body, hook, tools_filter
                )
            except ConnectFailed as exc:
                health.passive_failure(app.name, target, exc.reason)
                if pin is not None:
                    # The session's server is down: 404 (re-initialize), not 502 (issue 3 §3);
                    # it used to be a 502 until passive checks ejected the server.
                    raise self.pinning.unreachable(app, session.identity, pin, exc.reason) from None
                tried.append(target)
                retry = (
                    pin is None
                    and len(tried) < self.settings.upstream.max_attempts
                    and self._has_untried(app, tried)
                )
                if not retry:
                    raise
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


def check_method(request: web.Request) -> None:
    if request.method not in MCP_METHODS:
        raise MethodNotAllowed(f"method {request.method} not allowed", MCP_METHODS)


def check_header_size(request: web.Request, limit: int) -> None:
    # aiohttp answers oversized headers with 400 at its own (higher) ceiling; below it we
    # answer 431 (RFC 6585 §5) with the configured limit, as users of large IdP tokens expect.
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if size > limit:
        raise HeadersTooLarge(f"request headers exceed the limit of {limit} bytes")


def _origin_of(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}".lower()
