"""The daemon's life: bind, tell systemd we are ready, reload on SIGHUP, drain on SIGTERM.

SIGTERM/SIGINT: readiness goes false (``/readyz`` 503, STOPPING=1), the listeners close, and
requests in flight get ``server.shutdown_grace`` to finish before the remaining streams are
cut; then the process exits 0. SIGHUP reloads the main file (``Runtime.reload``), one at a
time (proxyd.process.reloader).
"""

from __future__ import annotations

import asyncio
import gc
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client.core import Metric

from proxyd.app import RUNTIME, Runtime, create_app
from proxyd.config import (
    ConfigError,
    ListenerTlsSettings,
    Settings,
    read_config,
    settings_from_text,
)
from proxyd.listener import Listener, ListenerSite
from proxyd.log import configure, get_logger
from proxyd.metrics import gauge
from proxyd.process.activation import describe, inherited_sockets
from proxyd.process.admin import admin_app
from proxyd.process.loop import exit_code, run_loop
from proxyd.process.notify import Notifier
from proxyd.process.reloader import Reloader
from proxyd.tls import ServerTLS, TLSFiles

log = get_logger("proxyd")


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """One of the processes of a supervised proxyd (proxyd.process.supervisor): it shares the
    MCP port with its siblings (SO_REUSEPORT), serves its admin app on a private unix socket
    that the supervisor scrapes, uses the supervisor's MCP session key, and reports its states
    to it."""

    index: int
    admin_socket: str
    control: Notifier
    mcp_key: bytes | None


def raise_fd_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one; the limit now in force.

    Each client connection and each upstream stream holds a descriptor: 10,000 open SSE
    streams need 20,000. Started by hand the soft limit is often 1024 — about 500 streams —
    while the hard one allows far more (Go's runtime and nginx's worker_rlimit_nofile do the
    same). Under systemd the unit's LimitNOFILE sets both.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_unchanged", soft=soft, hard=hard, error=str(exc))
            return soft
        return target
    return soft


async def serve(
    settings: Settings,
    on_ready: Callable[[], None] | None = None,
    role: WorkerRole | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    fd_limit = raise_fd_limit()
    stop = asyncio.Event()
    notifier = role.control if role is not None else Notifier()
    draining = False
    app = create_app(settings, mcp_key=role.mcp_key if role is not None else None)
    runtime = app[RUNTIME]
    runtime.logs_config_warnings = role is None  # a supervisor logs them once for its workers

    async def reload_file() -> bool:
        assert settings.path is not None
        return await runtime.reload(settings.path, notifier)

    reloader = Reloader(reload_file, lambda: "draining" if draining else None, log)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.path is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.on_hup)
    runners: list[web.AppRunner] = []
    # Sockets systemd (or the supervisor) handed over take precedence over `listen`.
    inherited = inherited_sockets()
    mcp_tls = listener_tls("mcp", settings.server.tls)
    admin_tls = listener_tls("admin", settings.admin.tls) if role is None else None
    runtime.listener_tls = [t for t in (mcp_tls, admin_tls) if t is not None]
    runtime.core.metrics.collect_with(lambda: [expiry_metric(runtime.listener_tls)])
    try:
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that leaves cancels its upstream request
            access_log=None,  # proxyd writes its own access line
            shutdown_timeout=settings.server.shutdown_grace,
        )
        runners.append(runner)
        await runner.setup()
        s = settings.server
        # Header timeout, connection cap, keep-alive timeout and 431s (proxyd/listener.py),
        # read from the settings in force: a reload applies them to the next connections.
        mcp_listener = Listener(lambda: runtime.settings.server, runtime.core.metrics)
        mcp_context = mcp_tls.context if mcp_tls is not None else None
        if "mcp" in inherited:
            listening = describe(inherited["mcp"])
            await ListenerSite(
                runner, mcp_listener, sock=inherited["mcp"], ssl_context=mcp_context
            ).start()
        else:
            listening = f"{s.listen_host}:{s.listen_port}"
            await ListenerSite(
                runner,
                mcp_listener,
                host=s.listen_host,
                port=s.listen_port,
                # The kernel spreads new connections over the workers' sockets (one accept
                # queue each, no thundering herd); only processes of the same user may join.
                reuse_port=role is not None,
                ssl_context=mcp_context,
            ).start()
        if s.max_connections * 2 > fd_limit:
            # Each open stream holds two descriptors: accept() would fail (EMFILE) before the
            # cap refuses anything, and the upstream side of open streams with it.
            log.warning(
                "max_connections_above_fd_limit",
                max_connections=s.max_connections,
                fd_limit=fd_limit,
                detail="raise LimitNOFILE (ulimit -n) or lower server.max_connections",
            )
        # The admin listener gets the timeouts but no cap: a flood of MCP clients must not
        # lock an operator out of /metrics and /readyz.
        admin_listener = Listener(lambda: runtime.settings.server, capped=False)
        if role is not None:
            admin = web.AppRunner(admin_app_of(runtime, lambda: draining), access_log=None)
            runners.append(admin)
            await admin.setup()
            await ListenerSite(admin, admin_listener, path=role.admin_socket).start()
        elif settings.admin.enabled:
            admin = web.AppRunner(admin_app_of(runtime, lambda: draining), access_log=None)
            runners.append(admin)
            await admin.setup()
            admin_context = admin_tls.context if admin_tls is not None else None
            if "admin" in inherited:
                await ListenerSite(
                    admin, admin_listener, sock=inherited["admin"], ssl_context=admin_context
                ).start()
            else:
                await ListenerSite(
                    admin,
                    admin_listener,
                    host=settings.admin.listen_host,
                    port=settings.admin.listen_port,
                    ssl_context=admin_context,
                ).start()
        log.info(
            "proxyd_started",
            listen=listening,
            tls=mcp_tls is not None,
            public_url=s.public_url,
            apps=[a.name for a in settings.apps],
            app_auth_configs=[c.name for c in runtime.core.store.snapshot.configs],
            loop=type(loop).__module__.split(".")[0],
            gc_thresholds=list(gc.get_threshold()),
            fd_limit=fd_limit,
        )
        notifier.ready(f"serving {len(settings.apps)} apps on {listening}")
        if on_ready is not None:
            on_ready()
        await stop.wait()
        draining = True
        notifier.stopping()
        log.info("proxyd_stopping", grace_seconds=settings.server.shutdown_grace)
    finally:
        draining = True
        await reloader.close()
        # The MCP listener first (stop accepting, drain in-flight up to the grace), then admin.
        for r in runners:
            await _cleanup(r, settings.server.shutdown_grace)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if settings.path is not None:
            loop.remove_signal_handler(signal.SIGHUP)
    log.info("proxyd_stopped")


