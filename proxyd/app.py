"""create_app(settings): routes and the owners of every long-lived resource. Wiring only."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiocache import RedisCache, SimpleMemoryCache
from aiocache.serializers import JsonSerializer
from aiohttp import web
from joserfc.jwk import ECKey
from prometheus_client.core import Metric

from proxyd.access import access_middleware
from proxyd.auth.appauth import AppAuthStore, Authenticator
from proxyd.auth.assertion import AssertionSigner, load_or_create_key
from proxyd.auth.gate import SessionGate
from proxyd.auth.jwks import JwksCache
from proxyd.auth.session import SessionStore
from proxyd.auth.shared import SharedSessions
from proxyd.clock import Clocks
from proxyd.config import RateLimitSettings, Settings
from proxyd.forward import Forwarder
from proxyd.handler import McpHandler
from proxyd.health import HealthBook, HealthChecker
from proxyd.log import get_logger
from proxyd.mcp.audit import Auditor
from proxyd.mcp.gate import McpGate
from proxyd.mcp.pinning import SessionPinning
from proxyd.mcp.policy import Policy
from proxyd.mcp.sessionid import SessionIdCodec
from proxyd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxyd.metrics import Metrics, counter, gauge
from proxyd.ratelimit import Limiter, Limits, SharedLimiter
from proxyd.registry import Registry
from proxyd.router import UpstreamRouter
from proxyd.state import RedisState
from proxyd.upstream import UpstreamClient
from proxyd.watcher import AuthConfigWatcher
from proxyd.wellknown import WellKnown

DEFAULT_CLOCKS = Clocks(monotonic=time.monotonic, wall=time.time)

log = get_logger("proxyd")


@dataclass(slots=True)
class Shared:
    """What outlives a configuration: connections, caches, keys, health and metrics."""

    clocks: Clocks
    rng: random.Random
    store: AppAuthStore
    health: HealthBook
    metrics: Metrics
    http: aiohttp.ClientSession | None = None  # JWKS and health checks
    upstreams: UpstreamClient | None = None  # the hot path: requests to app servers
    jwks: JwksCache | None = None
    sessions: SessionStore | None = None
    identity_key: ECKey | None = None
    ephemeral_mcp_key: bytes | None = None
    auditor: Auditor | None = None
    state: RedisState | None = None  # the shared state backend, when [state] says redis
    shared_sessions: SharedSessions | None = None
    limiters: dict[tuple[str, RateLimitSettings], Limiter | SharedLimiter] = field(
        default_factory=dict
    )

    def limiter(self, kind: str, settings: RateLimitSettings) -> Limiter | SharedLimiter:
        # Same settings after a reload: keep the buckets (a reload is no way around a limit).
        key = (kind, settings)
        if key not in self.limiters:
            self.limiters = {k: v for k, v in self.limiters.items() if k[0] != kind}
            local = Limiter(settings, self.clocks.monotonic)
            if self.state is None:
                self.limiters[key] = local
            else:
                # In Redis the buckets outlive any reload; `local` serves limiter_failure=local.
                self.limiters[key] = SharedLimiter(settings, kind, self.state, local)
        return self.limiters[key]


class Runtime:
    """The configuration in force: one reference, swapped whole on reload (a request reads it
    once, so it sees the old configuration or the new one, never a mix)."""

    def __init__(self, settings: Settings, shared: Shared) -> None:
        self.settings = settings
        self.boot_settings = settings  # what the listeners, key and directories were built from
        self.shared = shared
        self.ready = False
        self.handler: McpHandler | None = None
        self.well_known: WellKnown | None = None

    def install(self, settings: Settings) -> None:
        s = self.shared
        assert s.http is not None and s.jwks is not None and s.sessions is not None
        assert s.identity_key is not None and s.auditor is not None and s.upstreams is not None
        s.upstreams.keepalive_timeout = settings.upstream.keepalive_timeout
        s.upstreams.max_idle = settings.upstream.max_idle_connections
        s.auditor.settings = settings.audit
        s.health.reconfigure(settings.apps)
        registry = Registry(settings.apps, s.rng, s.health)
        signer = AssertionSigner(s.identity_key, settings.server.public_url, settings.identity.ttl)
        s.sessions.max_ttl = settings.sessions.max_ttl
        if s.shared_sessions is not None and settings.sessions.mcp_keys:
            s.shared_sessions.set_keys(settings.sessions.mcp_keys)
        limits = Limits(
            s.limiter("unauthenticated", settings.limits.unauthenticated),
            s.limiter("per_user", settings.limits.per_user),
            s.metrics,
        )
        keys = list(settings.sessions.mcp_keys) or self._ephemeral_key()
        pinning = SessionPinning(SessionIdCodec(keys), registry)
        authenticator = Authenticator(s.store, s.jwks, s.clocks.wall)
        forwarder = Forwarder(s.upstreams, settings.upstream, s.metrics)
        handler = McpHandler(
            settings,
            registry,
            SessionGate(s.sessions, authenticator, limits, s.metrics, s.auditor, s.clocks),
            # New roles apply to live sessions from the next request.
            McpGate(settings.server, Policy(settings.roles), pinning),
            UpstreamRouter(registry, forwarder, pinning, settings.upstream.max_attempts),
            signer,
            s.auditor,
            s.clocks,
        )
        well_known = WellKnown(settings.server.public_url, registry, s.store, signer)
        self.settings, self.handler, self.well_known = settings, handler, well_known

    def _ephemeral_key(self) -> list[bytes]:
        if self.shared.ephemeral_mcp_key is None:
            log.warning(
                "mcp_session_key_ephemeral",
                detail="no sessions.mcp_keys configured: MCP sessions will not survive a "
                "restart or work across proxyd instances",
            )
            self.shared.ephemeral_mcp_key = os.urandom(32)
        return [self.shared.ephemeral_mcp_key]


RUNTIME = web.AppKey("runtime", Runtime)
AUTH_STORE = web.AppKey("auth_store", AppAuthStore)
HEALTH = web.AppKey("health", HealthBook)
WATCHER = web.AppKey("watcher", AuthConfigWatcher)


def create_app(
    settings: Settings,
    *,
    clocks: Clocks = DEFAULT_CLOCKS,
    rng: random.Random | None = None,
    force_polling: bool | None = None,
    mcp_key: bytes | None = None,
) -> web.Application:
    """``mcp_key``: the key sealing MCP session ids when the configuration names none — a
    supervisor makes one for all its workers, so a session works on whichever one a request
    lands on."""
    ceiling = _parser_ceiling(settings)
    metrics = Metrics()
    app = web.Application(
        middlewares=[access_middleware(settings.server.public_url, metrics)],
        handler_args={
            "max_field_size": ceiling,
            "max_line_size": ceiling,
            # Request bodies pass through untouched: aiohttp would otherwise inflate a gzip
            # body while its Content-Encoding and Content-Length still went upstream.
            "auto_decompress": False,
        },
    )
    store = AppAuthStore(settings.app_auth_configs)
    shared = Shared(
        clocks=clocks,
        # Spreads load over app servers; not a security decision, so any PRNG will do.
        rng=rng or random.Random(),  # noqa: S311
        store=store,
        health=HealthBook(settings.apps, clocks.monotonic),
        metrics=metrics,
        ephemeral_mcp_key=mcp_key,
    )
    runtime = Runtime(settings, shared)
    watcher = AuthConfigWatcher(
        store,
        settings.main_app_auth_configs,
        settings.app_auth_config_dir,
        force_polling=force_polling,
    )
    app[RUNTIME] = runtime
    app[AUTH_STORE] = store
    app[HEALTH] = shared.health
    app[WATCHER] = watcher
    register_collectors(metrics, runtime)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # Requests to app servers go through proxyd's lean client (proxyd/upstream.py): its
        # pools survive reloads; open connections are never capped (SSE streams).
        upstreams = UpstreamClient(
            keepalive_timeout=settings.upstream.keepalive_timeout,
            max_idle=settings.upstream.max_idle_connections,
        )
        shared.upstreams = upstreams
        # JWKS fetches and health checks keep aiohttp's client (off the hot path).
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        shared.http = http
        shared.jwks = JwksCache(http, settings.jwks, clocks.monotonic)
        # timeout=None: aiocache's default 5 s timeout wraps every get in asyncio.wait_for,
        # a task per lookup on the hot path, for an in-memory dict that cannot block.
        cache = SimpleMemoryCache(timeout=None)
        if settings.state.shared:
            shared.state = RedisState(settings.state, clocks.monotonic, metrics)
            log.info(
                "state_backend",
                backend="redis",
                url=shared.state.url,
                timeout=settings.state.timeout,
                limiter_failure=settings.state.limiter_failure,
            )
            await shared.state.start()
            shared.shared_sessions = SharedSessions(
                redis_session_cache(shared.state),
                shared.state,
                store,
                settings.sessions.mcp_keys,
                clocks.wall,
            )
        shared.sessions = SessionStore(
            cache, clocks.wall, settings.sessions.max_ttl, shared.shared_sessions
        )
        shared.auditor = Auditor(settings.audit)
        shared.identity_key = load_or_create_key(
            settings.identity.key_file, settings.server.state_dir
        )
        runtime.install(settings)
        checker = HealthChecker(shared.health, http)
        app[CHECKER] = checker
        watcher.rescan()  # the directory as it is now: serving starts on a full load
        watcher.start()
        checker.start()
        runtime.ready = True
        try:
            yield
        finally:
            runtime.ready = False
            await watcher.stop()
            if runtime.handler is not None:
                await runtime.handler.close()
            await checker.stop()
            await shared.jwks.close()
            await shared.sessions.close()
            if shared.state is not None:
                await shared.state.close()
            await upstreams.close()
            await http.close()
            shared.auditor.close()

    app.cleanup_ctx.append(resources)
    app.router.add_route("*", "/mcp/apps/{app}", _mcp)
    app.router.add_get("/.well-known/jwks.json", _jwks)
    app.router.add_get("/.well-known/oauth-protected-resource/mcp/apps/{app}", _resource_metadata)
    return app


CHECKER = web.AppKey("checker", HealthChecker)


def redis_session_cache(state: RedisState) -> Any:
    """aiocache's RedisCache over the state's connection pool, with the JSON serializer
    (never pickle: a Redis writer would run code here). aiocache's own timeout is off:
    RedisState.run bounds every call. Never .clear() it: without a namespace that is FLUSHDB."""
    pool = state.client.connection_pool
    return RedisCache(
        serializer=JsonSerializer(),
        namespace=f"{state.settings.key_prefix}session",
        timeout=None,
        # aiocache builds its pool from host/port/password (no unix sockets, no ACL users):
        # hand it the one proxyd already has, configured from the full URL.
        connection_pool_class=lambda **_: pool,
    )


def register_collectors(metrics: Metrics, runtime: Runtime) -> None:
    """State read at scrape time: upstream health, JWKS age and errors, config generation."""
    shared = runtime.shared

    def collect() -> Iterator[Metric]:
        now = shared.clocks.monotonic()
        yield gauge(
            "proxyd_upstream_healthy",
            "1 when the app server takes new work (healthy and not ejected).",
            ["app", "server", "state"],
            (
                ([h.app, h.server, h.label(now)], float(h.available(now)))
                for h in shared.health.all()
            ),
        )
        snapshot = shared.store.snapshot
        yield gauge(
            "proxyd_config_generation",
            "App auth config generation.",
            [],
            [([], float(snapshot.generation))],
        )
        yield gauge(
            "proxyd_config_last_load_timestamp_seconds",
            "When the app auth configs last changed (Unix time).",
            [],
            [([], shared.store.loaded_at)],
        )
        yield gauge(
            "proxyd_app_auth_configs",
            "App auth configs in force.",
            [],
            [([], float(len(snapshot.configs)))],
        )
        if shared.jwks is not None:
            stats = shared.jwks.stats()
            yield gauge(
                "proxyd_jwks_age_seconds",
                "Age of the cached key set per JWKS URL.",
                ["url"],
                (([u], age) for u, age, _ in stats if age is not None),
            )
            yield counter(
                "proxyd_jwks_fetch_errors",
                "Failed JWKS fetches per URL.",
                ["url"],
                (([u], float(errors)) for u, _, errors in stats),
            )

    metrics.collect_with(collect)


def _parser_ceiling(settings: Settings) -> int:
    # aiohttp's own per-line limit sits above ours so handler.check_header_size can answer 431.
    return max(8190, settings.server.max_header_size * 2)


async def _mcp(request: web.Request) -> web.StreamResponse:
    handler = request.app[RUNTIME].handler
    assert handler is not None
    return await handler.handle(request)


async def _jwks(request: web.Request) -> web.StreamResponse:
    well_known = request.app[RUNTIME].well_known
    assert well_known is not None
    return await well_known.jwks(request)


async def _resource_metadata(request: web.Request) -> web.StreamResponse:
    well_known = request.app[RUNTIME].well_known
    assert well_known is not None
    return await well_known.protected_resource(request)


def create_admin_app(runtime: Runtime, draining: Callable[[], bool]) -> web.Application:
    """The admin listener: /healthz (process alive), /readyz (serving), /metrics."""
    admin = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = runtime.ready and not draining()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = runtime.shared.metrics.render()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics)
    return admin
