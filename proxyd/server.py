"""The daemon's life: bind the listeners, serve until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxyd.app import create_admin_app, create_app
from proxyd.config import Settings
from proxyd.log import get_logger

log = get_logger("proxyd")


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state: dict[str, Any] = {"ready": False}
    runners: list[web.AppRunner] = []
    try:
        runner = web.AppRunner(
            create_app(settings),
            handler_cancellation=True,  # a client that leaves cancels its upstream request
            access_log=None,  # proxyd writes its own access line
            shutdown_timeout=settings.server.shutdown_grace,
        )
        runners.append(runner)
        await runner.setup()
        s = settings.server
        await web.TCPSite(runner, s.listen_host, s.listen_port, reuse_address=True).start()
        if settings.admin.enabled:
            admin = web.AppRunner(create_admin_app(state), access_log=None)
            runners.append(admin)
            await admin.setup()
            await web.TCPSite(admin, settings.admin.listen_host, settings.admin.listen_port).start()
        state["ready"] = True
        log.info(
            "proxyd_started",
            listen=f"{s.listen_host}:{s.listen_port}",
            public_url=s.public_url,
            apps=[a.name for a in settings.apps],
            app_auth_configs=[c.name for c in settings.app_auth_configs],
        )
        if on_ready is not None:
            on_ready()
        await stop.wait()
        state["ready"] = False
        log.info("proxyd_stopping", grace_seconds=settings.server.shutdown_grace)
    finally:
        for r in reversed(runners):
            await r.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("proxyd_stopped")
