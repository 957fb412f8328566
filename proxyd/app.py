"""create_app(settings): routes and the owners of every long-lived resource. Wiring only."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiocache import RedisCache
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
from proxyd.config import (
    RESTART_ONLY,
    ConfigError,
    RateLimitSettings,
    Settings,
    in_force,
    load_settings,
    upstream_credentials,
)
from proxyd.cors import CorsPolicy
from proxyd.forward import Forwarder
from proxyd.handler import McpHandler
from proxyd.health import HealthBook, HealthChecker
from proxyd.log import get_logger, set_level
from proxyd.mcp.audit import Auditor
from proxyd.mcp.gate import McpGate
from proxyd.mcp.pinning import SessionPinning
from proxyd.mcp.policy import Policy
from proxyd.mcp.sessionid import SessionIdCodec
from proxyd.mcp.toolcalls import ToolCalls
from proxyd.metrics import Metrics, counter, gauge
from proxyd.ratelimit import Limiter, Limits, SharedLimiter
from proxyd.registry import Registry
from proxyd.router import UpstreamRouter
from proxyd.state import RedisState
from proxyd.tls import ServerTLS, TLSError
from proxyd.tracing import RequestTracer, Tracing
from proxyd.upstream import UpstreamClient
from proxyd.upstream.tls import app_profiles, insecure_apps
from proxyd.watcher import AuthConfigWatcher
from proxyd.wellknown import WellKnown

DEFAULT_CLOCKS = Clocks(monotonic=time.monotonic, wall=time.time)

log = get_logger("proxyd")


@dataclass(frozen=True, slots=True)
class Core:
    """What create_app builds before the loop runs, shared by every configuration."""

    clocks: Clocks
    rng: random.Random
    store: AppAuthStore
    health: HealthBook
    metrics: Metrics
    watcher: AuthConfigWatcher


@dataclass(frozen=True, slots=True)
class Resources:
    """What lives as long as the process and needs the running loop: built whole by
    ``open_resources``, each closed by the stack that opened it (issue 11)."""

    http: aiohttp.ClientSession  # JWKS and health checks
    upstreams: UpstreamClient  # the hot path: requests to app servers
    jwks: JwksCache
    sessions: SessionStore
    identity_key: ECKey
    auditor: Auditor
    checker: HealthChecker
    state: RedisState | None  # only with [state] backend = "redis"
    shared_sessions: SharedSessions | None  # likewise
    tracing: Tracing | None = None  # only with [tracing] otlp_endpoint


async def open_resources(settings: Settings, core: Core, stack: AsyncExitStack) -> Resources:
    """Every resource, its close pushed on ``stack`` the moment it exists.

    aiohttp's cleanup contexts close in reverse and collect errors (web_app.py); one generator
    that built all of them and closed them in one ``finally`` leaked what was made when a later
    step failed (a bad identity.key_file left the ClientSession unclosed) and skipped every
    close after one that raised.
    """
    tracing = None
    if settings.tracing.enabled:
        # First: closed last, so the spans of the requests that end during shutdown are sent.
        tracing = Tracing(settings.tracing, core.metrics)
        stack.push_async_callback(tracing.close)
    upstreams = UpstreamClient(
        keepalive_timeout=settings.upstream.keepalive_timeout,
        max_idle=settings.upstream.max_idle_connections,
    )
    stack.push_async_callback(upstreams.close)
    # JWKS fetches and health checks keep aiohttp's client (off the hot path).
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    stack.push_async_callback(http.close)
    jwks = JwksCache(http, settings.jwks, core.clocks.monotonic)
    stack.push_async_callback(jwks.close)
    state = shared_sessions = None
    if settings.state.shared:
        state = RedisState(settings.state, core.clocks.monotonic, core.metrics)
        stack.push_async_callback(state.close)
        log.info(
            "state_backend",
            backend="redis",
            url=state.url,
            timeout=settings.state.timeout,
            limiter_failure=settings.state.limiter_failure,
        )
        await state.start()
        shared_sessions = SharedSessions(
            redis_session_cache(state),
            state,
            core.store,
            settings.sessions.mcp_keys,
            core.clocks.wall,
        )
    sessions = SessionStore(core.clocks.wall, settings.sessions.max_ttl, shared_sessions)
    stack.push_async_callback(sessions.close)
    auditor = Auditor(settings.audit)
    stack.callback(auditor.close)
    identity_key = load_or_create_key(settings.identity.key_file, settings.server.state_dir)
    checker = HealthChecker(core.health, http)
    stack.push_async_callback(checker.stop)
    return Resources(
        http,
        upstreams,
        jwks,
        sessions,
        identity_key,
        auditor,
        checker,
        state,
        shared_sessions,
        tracing,
    )


class ReloadNotice(Protocol):
    """How a reload is told to the service manager (proxyd.process.notify.Notifier)."""

    def reloading(self) -> None: ...

    def ready(self, status: str) -> None: ...


class Runtime:
    """The configuration in force: one reference, swapped whole on reload (a request reads it
    once, so it sees the old configuration or the new one, never a mix)."""

    def __init__(self, settings: Settings, core: Core, mcp_key: bytes | None = None) -> None:
        self.settings = settings
        self.boot_settings = settings  # what the listeners, key and directories were built from
        self.core = core
        self._resources: Resources | None = None
        self.ready = False
        self._serving: tuple[McpHandler, WellKnown] | None = None
        self.ephemeral_mcp_key = mcp_key
        self.limiters: dict[tuple[str, RateLimitSettings], Limiter | SharedLimiter] = {}
        # The listeners' TLS (proxyd/tls.py), set by the process that binds them: re-read on
        # each reload.
        self.listener_tls: list[ServerTLS] = []
        # A reload logs the file's warnings (config_warning); a worker leaves it to its
        # supervisor, so they are logged once.
        self.logs_config_warnings = True

    @property
    def resources(self) -> Resources:
        if self._resources is None:
            raise RuntimeError("proxyd's resources are opened when the app starts")
        return self._resources

    @property
    def handler(self) -> McpHandler:
        return self._installed()[0]

    @property
    def well_known(self) -> WellKnown:
        return self._installed()[1]

    def _installed(self) -> tuple[McpHandler, WellKnown]:
        # aiohttp serves no request before the cleanup contexts ran (install happens there).
        if self._serving is None:
            raise RuntimeError("no configuration is installed before the app starts")
        return self._serving

    @property
    def started(self) -> bool:
        return self._resources is not None

    def start(self, resources: Resources) -> None:
        self._resources = resources
        self.install(self.settings)

    async def stop(self) -> None:
        self.ready = False
        if self._serving is not None:
            await self._serving[0].close()

    def limiter(self, kind: str, settings: RateLimitSettings) -> Limiter | SharedLimiter:
        # Same settings after a reload: keep the buckets (a reload is no way around a limit).
        key = (kind, settings)
        if key not in self.limiters:
            self.limiters = {k: v for k, v in self.limiters.items() if k[0] != kind}
            local = Limiter(settings, self.core.clocks.monotonic)
            state = self.resources.state
            if state is None:
                self.limiters[key] = local
            else:
                # In Redis the buckets outlive any reload; `local` serves limiter_failure=local.
                self.limiters[key] = SharedLimiter(settings, kind, state, local)
        return self.limiters[key]

    def install(
        self, settings: Settings, credentials: Mapping[str, tuple[str, str]] | None = None
    ) -> None:
        """Build the configuration's objects and swap them in. ``credentials``: the headers of
        ``[apps.upstream_auth]`` (read now when not given: a rotated secret needs no restart)."""
        if credentials is None:
            credentials = upstream_credentials(settings.apps)
        core, r = self.core, self.resources
        r.upstreams.reconfigure(
            settings.upstream.keepalive_timeout, settings.upstream.max_idle_connections
        )
        # [apps.tls] and [app_auth_configs.jwt.tls] (issue 13 §2): contexts built anew on start
        # and on each reload (a rotated CA or client certificate is read again).
        tls_profiles = app_profiles(settings.apps)
        r.upstreams.set_tls(tls_profiles)
        core.health.set_tls(tls_profiles)
        store = core.store

        def jwks_ca_file(url: str) -> str:
            for config in store.snapshot.configs:
                if config.jwt.jwks_url == url and config.jwt.tls.ca_file:
                    return config.jwt.tls.ca_file
            return ""

        r.jwks.set_tls(jwks_ca_file)
        insecure = insecure_apps(settings.apps)
        core.metrics.set_insecure_apps(insecure)
        for name in insecure:
            log.warning(
                "upstream_tls_insecure",
                app=name,
                message="insecure_skip_verify = true: the app's server certificates are NOT "
                "verified (anyone on the path can impersonate them)",
            )
        r.auditor.reconfigure(settings.audit)
        core.health.reconfigure(settings.apps)
        r.sessions.reconfigure(settings.sessions.max_ttl)
        if r.shared_sessions is not None and settings.sessions.mcp_keys:
            r.shared_sessions.set_keys(settings.sessions.mcp_keys)
        registry = Registry(settings.apps, core.rng, core.health, credentials)
        signer = AssertionSigner(r.identity_key, settings.server.public_url, settings.identity.ttl)
        limits = Limits(
            self.limiter("unauthenticated", settings.limits.unauthenticated),
            self.limiter("per_user", settings.limits.per_user),
            core.metrics,
        )
        keys = list(settings.sessions.mcp_keys) or self._ephemeral_key()
        pinning = SessionPinning(SessionIdCodec(keys), registry)
        authenticator = Authenticator(
            core.store, r.jwks, core.clocks.wall, settings.server.public_url
        )
        forwarder = Forwarder(r.upstreams, settings.upstream, core.metrics)
        policy = Policy(settings.roles)
        handler = McpHandler(
            settings,
            registry,
            SessionGate(r.sessions, authenticator, limits, core.metrics, r.auditor, core.clocks),
            # New roles apply to live sessions from the next request.
            McpGate(
                settings.server,
                policy,
                pinning,
                ToolCalls(core.metrics.tool_calls, policy.named_tools),
            ),
            UpstreamRouter(registry, forwarder, pinning, settings.upstream.max_attempts),
            signer,
            r.auditor,
            core.clocks,
            RequestTracer(r.tracing, settings) if r.tracing is not None else None,
        )
        well_known = WellKnown(settings.server.public_url, registry, core.store, signer)
        self.settings, self._serving = settings, (handler, well_known)

    async def reload(self, path: str, notifier: ReloadNotice) -> bool:
        """SIGHUP: re-read and validate the main file; on success swap the configuration.

        Apps, servers, health checks, limits, upstream timeouts, MCP session keys, the identity
        assertion's lifetime, the main file's app auth configs and the log level change at
        once; requests and streams in flight finish on the configuration they started with.
        The listeners read their timeouts and connection cap from this runtime for each new
        connection and request head (proxyd/listener.py). A file with any problem changes
        nothing: every problem is logged. What a running process cannot change (listen
        addresses, directories, keys on disk, the state backend) is named in the log.
        """
        metrics = self.core.metrics
        notifier.reloading()
        try:
            new = load_settings(path, load_dir=False)
            # Read before anything changes: a secret that cannot be read keeps the old ones.
            credentials = upstream_credentials(new.apps)
        except ConfigError as exc:
            log.error(
                "config_reload_failed",
                path=path,
                problems=exc.problems,
                kept="the configuration in force",
            )
            metrics.reloads.labels("sighup", "failed").inc()
            notifier.ready("reload failed: previous configuration in force")
            return False
        try:
            # Every pair is loaded aside first: a bad one changes nothing, on no listener.
            for tls in self.listener_tls:
                tls.verify()
            for tls in self.listener_tls:
                tls.reload()
        except TLSError as exc:
            log.error(
                "config_reload_failed",
                path=path,
                problems=[str(exc)],
                kept="the configuration and certificates in force",
            )
            metrics.reloads.labels("sighup", "failed").inc()
            notifier.ready("reload failed: previous configuration in force")
            return False
        if self.logs_config_warnings:
            for key, message in new.warnings:
                log.warning("config_warning", key=key, message=message, path=path)
        # Compared with what the process started with: that is what is in force for these keys.
        boot = self.boot_settings
        later = [key for key, value in RESTART_ONLY.items() if value(boot) != value(new)]
        if later:
            log.warning(
                "config_change_needs_restart",
                keys=later,
                detail="these settings keep their old values until proxyd restarts",
            )
        set_level(new.log.level)
        self.install(in_force(new, boot), credentials)
        self.core.watcher.set_main(new.main_app_auth_configs)
        checker = self.resources.checker
        await checker.stop()
        checker.start()
        metrics.reloads.labels("sighup", "applied").inc()
        log.info(
            "config_reloaded",
            path=path,
            apps=[a.name for a in new.apps],
            generation=self.core.store.snapshot.generation,
        )
        notifier.ready("serving (configuration reloaded)")
        return True

    def _ephemeral_key(self) -> list[bytes]:
        if self.ephemeral_mcp_key is None:
            log.warning(
                "mcp_session_key_ephemeral",
                detail="no sessions.mcp_keys configured: MCP sessions will not survive a "
                "restart or work across proxyd instances",
            )
            self.ephemeral_mcp_key = os.urandom(32)
        return [self.ephemeral_mcp_key]


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
    watcher = AuthConfigWatcher(
        store,
        settings.main_app_auth_configs,
        settings.app_auth_config_dir,
        force_polling=force_polling,
    )
    core = Core(
        clocks=clocks,
        # Spreads load over app servers; not a security decision, so any PRNG will do.
        rng=rng or random.Random(),  # noqa: S311
        store=store,
        health=HealthBook(settings.apps, clocks.monotonic),
        metrics=metrics,
        watcher=watcher,
    )
    runtime = Runtime(settings, core, mcp_key)
    app[RUNTIME] = runtime
    app[AUTH_STORE] = store
    app[HEALTH] = core.health
    app[WATCHER] = watcher
    register_collectors(metrics, runtime)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            resources = await open_resources(settings, core, stack)
            runtime.start(resources)
            stack.push_async_callback(runtime.stop)  # first of all: not ready, verifications
            app[CHECKER] = resources.checker
            watcher.rescan()  # the directory as it is now: serving starts on a full load
            watcher.start()
            stack.push_async_callback(watcher.stop)
            resources.checker.start()
            runtime.ready = True
            yield

    app.cleanup_ctx.append(lifetime)
    # CORS (proxyd/cors.py): preflights, and every answer's Access-Control-* stamped as its
    # head is prepared (outermost of all: proxyd's own errors and streamed answers included).
    cors = CorsPolicy(lambda: runtime.settings.server)
    app.on_response_prepare.append(cors.on_prepare)
    # Each OPTIONS route first on its resource: aiohttp picks a method's own route over "*".
    app.router.add_route("OPTIONS", "/mcp/apps/{app}", cors.mcp_options)
    app.router.add_route("*", "/mcp/apps/{app}", _mcp)
    app.router.add_route("OPTIONS", "/.well-known/jwks.json", cors.public_options)
    app.router.add_get("/.well-known/jwks.json", _jwks)
    metadata = "/.well-known/oauth-protected-resource/mcp/apps/{app}"
    app.router.add_route("OPTIONS", metadata, cors.public_options)
    app.router.add_get(metadata, _resource_metadata)
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
    core = runtime.core

    def collect() -> Iterator[Metric]:
        now = core.clocks.monotonic()
        yield gauge(
            "proxyd_upstream_healthy",
            "1 when the app server takes new work (healthy and not ejected).",
            ["app", "server", "state"],
            (([h.app, h.server, h.label(now)], float(h.available(now))) for h in core.health.all()),
        )
        snapshot = core.store.snapshot
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
            [([], core.store.loaded_at)],
        )
        yield gauge(
            "proxyd_app_auth_configs",
            "App auth configs in force.",
            [],
            [([], float(len(snapshot.configs)))],
        )
        if runtime.started:
            stats = runtime.resources.jwks.stats()
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
    return await request.app[RUNTIME].handler.handle(request)


async def _jwks(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].well_known.jwks(request)


async def _resource_metadata(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].well_known.protected_resource(request)