def listener_tls(name: str, tls: ListenerTlsSettings | None) -> ServerTLS | None:
    """A listener's TLS context from its [server.tls] / [admin.tls] (None: plain HTTP)."""
    if tls is None:
        return None
    return ServerTLS(
        name, TLSFiles(tls.cert_file, tls.key_file, tls.min_version, tls.client_ca_file)
    )


def expiry_metric(tls: list[ServerTLS]) -> Metric:
    return gauge(
        "proxyd_tls_certificate_expiry_seconds",
        "When the certificate a listener serves expires (its notAfter, Unix seconds).",
        ["listener"],
        (([t.name], t.not_after) for t in tls),
    )


async def _cleanup(runner: web.AppRunner, grace: float) -> None:
    """``runner.cleanup()``, with the connections still open after ``grace`` closed then.

    aiohttp waits up to its shutdown_timeout for handlers, then "cancels" them by failing the
    request body only and waits shutdown_timeout again: a stream that reads no body (every SSE
    answer) was cut after 2 x grace, 60 s by default, past the unit's TimeoutStopSec=45s, so
    systemd killed proxyd instead of seeing exit 0. Closing a connection cancels its handler
    (handler_cancellation=True) and the cleanup goes on at once.
    """
    cleanup = asyncio.ensure_future(runner.cleanup())
    done, _ = await asyncio.wait({cleanup}, timeout=grace)
    if not done and runner.server is not None:
        for connection in runner.server.connections:
            connection.force_close()
    await cleanup


def admin_app_of(runtime: Runtime, draining: Callable[[], bool]) -> web.Application:
    """/healthz (process alive), /readyz (serving), /metrics of this process."""

    async def metrics() -> bytes:
        return runtime.core.metrics.render()

    return admin_app(ready=lambda: runtime.ready and not draining(), metrics=metrics)


def log_config_warnings(settings: Settings) -> None:
    """What check-config prints as ``warning:``, as one structured line each."""
    for key, message in settings.warnings:
        log.warning("config_warning", key=key, message=message, path=settings.path)


def run(path: str) -> int:
    """``proxyd run -c FILE``: serve (or supervise the workers) until stopped; the exit code."""
    try:
        text = read_config(path)
        settings = settings_from_text(text, path)
    except ConfigError as exc:
        configure()
        log.error("config_invalid", path=path, problems=exc.problems)
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 2
    configure(settings.log.level, settings.log.format)
    log_config_warnings(settings)  # once, here: not again in each worker
    if settings.server.workers > 1:
        from proxyd.process.supervisor import supervise  # its own process: only then

        with exit_code(log) as code:
            code.value = supervise(settings, path, text)
        return code.value
    with exit_code(log) as code:
        run_loop(serve(settings))
    return code.value
