"""The admin app (/healthz, /readyz, /metrics): one builder for a serving process and for the
supervisor, which differ only in what "ready" means and where the metrics come from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from proxyd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE


def admin_app(
    *,
    ready: Callable[[], bool],
    metrics: Callable[[], Awaitable[bytes]],
    details: Callable[[], Mapping[str, Any]] = dict,
) -> web.Application:
    """``details``: more fields for /healthz and /readyz (the supervisor's workers)."""
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **details()})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok, **details()}, status=200 if ok else 503)

    async def scrape(_: web.Request) -> web.Response:
        body = await metrics()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    return app
