"""Health of app servers (proxyd.health, proxyd.registry) and failover (McpHandler.forward).

Real servers on 127.0.0.1: the official MCP SDK's, aiohttp test servers and raw asyncio TCP
servers (a port that resets mid-body, a port that only counts connections). Only time (the
FakeClock drives passive ejection) and randomness (seeded) are faked. The active checker runs
on real time: its interval is tiny and every wait is on a condition (``HealthBook.changed``),
bounded by a generous guard, never a sleep.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxyd.app import HEALTH
from proxyd.config import (
    AppSettings,
    ConfigError,
    HealthCheckSettings,
    UpstreamSettings,
    parse_settings,
)
from proxyd.health import HealthBook, ServerHealth
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import LEGACY, MODERN, mcp_client, upstream_server
from tests.kit.proxy import RPC, Client, access_lines, bearer, config, padded_rpc, rpc_error
from tests.kit.wait import GUARD

# Active checks in real time: small enough to keep tests quick, never waited on directly.
FAST_TCP: dict[str, Any] = {
    "type": "tcp",
    "interval": "100ms",
    "timeout": "100ms",
    "unhealthy_threshold": 2,
    "healthy_threshold": 2,
}
# Passive-only: the active checker leaves these apps alone.
NO_ACTIVE: dict[str, Any] = {"type": "none"}
NEVER_EJECT = 1000  # passive_failures high enough that traffic never ejects in the test


# --------------------------------------------------------------------------------------------
# Helpers


def doc_with_health(
    issuer: TestIssuer,
    apps: Mapping[str, list[str]],
    tmp_path: Path,
    health: Mapping[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """tests.test_proxy.config() plus the same ``[apps.health_check]`` table on every app."""
    doc = config(issuer, dict(apps), tmp_path, **sections)
    if health is not None:
        for app in doc["apps"]:
            app["health_check"] = dict(health)
    return doc


def book_of(client: Client) -> HealthBook:
    return client.app[HEALTH]


def state_of(client: Client, app: str, server: str) -> ServerHealth:
    state = book_of(client).get(app, server)
    assert state is not None, f"{server} is not a server of {app}"
    return state


async def until_book(book: HealthBook, condition: Callable[[], bool], guard: float = GUARD) -> None:
    """Wait until ``condition()`` holds, re-checking on every change the book reports."""
    async with asyncio.timeout(guard):
        while not condition():
            await book.changed.wait()  # a fresh Event per change: read the attribute each time


def health_events(logs: LogCapture, server: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in logs.events("upstream_health_changed") if server is None or e["server"] == server
    ]


def transitions(logs: LogCapture, server: str) -> list[tuple[str, str, str]]:
    return [(e["from"], e["to"], e["reason"]) for e in health_events(logs, server)]


def ejections(logs: LogCapture, server: str) -> list[float]:
    return [e["seconds"] for e in logs.events("upstream_ejected") if e["server"] == server]


async def post(client: Client, token: str, **kwargs: Any) -> aiohttp.ClientResponse:
    if "data" not in kwargs:
        kwargs["json"] = RPC
    headers = {**bearer(token), "Content-Type": "application/json"}
    resp = await client.post("/mcp/apps/a", headers=headers, **kwargs)
    await resp.read()
    return resp


@pytest.fixture
def dead() -> Iterator[Callable[[], str]]:
    """Makes URLs of ports that refuse connections: bound, never listening (no reuse race)."""
    socks: list[socket.socket] = []

    def make() -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"

    yield make
    for sock in socks:
        sock.close()


class RawServer:
    """A plain TCP server on 127.0.0.1. ``reset_after=None``: count the connection and close
    it; else read until that many bytes arrived (headers and part of the body), then reset."""

    def __init__(self, reset_after: int | None = None) -> None:
        self.reset_after = reset_after
        self.connections = 0
        self.received: list[int] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/mcp"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        got = 0
        try:
            while self.reset_after is not None and got < self.reset_after:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += len(chunk)
        finally:
            self.received.append(got)
            if self.reset_after is not None:
                # SO_LINGER 0: close with RST, as a crashing upstream does.
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def raw_servers() -> AsyncIterator[Callable[[int | None], Awaitable[tuple[RawServer, str]]]]:
    servers: list[RawServer] = []

    async def make(reset_after: int | None) -> tuple[RawServer, str]:
        server = RawServer(reset_after)
        servers.append(server)
        return server, await server.start()

    yield make
    for server in servers:
        await server.close()


@dataclass
class Flaky:
    """An upstream whose answer to POST /mcp the test sets (``status``); counts hits."""

    status: int = 500
    hits: int = 0
    gate: asyncio.Event | None = None  # when given, answers wait for it
    expect: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)  # set at `expect` hits

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.hits += 1
        if self.hits == self.expect:
            self.all_in.set()
        if self.gate is not None:
            await self.gate.wait()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}}, status=self.status)


@dataclass(frozen=True)
class ProbeSeen:
    method: str
    path: str
    query: str
    status: int  # what the upstream answered
    healthy_before: bool | None  # the proxy's view of the server when the probe arrived


@dataclass
class Probed:
    """An upstream with a health endpoint whose status the test sets; records every probe
    with the proxy's view of the server at its arrival, so thresholds can be counted exactly
    (results of probes 1..k-1 are applied when probe k arrives)."""

    status: int = 200
    path: str = "/healthz"
    hang: bool = False
    probes: list[ProbeSeen] = field(default_factory=list)
    mcp_hits: int = 0
    view: Callable[[], ServerHealth] | None = None  # set once the proxy runs

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", self.path, self.health)
        app.router.add_post("/mcp", self.mcp)
        return app

    async def health(self, request: web.Request) -> web.StreamResponse:
        healthy = self.view().healthy if self.view is not None else None
        self.probes.append(
            ProbeSeen(request.method, request.path, request.query_string, self.status, healthy)
        )
        if self.hang:
            await asyncio.Event().wait()  # never answers: the probe times out
        return web.Response(status=self.status)

    async def mcp(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.mcp_hits += 1
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    def answered(self, status: int) -> list[ProbeSeen]:
        return [p for p in self.probes if p.status == status and p.healthy_before is not None]

    def since_last(self, status: int) -> list[ProbeSeen]:
        """The probes after the last one answered with ``status``."""
        last = max((i for i, p in enumerate(self.probes) if p.status == status), default=-1)
        return self.probes[last + 1 :]


async def session_ok(url: str, token: str, mode: str) -> list[int]:
    """One whole SDK client session (connect, tools/list, tools/call); the HTTP statuses."""
    async with mcp_client(url, token, mode=mode) as c:
        assert "add" in {t.name for t in (await c.list_tools()).tools}
        added = await c.call_tool("add", {"a": 2, "b": 40})
        assert added.content[0].text == "42"  # type: ignore[union-attr]
    return [r.status for r in c.received]


# --------------------------------------------------------------------------------------------
# Failover


async def test_one_dead_server_is_invisible_to_every_new_session(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    async with upstream_server(name="a") as dead_up, upstream_server(name="b") as live:
        await dead_up.stop()  # abrupt: the port now refuses connections
        doc = doc_with_health(issuer, {"a": [dead_up.url, live.url]}, tmp_path, NO_ACTIVE)
        proxy = await make_proxy(doc)
        url = str(proxy.make_url("/mcp/apps/a"))
        modes = [LEGACY, MODERN] * 10
        tokens = [issuer.token(clock.wall(), email=f"u{i}@example.com") for i in range(20)]
        statuses = await asyncio.wait_for(
            asyncio.gather(*(session_ok(url, t, m) for t, m in zip(tokens, modes, strict=True))),
            GUARD * 3,
        )
    # Every HTTP answer every client saw was a success: no client met the dead replica.
    assert all(s < 400 for per_client in statuses for s in per_client), statuses
    assert len(live.calls) == 20
    # Connections to it were tried, failed over, and it got ejected by passive checks.
    failovers = logs.events("upstream_failover")
    assert failovers and {e["server"] for e in failovers} == {dead_up.url}
    assert ejections(logs, dead_up.url), "the dead server was never ejected"
    assert transitions(logs, dead_up.url)[0] == ("healthy", "ejected", "upstream_unreachable")
    assert live.url not in {e["server"] for e in health_events(logs)}
    # Every request ended on the live server (the access line names the last attempt).
    lines = [line for line in access_lines(logs) if "upstream" in line]
    assert len(lines) >= 40
    assert {line["upstream"] for line in lines} == {live.url}


async def test_all_servers_refusing_is_502_after_trying_each(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    dead: Callable[[], str],
    logs: LogCapture,
) -> None:
    first, second = dead(), dead()
    health = {**NO_ACTIVE, "passive_failures": NEVER_EJECT}
    proxy = await make_proxy(doc_with_health(issuer, {"a": [first, second]}, tmp_path, health))
    body = await rpc_error(await post(proxy, issuer.token(clock.wall())), 502)
    assert "unreachable" in body["error"]["message"]
    # Both were tried, once each: one failover, then the error of the last one.
    assert state_of(proxy, "a", first).passive_failures == 1
    assert state_of(proxy, "a", second).passive_failures == 1
    [failover] = logs.events("upstream_failover")
    [line] = access_lines(logs)
    assert line["status"] == 502 and line["reason"] == "upstream_unreachable"
    assert {failover["server"], line["upstream"]} == {first, second}


async def test_no_available_server_is_503_with_a_clear_message(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    dead: Callable[[], str],
    logs: LogCapture,
) -> None:
    first, second = dead(), dead()
    health = {**NO_ACTIVE, "passive_failures": 1, "ejection": "30s"}
    proxy = await make_proxy(doc_with_health(issuer, {"a": [first, second]}, tmp_path, health))
    token = issuer.token(clock.wall())
    await rpc_error(await post(proxy, token), 502)  # tries both: both ejected
    assert len(logs.events("upstream_ejected")) == 2
    body = await rpc_error(await post(proxy, token), 503)
    assert body["error"]["message"] == "no healthy server for app a; try again shortly"
    assert body["error"]["data"]["reason"] == "no_healthy_upstream"
    assert access_lines(logs)[-1]["reason"] == "no_healthy_upstream"
    assert len(logs.events("upstream_failover")) == 1  # nothing was tried for the 503
    # The 503 is the ejection's doing: once the cool-down is over both are tried again.
    clock.advance(30)
    await rpc_error(await post(proxy, token), 502)
    assert len(logs.events("upstream_failover")) == 2


@pytest.mark.parametrize(("max_attempts", "tried"), [(1, 1), (2, 2), (3, 3), (6, 4)])
async def test_max_attempts_bounds_the_tries(
    max_attempts: int,
    tried: int,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    dead: Callable[[], str],
    logs: LogCapture,
) -> None:
    servers = [dead() for _ in range(4)]
    health = {**NO_ACTIVE, "passive_failures": NEVER_EJECT}
    doc = doc_with_health(
        issuer, {"a": servers}, tmp_path, health, upstream={"max_attempts": max_attempts}
    )
    proxy = await make_proxy(doc)
    await rpc_error(await post(proxy, issuer.token(clock.wall())), 502)
    counts = [state_of(proxy, "a", s).passive_failures for s in servers]
    assert sorted(counts) == [0] * (4 - tried) + [1] * tried  # each tried server once
    assert len(logs.events("upstream_failover")) == tried - 1


async def test_post_body_fails_over_intact_after_a_connect_failure(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    dead: Callable[[], str],
    logs: LogCapture,
) -> None:
    """A POST body is read whole before any attempt (even one the client sends chunked), so
    after a refused connect the next server gets all of it, with a Content-Length."""
    echo = Echo()
    down = dead()
    live = await upstreams.start(echo.app())
    health = {**NO_ACTIVE, "passive_failures": NEVER_EJECT}
    proxy = await make_proxy(doc_with_health(issuer, {"a": [down, live]}, tmp_path, health))
    token = issuer.token(clock.wall())
    payload = padded_rpc(200 * 1024, seed=5)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 16384):
            yield payload[i : i + 16384]

    for _ in range(20):  # the seeded choice decides the order; loop until a failover
        resp = await post(proxy, token, data=chunks())
        assert resp.status == 200
        assert echo.last.body == payload
        assert echo.last.headers["Content-Length"] == str(len(payload))
        if logs.events("upstream_failover"):
            break
    [failover] = logs.events("upstream_failover")
    assert failover["server"] == down
    assert access_lines(logs)[-1]["upstream"] == live
    assert state_of(proxy, "a", down).passive_failures == 1


async def test_partly_sent_body_is_never_replayed(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    raw_servers: Callable[[int | None], Awaitable[tuple[RawServer, str]]],
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """An upstream that took the connection and part of the body, then reset: the request
    may have had effects there, so it must not go to another server, although proxyd holds
    the whole body and could replay it. The other server gets nothing, the client a 502."""
    echo = Echo()
    resetter, reset_url = await raw_servers(100_000)  # > 64 KiB of body, then RST
    live = await upstreams.start(echo.app())
    health = {**NO_ACTIVE, "passive_failures": NEVER_EJECT}
    doc = doc_with_health(issuer, {"a": [reset_url, live]}, tmp_path, health)
    proxy = await make_proxy(doc)
    token = issuer.token(clock.wall())
    payload = padded_rpc(512 * 1024, seed=6)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 16384):
            yield payload[i : i + 16384]

    resets = 0
    for _ in range(20):  # the seeded choice decides the order; loop until both were hit
        before_reset, before_echo = resetter.connections, len(echo.seen)
        # The client's whole body is read before any attempt: it always gets a clean answer.
        resp = await post(proxy, token, data=chunks())
        if resetter.connections > before_reset:
            resets += 1
            assert resetter.connections == before_reset + 1
            assert resetter.received[-1] >= 100_000  # part of the body reached it
            assert len(echo.seen) == before_echo, "the request was replayed elsewhere"
            await rpc_error(resp, 502)
        else:
            assert resp.status == 200
            assert echo.last.body == payload
        if resets and echo.seen:
            break
    assert resets, "the resetting server was never picked"
    assert echo.seen, "the live server was never picked"
    assert logs.events("upstream_failover") == []
    # The reset counts as a passive failure of that server, one per request.
    assert state_of(proxy, "a", reset_url).passive_failures == resets
    reset_lines = [line for line in access_lines(logs) if line.get("upstream") == reset_url]
    assert len(reset_lines) == resets
    assert all(line["status"] == 502 for line in reset_lines)


# --------------------------------------------------------------------------------------------
# Active checks


async def test_tcp_check_marks_a_stopped_server_and_brings_it_back(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """DONE-WHEN: one of two down → every new session succeeds; the active checker marks the
    dead one unhealthy, new work avoids it, and it comes back when it recovers."""
    async with upstream_server(name="a") as flaky, upstream_server(name="b") as steady:
        health = {**FAST_TCP, "passive_failures": NEVER_EJECT}
        proxy = await make_proxy(
            doc_with_health(issuer, {"a": [flaky.url, steady.url]}, tmp_path, health)
        )
        book = book_of(proxy)
        url = str(proxy.make_url("/mcp/apps/a"))
        token = issuer.token(clock.wall())
        flaky_state = state_of(proxy, "a", flaky.url)
        await until_book(book, lambda: flaky_state.ok_streak >= 1)

        await flaky.stop()
        await until_book(book, lambda: not flaky_state.healthy)
        assert transitions(logs, flaky.url) == [("healthy", "unhealthy", "ConnectionRefusedError")]
        assert flaky_state.fail_streak >= 2
        # New work avoids it: no session even tries it (no failover, no passive failure).
        for mode in [LEGACY, MODERN] * 3:
            assert all(s < 400 for s in await session_ok(url, token, mode))
        assert logs.events("upstream_failover") == []
        assert flaky_state.passive_failures == 0
        # With the other one down too: nothing is available, so 503 (nothing is tried).
        await steady.stop()
        steady_state = state_of(proxy, "a", steady.url)
        await until_book(book, lambda: not steady_state.healthy)
        await rpc_error(await post(proxy, token), 503)

        await flaky.start()  # the same port
        await until_book(book, lambda: flaky_state.healthy)
        assert transitions(logs, flaky.url)[-1] == ("unhealthy", "healthy", "check_passed")
        assert flaky_state.ok_streak >= 2
        # It takes new work again: the only available server now.
        assert all(s < 400 for s in await session_ok(url, token, LEGACY))
        assert len(flaky.calls) == 1


async def test_http_check_thresholds_are_counted_exactly(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    probed = Probed(status=200)
    server = await upstreams.start(probed.app())
    health = {
        "type": "http",
        "path": "/healthz",
        "interval": "100ms",
        "timeout": "100ms",
        "unhealthy_threshold": 3,
        "healthy_threshold": 2,
    }
    proxy = await make_proxy(doc_with_health(issuer, {"a": [server]}, tmp_path, health))
    book = book_of(proxy)
    state = state_of(proxy, "a", server)
    probed.view = lambda: state
    token = issuer.token(clock.wall())
    await until_book(book, lambda: len(probed.answered(200)) >= 1)
    assert state.healthy

    probed.status = 503
    await until_book(book, lambda: len(probed.answered(503)) >= 4)
    # Probes 1-3 found it healthy; their three failures made it unhealthy for probe 4.
    assert [p.healthy_before for p in probed.answered(503)[:4]] == [True, True, True, False]
    assert transitions(logs, server) == [("healthy", "unhealthy", "http_503")]
    # Unhealthy: new work is not sent there at all.
    await rpc_error(await post(proxy, token), 503)
    assert probed.mcp_hits == 0

    probed.status = 200
    await until_book(book, lambda: len(probed.since_last(503)) >= 3)
    # Two successes are needed: probes 1-2 after the flip still found it unhealthy.
    assert [p.healthy_before for p in probed.since_last(503)[:3]] == [False, False, True]
    assert transitions(logs, server)[-1] == ("unhealthy", "healthy", "check_passed")
    assert (await post(proxy, token)).status == 200
    assert probed.mcp_hits == 1
    assert {(p.method, p.path) for p in probed.probes} == {("GET", "/healthz")}


async def test_http_check_method_path_query_and_expected_statuses(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    probed = Probed(status=200, path="/ready")
    server = await upstreams.start(probed.app())
    health = {
        "type": "http",
        "path": "/ready?deep=1",
        "method": "head",
        "expected_statuses": [204, 299],
        "interval": "100ms",
        "timeout": "100ms",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
    }
    proxy = await make_proxy(doc_with_health(issuer, {"a": [server]}, tmp_path, health))
    book = book_of(proxy)
    state = state_of(proxy, "a", server)
    # 200 is not among the expected statuses: unhealthy.
    await until_book(book, lambda: not state.healthy)
    assert transitions(logs, server) == [("healthy", "unhealthy", "http_200")]
    probed.status = 299
    await until_book(book, lambda: state.healthy)
    assert transitions(logs, server)[-1] == ("unhealthy", "healthy", "check_passed")
    # The configured method, path and query reached the upstream, unaltered.
    assert {(p.method, p.path, p.query) for p in probed.probes} == {("HEAD", "/ready", "deep=1")}


async def test_http_check_that_never_answers_times_out(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    probed = Probed(hang=True)
    server = await upstreams.start(probed.app())
    health = {
        "type": "http",
        "path": "/healthz",
        "interval": "50ms",
        "timeout": "20ms",
        "unhealthy_threshold": 1,
    }
    proxy = await make_proxy(doc_with_health(issuer, {"a": [server]}, tmp_path, health))
    state = state_of(proxy, "a", server)
    await until_book(book_of(proxy), lambda: not state.healthy)
    assert transitions(logs, server) == [("healthy", "unhealthy", "timeout")]


async def test_tcp_check_of_a_listening_port_that_is_no_http_server(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    raw_servers: Callable[[int | None], Awaitable[tuple[RawServer, str]]],
    clock: FakeClock,
    tmp_path: Path,
    dead: Callable[[], str],
    logs: LogCapture,
) -> None:
    """tcp only connects: a port that accepts is healthy, a refusing one is not."""
    counter, listening = await raw_servers(None)
    refusing = dead()
    health = {**FAST_TCP, "unhealthy_threshold": 1}
    proxy = await make_proxy(
        doc_with_health(issuer, {"a": [listening, refusing]}, tmp_path, health)
    )
    book = book_of(proxy)
    await until_book(book, lambda: counter.connections >= 3 and not book.available("a", refusing))
    assert book.available("a", listening)
    assert health_events(logs, listening) == []
    assert counter.received == [0] * len(counter.received)  # connect only: not a byte sent


async def test_type_none_never_probes(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    raw_servers: Callable[[int | None], Awaitable[tuple[RawServer, str]]],
    clock: FakeClock,
    tmp_path: Path,
    dead: Callable[[], str],
) -> None:
    probed = Probed(status=200)
    watched = await upstreams.start(probed.app())
    counter, unwatched = await raw_servers(None)
    refusing = dead()
    doc = config(issuer, {"p": watched, "n": [unwatched, refusing]}, tmp_path)
    doc["apps"][0]["health_check"] = {
        "type": "http",
        "path": "/healthz",
        "interval": "20ms",
        "timeout": "20ms",
    }
    doc["apps"][1]["health_check"] = {"type": "none", "interval": "20ms", "timeout": "20ms"}
    proxy = await make_proxy(doc)
    book = book_of(proxy)
    # While the checked app got several probes, the unchecked one got not one connection.
    await until_book(book, lambda: len(probed.probes) >= 5)
    assert counter.connections == 0
    for server in (unwatched, refusing):
        state = state_of(proxy, "n", server)
        assert (state.ok_streak, state.fail_streak) == (0, 0)
        assert book.available("n", server)  # a refusing one too: nobody looked


# --------------------------------------------------------------------------------------------
# Passive checks (fake clock)


async def test_passive_ejection_doubles_up_to_max_and_a_success_resets(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    flaky = Flaky(status=500)
    server = await upstreams.start(flaky.app())
    health = {**NO_ACTIVE, "passive_failures": 2, "ejection": "10s", "max_ejection": "35s"}
    proxy = await make_proxy(doc_with_health(issuer, {"a": [server]}, tmp_path, health))
    token = issuer.token(clock.wall())

    async def status() -> int:
        return (await post(proxy, token)).status

    # Failures must be consecutive: a success in between starts the count again.
    assert await status() == 500
    flaky.status = 200
    assert await status() == 200
    flaky.status = 500
    assert await status() == 500
    assert ejections(logs, server) == []

    async def eject_and_wait(cooldown: float) -> None:
        hits = flaky.hits
        assert await status() == 500  # the second failure in a row: ejected
        assert ejections(logs, server)[-1] == cooldown
        # Not picked during the cool-down (503, the upstream sees nothing) ...
        assert await status() == 503
        clock.advance(cooldown - 0.5)
        assert await status() == 503
        assert flaky.hits == hits + 1
        # ... picked again right after it.
        clock.advance(0.5)
        assert await status() == 500
        assert flaky.hits == hits + 2

    await eject_and_wait(10)
    await eject_and_wait(20)
    await eject_and_wait(35)  # 40 capped at max_ejection
    await eject_and_wait(35)
    # One success resets the doubling: the next ejection is the base one again.
    flaky.status = 200
    assert await status() == 200
    flaky.status = 500
    assert await status() == 500
    await eject_and_wait(10)
    assert ejections(logs, server) == [10, 20, 35, 35, 10]
    assert all(e["reason"] == "http_5xx" for e in logs.events("upstream_ejected"))


async def test_ejected_server_gets_no_new_work_until_the_cool_down_ends(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    flaky, echo = Flaky(status=503), Echo()
    bad = await upstreams.start(flaky.app())
    good = await upstreams.start(echo.app())
    health = {**NO_ACTIVE, "passive_failures": 1, "ejection": "10s"}
    proxy = await make_proxy(doc_with_health(issuer, {"a": [bad, good]}, tmp_path, health))
    token = issuer.token(clock.wall())
    for _ in range(30):  # the seeded choice decides when the bad one is picked
        resp = await post(proxy, token)
        if flaky.hits:
            assert resp.status == 503  # the upstream's own 5xx, passed through
            break
        assert resp.status == 200
    assert flaky.hits == 1 and ejections(logs, bad) == [10]
    for _ in range(20):
        assert (await post(proxy, token)).status == 200
    assert flaky.hits == 1
    clock.advance(10)
    for _ in range(30):
        await post(proxy, token)
        if flaky.hits > 1:
            break
    assert flaky.hits == 2, "the server was not picked again after its cool-down"


async def test_failures_of_requests_in_flight_do_not_prolong_an_ejection(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """Requests sent before the ejection and failing after it report the same outage: they
    must not eject again (Envoy skips hosts already ejected), or the cool-down would grow
    with the concurrency (here 10 s → 40 s) instead of with consecutive ejections."""
    gate = asyncio.Event()
    flaky = Flaky(status=500, gate=gate, expect=3)
    server = await upstreams.start(flaky.app())
    health = {**NO_ACTIVE, "passive_failures": 1, "ejection": "10s", "max_ejection": "5m"}
    proxy = await make_proxy(doc_with_health(issuer, {"a": [server]}, tmp_path, health))
    token = issuer.token(clock.wall())
    requests = [asyncio.ensure_future(post(proxy, token)) for _ in range(3)]
    await asyncio.wait_for(flaky.all_in.wait(), GUARD)  # all three in before any answer
    gate.set()
    assert [r.status for r in await asyncio.gather(*requests)] == [500, 500, 500]
    assert ejections(logs, server) == [10]
    flaky.gate, flaky.status = None, 200
    assert (await post(proxy, token)).status == 503
    clock.advance(10)
    assert (await post(proxy, token)).status == 200


async def test_upstream_reset_counts_as_a_passive_failure(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    raw_servers: Callable[[int | None], Awaitable[tuple[RawServer, str]]],
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    resetter, server = await raw_servers(1)  # resets as soon as the request starts arriving
    health = {**NO_ACTIVE, "passive_failures": 2, "ejection": "10s"}
    proxy = await make_proxy(doc_with_health(issuer, {"a": [server]}, tmp_path, health))
    token = issuer.token(clock.wall())
    await rpc_error(await post(proxy, token), 502)
    assert ejections(logs, server) == []
    await rpc_error(await post(proxy, token), 502)
    assert ejections(logs, server) == [10]
    await rpc_error(await post(proxy, token), 503)
    assert resetter.connections == 2


# --------------------------------------------------------------------------------------------
# Logs of every change


def book_for(clock: FakeClock, **health: Any) -> tuple[HealthBook, ServerHealth]:
    settings = HealthCheckSettings(**health)
    book = HealthBook([AppSettings("a", {}, ("http://up:1/mcp",), settings)], clock.monotonic)
    state = book.get("a", "http://up:1/mcp")
    assert state is not None
    return book, state


async def test_every_change_is_logged_as_one_chain(clock: FakeClock, logs: LogCapture) -> None:
    server = "http://up:1/mcp"
    book, state = book_for(
        clock,
        passive_failures=1,
        ejection=10.0,
        unhealthy_threshold=2,
        healthy_threshold=1,
    )
    changed = book.changed
    book.passive_failure("a", server, "http_5xx")
    assert changed.is_set() and book.changed is not changed
    assert not book.available("a", server)
    clock.advance(10)
    assert book.available("a", server)  # the cool-down ended: a change of state too
    book.active_result(state, False, "ConnectionRefusedError")
    book.active_result(state, False, "ConnectionRefusedError")
    book.passive_failure("a", server, "upstream_unreachable")  # unhealthy already: no change
    book.active_result(state, True, "check_passed")
    book.passive_failure("a", server, "upstream_reset")
    book.active_result(state, False, "timeout")
    book.active_result(state, False, "timeout")  # ejected, now unhealthy as well
    book.active_result(state, True, "check_passed")  # back, ejection forgotten
    assert book.available("a", server)
    events = health_events(logs)
    assert all(e["app"] == "a" and e["server"] == server for e in events)
    assert all(e["level"] == "warning" for e in events)
    assert transitions(logs, server) == [
        ("healthy", "ejected", "http_5xx"),
        ("ejected", "healthy", "ejection_expired"),
        ("healthy", "unhealthy", "ConnectionRefusedError"),
        ("unhealthy", "healthy", "check_passed"),
        ("healthy", "ejected", "upstream_reset"),
        ("ejected", "unhealthy", "timeout"),
        ("unhealthy", "healthy", "check_passed"),
    ]
    # A chain: each change starts where the previous one ended.
    chain = transitions(logs, server)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chain))


async def test_thresholds_count_consecutive_results(clock: FakeClock, logs: LogCapture) -> None:
    book, state = book_for(clock, unhealthy_threshold=3, healthy_threshold=2)
    for ok in (False, False, True, False, False):  # a success breaks the streak
        book.active_result(state, ok, "r")
    assert state.healthy
    book.active_result(state, False, "r")
    assert not state.healthy
    for ok in (True, False, True):
        book.active_result(state, ok, "r")
    assert not state.healthy
    book.active_result(state, True, "r")
    assert state.healthy
    assert [(e["from"], e["to"]) for e in health_events(logs)] == [
        ("healthy", "unhealthy"),
        ("unhealthy", "healthy"),
    ]


# --------------------------------------------------------------------------------------------
# Configuration


def minimal(health: Mapping[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "apps": [
            {
                "name": "a",
                "labels": {"env": "prod"},
                "servers": ["http://10.0.0.1/mcp"],
                "health_check": dict(health),
            }
        ],
        "app_auth_configs": [
            {
                "name": "corp",
                "app_labels": {"env": "prod"},
                "jwt": {
                    "issuer": "https://idp.example.com",
                    "audience": "proxyd",
                    "jwks_url": "https://idp.example.com/jwks.json",
                },
            }
        ],
        **sections,
    }


def test_health_check_keys_parse() -> None:
    settings = parse_settings(
        minimal(
            {
                "type": "http",
                "path": "/healthz",
                "method": "head",
                "expected_statuses": [200, 204],
                "interval": "5s",
                "timeout": "1500ms",
                "healthy_threshold": 4,
                "unhealthy_threshold": 5,
                "passive_failures": 6,
                "ejection": "30s",
                "max_ejection": "10m",
            },
            upstream={"max_attempts": 4},
        )
    )
    assert settings.apps[0].health_check == HealthCheckSettings(
        type="http",
        path="/healthz",
        method="HEAD",
        expected_statuses=frozenset({200, 204}),
        interval=5.0,
        timeout=1.5,
        healthy_threshold=4,
        unhealthy_threshold=5,
        passive_failures=6,
        ejection=30.0,
        max_ejection=600.0,
    )
    assert settings.upstream.max_attempts == 4
    defaults = parse_settings(minimal({}))
    assert defaults.apps[0].health_check == HealthCheckSettings()
    assert defaults.upstream == UpstreamSettings()


def test_bad_health_check_values_are_all_reported_with_key_paths() -> None:
    doc = minimal(
        {
            "type": "grpc",
            "path": "healthz",
            "expected_statuses": [200, 700, True],
            "interval": "1s",
            "timeout": "5s",
            "healthy_threshold": 0,
            "unhealthy_threshold": -1,
            "passive_failures": "3",
            "ejection": "10m",
            "max_ejection": "5m",
            "bogus": 1,
        },
        upstream={"max_attempts": 0},
    )
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    h = "apps[0].health_check"
    assert sorted(exc.value.problems) == sorted(
        [
            "upstream.max_attempts: expected a positive integer",
            f"{h}.type: one of tcp, http, none",
            f"{h}.path: must start with /",
            f"{h}.expected_statuses[1]: expected an HTTP status code (100-599)",
            f"{h}.expected_statuses[2]: expected an HTTP status code (100-599)",
            f"{h}.healthy_threshold: expected a positive integer",
            f"{h}.unhealthy_threshold: expected a positive integer",
            f"{h}.passive_failures: expected a positive integer",
            f"{h}.timeout: must not exceed interval",
            f"{h}.ejection: must not exceed max_ejection",
            f"{h}.bogus: unknown key",
        ]
    )


@pytest.mark.parametrize(
    ("health", "problem"),
    [
        ({"expected_statuses": []}, "expected_statuses: at least one status"),
        ({"expected_statuses": [99]}, "expected_statuses[0]: expected an HTTP status code"),
        ({"interval": "0s"}, "interval: must be greater than zero"),
        ({"timeout": "soon"}, "timeout: not a duration"),
        ({"method": " "}, "method: must not be empty"),
        ({"type": 1}, "type: expected a string"),
    ],
)
def test_each_bad_health_check_value(health: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_settings(minimal(health))
    [reported] = exc.value.problems
    assert reported.startswith(f"apps[0].health_check.{problem}")


def test_defaults_follow_what_the_user_wrote() -> None:
    """interval alone lowers the default timeout; ejection alone raises the default cap."""
    from proxyd.config import HealthCheckSettings as Defaults
    from proxyd.config import parse_settings

    doc = {
        "apps": [
            {
                "name": "a",
                "servers": ["http://127.0.0.1:1/mcp"],
                "health_check": {"interval": "1s", "ejection": "10m"},
            }
        ]
    }
    health = parse_settings(doc).apps[0].health_check
    assert health.interval == 1.0 and health.timeout == 1.0 < Defaults().timeout
    assert health.ejection == 600.0 == health.max_ejection > Defaults().max_ejection
