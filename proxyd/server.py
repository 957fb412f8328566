"""The daemon's life: bind, tell systemd we are ready, reload on SIGHUP, drain on SIGTERM.

SIGTERM/SIGINT: readiness goes false (``/readyz`` 503, STOPPING=1), the listeners close, and
requests in flight get ``server.shutdown_grace`` to finish before the remaining streams are
cut; then the process exits 0. SIGHUP reloads the main file (proxyd.reload), one at a time.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from aiohttp import web

from proxyd.app import RUNTIME, create_admin_app, create_app
from proxyd.config import Settings
from proxyd.log import get_logger
from proxyd.notify import Notifier
from proxyd.reload import reload

log = get_logger("proxyd")


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    notifier = Notifier()
    draining = False
    reloading = asyncio.Lock()
    reloads: set[asyncio.Task[bool]] = set()
    app = create_app(settings)
    runtime = app[RUNTIME]

    async def reload_once() -> bool:
        async with reloading:  # two quick SIGHUPs: the second reads the file after the first
            assert settings.path is not None
            return await reload(app, settings.path, notifier)

    def on_hup() -> None:
        task = asyncio.create_task(reload_once(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.path is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    runners: list[web.AppRunner] = []
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
        await web.TCPSite(runner, s.listen_host, s.listen_port, reuse_address=True).start()
        if settings.admin.enabled:
            admin = web.AppRunner(create_admin_app(runtime, lambda: draining), access_log=None)
            runners.append(admin)
            await admin.setup()
            await web.TCPSite(admin, settings.admin.listen_host, settings.admin.listen_port).start()
        log.info(
            "proxyd_started",
            listen=f"{s.listen_host}:{s.listen_port}",
            public_url=s.public_url,
            apps=[a.name for a in settings.apps],
            app_auth_configs=[c.name for c in runtime.shared.store.snapshot.configs],
        )
        notifier.ready(f"serving {len(settings.apps)} apps on {s.listen_host}:{s.listen_port}")
        if on_ready is not None:
            on_ready()
        await stop.wait()
        draining = True
        notifier.stopping()
        log.info("proxyd_stopping", grace_seconds=settings.server.shutdown_grace)
    finally:
        if settings.path is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        # The MCP listener first (stop accepting, drain in-flight up to the grace), then admin.
        for r in runners:
            await r.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("proxyd_stopped")
