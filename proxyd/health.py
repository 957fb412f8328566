"""Health of app servers: active checks (TCP connect or HTTP) and passive outlier ejection.

A server takes new work when the active checker has not marked it unhealthy and it is not
ejected. Passive: consecutive connect failures, resets and 5xx answers of real traffic eject a
server for a cool-down that doubles while it keeps failing (nginx ``max_fails``/``fail_timeout``,
Envoy outlier detection); one success resets it. Every change of state is logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from proxyd.config import AppSettings, HealthCheckSettings
from proxyd.log import get_logger
from proxyd.upstream.tls import TlsProfile
from proxyd.upstream.wire import Origin

log = get_logger("proxyd.health")


@dataclass(slots=True)
class ServerHealth:
    app: str
    server: str
    settings: HealthCheckSettings
    healthy: bool = True  # the active checker's view; optimistic until it says otherwise
    ok_streak: int = 0
    fail_streak: int = 0
    passive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    # The state last logged. The end of a cool-down is no event (only the clock moves), so it
    # is noticed and logged on the next look at the server (a pick, a check, a result); every
    # logged change then starts where the previous one ended.
    shown: str = "healthy"

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def label(self, now: float) -> str:
        if not self.healthy:
            return "unhealthy"
        return "ejected" if now < self.ejected_until else "healthy"


class HealthBook:
    """The health of every app server, fed by the active checker and by real traffic."""

    def __init__(self, apps: Iterable[AppSettings], clock: Callable[[], float]) -> None:
        self._clock = clock
        self._servers: dict[tuple[str, str], ServerHealth] = {
            (app.name, server): ServerHealth(app.name, server, app.health_check)
            for app in apps
            for server in app.servers
        }
        self.changed = asyncio.Event()  # set on every change (tests and metrics wait on it)
        self._tls: dict[str, TlsProfile] = {}

    def reconfigure(self, apps: Iterable[AppSettings]) -> None:
        """A reload: keep the state of servers that stay, start new ones healthy, drop the rest."""
        servers: dict[tuple[str, str], ServerHealth] = {}
        for app in apps:
            for server in app.servers:
                state = self._servers.get((app.name, server))
                if state is None:
                    state = ServerHealth(app.name, server, app.health_check)
                else:
                    state.settings = app.health_check
                servers[(app.name, server)] = state
        self._servers = servers

    def set_tls(self, profiles: Mapping[str, TlsProfile]) -> None:
        """[apps.tls] by origin key, for the active checks (install, on start and reload)."""
        self._tls = dict(profiles)

    def tls(self, server: str) -> TlsProfile | None:
        if not self._tls:
            return None
        try:
            return self._tls.get(Origin.parse(server).key)
        except ValueError:
            return None

    def get(self, app: str, server: str) -> ServerHealth | None:
        return self._servers.get((app, server))

    def all(self) -> list[ServerHealth]:
        return list(self._servers.values())

    def available(self, app: str, server: str) -> bool:
        state = self._servers.get((app, server))
        if state is None:
            return False
        self._expire(state)
        return state.available(self._clock())

    def active_result(self, state: ServerHealth, ok: bool, reason: str) -> None:
        self._expire(state)
        if ok:
            state.ok_streak, state.fail_streak = state.ok_streak + 1, 0
            if not state.healthy and state.ok_streak >= state.settings.healthy_threshold:
                state.healthy = True
                state.passive_failures, state.ejections, state.ejected_until = 0, 0, 0.0
        else:
            state.fail_streak, state.ok_streak = state.fail_streak + 1, 0
            if state.healthy and state.fail_streak >= state.settings.unhealthy_threshold:
                state.healthy = False
        self._log_change(state, reason)

    def passive_success(self, app: str, server: str) -> None:
        state = self._servers.get((app, server))
        if state is not None and (state.passive_failures or state.ejections):
            self._expire(state)
            state.passive_failures, state.ejections = 0, 0
            self._log_change(state, "request_succeeded")

    def passive_failure(self, app: str, server: str, reason: str) -> None:
        state = self._servers.get((app, server))
        if state is None:
            return
        self._expire(state)
        now = self._clock()
        if now < state.ejected_until:
            # A request sent before the ejection and failing during it reports the same
            # outage: ejecting again made the cool-down grow with the number of requests in
            # flight (3 at once: 10 s → 40 s) instead of with consecutive ejections. Envoy's
            # outlier detection skips hosts already ejected the same way.
            return
        state.passive_failures += 1
        if state.passive_failures >= state.settings.passive_failures:
            cooldown = min(
                state.settings.ejection * 2**state.ejections, state.settings.max_ejection
            )
            state.ejected_until = now + cooldown
            state.ejections += 1
            state.passive_failures = 0
            log.warning(
                "upstream_ejected",
                app=state.app,
                server=state.server,
                reason=reason,
                seconds=cooldown,
                ejections=state.ejections,
            )
        self._log_change(state, reason)

    def _expire(self, state: ServerHealth) -> None:
        """Log the end of a cool-down that passed since the last look (see ``shown``)."""
        if state.shown == "ejected" and state.label(self._clock()) != "ejected":
            self._log_change(state, "ejection_expired")

    def _log_change(self, state: ServerHealth, reason: str) -> None:
        # From the state last logged, not the one before this call: that one was computed
        # with the clock of now and hid an unlogged end of an ejection ("healthy" → "ejected"
        # twice in a row, never "ejected" → "healthy").
        before, after = state.shown, state.label(self._clock())
        if after != before:
            state.shown = after
            log.warning(
                "upstream_health_changed",
                app=state.app,
                server=state.server,
                **{"from": before, "to": after},
                reason=reason,
            )
        self.changed.set()
        self.changed = asyncio.Event()


async def probe(
    http: aiohttp.ClientSession,
    server: str,
    settings: HealthCheckSettings,
    tls: TlsProfile | None = None,
) -> str | None:
    """One active check: None when healthy, else the reason. ``tls``: the app's [apps.tls]
    for an https server (else aiohttp's default verification)."""
    url = URL(server)
    try:
        if settings.type == "tcp":
            host, port = url.host or "", url.port or (443 if url.scheme == "https" else 80)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # lands as the connection completes, and HealthChecker.stop() then waits forever.
            async with asyncio.timeout(settings.timeout):
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                await writer.wait_closed()
            return None
        timeout = aiohttp.ClientTimeout(total=settings.timeout)
        # The configured path may carry a query ("/health?deep=1"): with_path alone sent it
        # percent-encoded as part of the path ("/health%3Fdeep=1", a 404).
        path, _, query = settings.path.partition("?")
        target = url.with_path(path).with_query(query or None)
        extra: dict[str, Any] = {}
        if tls is not None and url.scheme == "https":
            extra["ssl"] = tls.context
            if tls.server_name:
                extra["server_hostname"] = tls.server_name
        async with http.request(
            settings.method, target, timeout=timeout, allow_redirects=False, **extra
        ) as resp:
            if resp.status in settings.expected_statuses:
                return None
            return f"http_{resp.status}"
    except TimeoutError:
        return "timeout"
    except aiohttp.ClientSSLError:
        # Logged by the book with the change of state it causes (not on every check).
        return "upstream_tls"
    except (OSError, aiohttp.ClientError) as exc:
        return type(exc).__name__


class HealthChecker:
    """One task per server with an active check; started and stopped by create_app."""

    def __init__(self, book: HealthBook, http: aiohttp.ClientSession) -> None:
        self._book = book
        self._http = http
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for state in self._book.all():
            if state.settings.type != "none":
                self._tasks.append(
                    asyncio.create_task(self._run(state), name=f"health:{state.server}")
                )

    async def _run(self, state: ServerHealth) -> None:
        while True:
            tls = self._book.tls(state.server)
            reason = await probe(self._http, state.server, state.settings, tls)
            self._book.active_result(state, reason is None, reason or "check_passed")
            await asyncio.sleep(state.settings.interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
