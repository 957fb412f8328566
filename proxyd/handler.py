"""The MCP endpoint ``/mcp/apps/{app}``: DESIGN.md's request path, one step per line.

An established session costs a hash and a cache lookup; only a new token pays for config
matching, key fetching and signature checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from proxyd.access import AccessRecord, access_record
from proxyd.auth.appauth import Authenticator
from proxyd.auth.assertion import AssertionSigner
from proxyd.auth.bearer import bearer_token
from proxyd.auth.session import Session, SessionStore, session_key
from proxyd.config import Settings
from proxyd.errors import (
    Forbidden,
    HeadersTooLarge,
    InvalidToken,
    MethodNotAllowed,
    NotFound,
    ProxydError,
)
from proxyd.forward import Forwarder, Outcome, request_headers
from proxyd.log import get_logger
from proxyd.netaddr import ClientView, client_view
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
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sessions = sessions
        self.authenticator = authenticator
        self.forwarder = forwarder
        self.signer = signer
        self.clocks = clocks
        public = settings.server.public_url
        self._allowed_origins = settings.server.allowed_origins | {_origin_of(public)}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = access_record(request)
        check_method(request)
        check_header_size(request, self.settings.server.max_header_size)
        app = self.find_app(request, record)
        self.check_origin(request)
        client = self.client_view(request, record)
        token = bearer_token(request.headers.get("Authorization"))
        session = await self.session_for(app, token, client, record)
        target = self.registry.pick(app)
        headers = self.upstream_headers(request, session, client)
        outcome = record.outcome = Outcome(upstream=target)
        return await self.forwarder.forward(request, target, headers, outcome)

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
        self, app: App, token: str, client: ClientView, record: AccessRecord
    ) -> Session:
        key = session_key(app.name, token)
        session = await self.sessions.get(key)
        if session is not None:
            record.user, record.session = session.username, "cached"
            return session
        try:
            identity = await self.authenticator.authenticate(app.name, app.labels, token)
            if identity.expires_at <= self.clocks.wall():
                # Past exp, accepted only by the verification leeway: the session would have
                # TTL 0 and the upstream an assertion expired at birth, so the session is over.
                raise InvalidToken("token has expired", reason="expired")
        except ProxydError as err:
            log.info("auth_rejected", app=app.name, client=client.address, reason=err.reason)
            raise
        session = await self.sessions.create(key, app.name, identity)
        record.user, record.session = identity.username, "new"
        log.info(
            "session_created",
            app=app.name,
            user=identity.username,
            config=identity.config,
            client=client.address,
            expires_in=round(session.expires_at - self.clocks.wall(), 1),
        )
        return session

    def upstream_headers(
        self, request: web.Request, session: Session, client: ClientView
    ) -> CIMultiDict[str]:
        identity_header = self.settings.identity.header
        assertion = self.signer.assertion_for(session, self.clocks.wall())
        extra = {
            "X-Forwarded-For": client.forwarded_for,
            "X-Forwarded-Proto": client.proto,
            "X-Forwarded-Host": client.host,
            identity_header: assertion,
        }
        return request_headers(request.headers, extra, identity_header)


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
