"""The admin app (/healthz, /readyz, /metrics): one builder for a serving process and for the
supervisor, which differ only in what "ready" means and where the metrics come from."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxyd.log import get_logger
from proxyd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxyd.metrics import counter, gauge

log = get_logger("proxyd.supervisor")

SCRAPE_TIMEOUT: Final = 5.0


class WorkerView(Protocol):
    """What the merged metrics read of a supervisor's worker (process.supervisor.Worker)."""

    index: int
    admin_socket: str
    state: str
    restarts: int

    @property
    def alive(self) -> bool: ...


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


async def merged_metrics(workers: Sequence[WorkerView]) -> bytes:
    """Every worker's metrics (read from its admin socket) with a ``worker`` label, and the
    supervisor's own: workers by state, restarts, whether each one's scrape worked. Not
    prometheus-client's multiprocess mode: it does not carry custom collectors, and each
    worker's (health, JWKS age, config generation) are read at scrape time."""
    texts = await asyncio.gather(*(_scrape_one(w) for w in workers))
    families: dict[str, Metric] = {}
    for worker, text in zip(workers, texts, strict=True):
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(worker.index)}
                merged.samples.append(sample._replace(labels=labels))
    registry = CollectorRegistry()
    registry.register(_Families([*families.values(), *_own_metrics(workers, texts)]))
    return generate_latest(registry)


def _own_metrics(workers: Sequence[WorkerView], texts: list[str | None]) -> Iterator[Metric]:
    states = ("starting", "ready", "reloading", "stopping", "stopped")
    yield gauge(
        "proxyd_workers",
        "Worker processes by state.",
        ["state"],
        (([st], float(sum(w.state == st for w in workers))) for st in states),
    )
    yield counter(
        "proxyd_worker_restarts",
        "Workers started again after they died.",
        ["worker"],
        (([str(w.index)], float(w.restarts)) for w in workers),
    )
    yield gauge(
        "proxyd_worker_scrape_ok",
        "1 when the worker's metrics were read for this scrape.",
        ["worker"],
        (([str(w.index)], float(t is not None)) for w, t in zip(workers, texts, strict=True)),
    )


async def _scrape_one(worker: WorkerView) -> str | None:
    if not worker.alive or worker.state == "starting":
        return None
    try:
        connector = aiohttp.UnixConnector(path=worker.admin_socket)
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
            http.get("http://worker/metrics") as resp,
        ):
            if resp.status != 200:
                return None
            return await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("worker_scrape_failed", worker=worker.index, error=str(exc))
        return None


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
