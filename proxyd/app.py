"""create_app(settings): routes and the owners of every long-lived resource. Wiring only."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiocache import SimpleMemoryCache
from aiohttp import web

from proxyd.access import access_middleware
from proxyd.auth.appauth import AppAuthStore, Authenticator
from proxyd.auth.assertion import AssertionSigner, load_or_create_key
from proxyd.auth.jwks import JwksCache
from proxyd.auth.session import SessionStore
from proxyd.config import Settings
from proxyd.forward import Forwarder
from proxyd.handler import Clocks, Limits, McpHandler
from proxyd.health import HealthBook, HealthChecker
from proxyd.log import get_logger
from proxyd.mcp.pinning import SessionPinning
from proxyd.mcp.sessionid import SessionIdCodec
from proxyd.ratelimit import Limiter
from proxyd.registry import Registry
from proxyd.wellknown import WellKnown

MCP_HANDLER = web.AppKey("mcp_handler", McpHandler)
WELL_KNOWN = web.AppKey("well_known", WellKnown)
JWKS_CACHE = web.AppKey("jwks_cache", JwksCache)
AUTH_STORE = web.AppKey("auth_store", AppAuthStore)
SESSIONS = web.AppKey("sessions", SessionStore)
HEALTH = web.AppKey("health", HealthBook)

DEFAULT_CLOCKS = Clocks(monotonic=time.monotonic, wall=time.time)

log = get_logger("proxyd")


def create_app(
    settings: Settings,
    *,
    clocks: Clocks = DEFAULT_CLOCKS,
    rng: random.Random | None = None,
) -> web.Application:
    ceiling = _parser_ceiling(settings)
    app = web.Application(
        middlewares=[access_middleware(settings.server.public_url)],
        handler_args={
            "max_field_size": ceiling,
            "max_line_size": ceiling,
            # Request bodies pass through untouched: aiohttp would otherwise inflate a gzip
            # body while its Content-Encoding and Content-Length still went upstream.
            "auto_decompress": False,
        },
    )
    health = HealthBook(settings.apps, clocks.monotonic)
    # Spreads load over app servers; not a security decision, so any PRNG will do.
    registry = Registry(settings.apps, rng or random.Random(), health)  # noqa: S311
    app[HEALTH] = health
    store = AppAuthStore(settings.app_auth_configs)
    app[AUTH_STORE] = store

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # One shared client for upstreams and JWKS; no cap on connections, so open SSE
        # streams never queue behind each other (aiohttp's default limit is 100).
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        jwks = JwksCache(http, settings.jwks, clocks.monotonic)
        # timeout=None: aiocache's default 5 s timeout wraps every get in asyncio.wait_for,
        # a task per lookup on the hot path, for an in-memory dict that cannot block.
        cache = SimpleMemoryCache(timeout=None)
        sessions = SessionStore(cache, clocks.wall, settings.sessions.max_ttl)
        key = load_or_create_key(settings.identity.key_file, settings.server.state_dir)
        signer = AssertionSigner(key, settings.server.public_url, settings.identity.ttl)
        limits = Limits(
            Limiter(settings.limits.unauthenticated, clocks.monotonic),
            Limiter(settings.limits.per_user, clocks.monotonic),
        )
        pinning = SessionPinning(SessionIdCodec(_mcp_keys(settings)), registry)
        checker = HealthChecker(health, http)
        app[JWKS_CACHE] = jwks
        app[SESSIONS] = sessions
        app[MCP_HANDLER] = McpHandler(
            settings,
            registry,
            sessions,
            Authenticator(store, jwks, clocks.wall),
            Forwarder(http, settings.upstream, settings.server.max_request_body),
            signer,
            clocks,
            limits,
            pinning,
        )
        app[WELL_KNOWN] = WellKnown(settings.server.public_url, registry, store, signer)
        checker.start()
        try:
            yield
        finally:
            await app[MCP_HANDLER].close()
            await checker.stop()
            await jwks.close()
            await sessions.close()
            await http.close()

    app.cleanup_ctx.append(resources)
    app.router.add_route("*", "/mcp/apps/{app}", _mcp)
    app.router.add_get("/.well-known/jwks.json", _jwks)
    app.router.add_get("/.well-known/oauth-protected-resource/mcp/apps/{app}", _resource_metadata)
    return app


def _mcp_keys(settings: Settings) -> list[bytes]:
    if settings.sessions.mcp_keys:
        return list(settings.sessions.mcp_keys)
    log.warning(
        "mcp_session_key_ephemeral",
        detail="no sessions.mcp_keys configured: MCP sessions will not survive a restart "
        "or work across proxyd instances",
    )
    return [os.urandom(32)]


def _parser_ceiling(settings: Settings) -> int:
    # aiohttp's own per-line limit sits above ours so handler.check_header_size can answer 431.
    return max(8190, settings.server.max_header_size * 2)


async def _mcp(request: web.Request) -> web.StreamResponse:
    return await request.app[MCP_HANDLER].handle(request)


async def _jwks(request: web.Request) -> web.StreamResponse:
    return await request.app[WELL_KNOWN].jwks(request)


async def _resource_metadata(request: web.Request) -> web.StreamResponse:
    return await request.app[WELL_KNOWN].protected_resource(request)


def create_admin_app(ready: dict[str, Any]) -> web.Application:
    """The admin listener: /healthz (process alive), /readyz (serving)."""
    admin = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = bool(ready.get("ready"))
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin
