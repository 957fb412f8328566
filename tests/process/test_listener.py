"""The MCP listener's connection hygiene (issue 10, proxyd/listener.py) against a REAL daemon.

`python -m proxyd run -c FILE` as a child process (tests/kit/daemon.py), spoken to
over raw sockets where the bytes matter: slowloris clients trickling a head, a keep-alive
connection trickling its next head, streams and slow requests that must not be cut, the
connection cap, heads over aiohttp's parser ceilings (431, not 400) and the keep-alive timeout.

Time is real here, so the timeouts in the configs are short, and every wait is on a condition
(a closed connection, a scrape, a log line) bounded by GUARD. Where "longer than the header
timeout" must be shown, a canary connection trickling a head is opened after the subject: once
proxyd has cut the canary, the header timeout has run out for the subject too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxyd.config import ServerSettings
from proxyd.listener import Listener, ListenerSite
from tests.kit.daemon import (
    SSE,
    Daemon,
    Launch,
    Upstream,
    open_stream,
    post,
    proxyd_config,
    rpc,
    scrape,
    start_upstream,
    write_config,
)
from tests.kit.echo import Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import bearer
from tests.kit.wait import GUARD, until

HEADER_TIMEOUT = 1.0  # short: time is real here
PACE = 0.1  # a slowloris sends a byte this often: ten times within the header timeout
ATTACKERS = 50


async def start_proxyd(
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    tmp_path: Path,
    **server: Any,
) -> tuple[Daemon, Upstream]:
    upstream, url = await start_upstream(upstreams)
    doc = proxyd_config(issuer, tmp_path, {"a": [url]}, server=server)
    return await launch(write_config(tmp_path / "proxyd.toml", doc)), upstream


# --------------------------------------------------------------------------------------------
# Raw HTTP/1.1 over a socket


def request_head(token: str | None, body: bytes, **extra: str) -> bytes:
    headers = {
        "Host": "proxyd.test",
        "Content-Type": "application/json",
        "Accept": f"application/json, {SSE}",
        "Content-Length": str(len(body)),
        **(bearer(token) if token else {}),
        **extra,
    }
    lines = ["POST /mcp/apps/a HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ping(token: str | None, **extra: str) -> bytes:
    body = json.dumps(rpc()).encode()
    return request_head(token, body, **extra) + body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return doc


class Raw:
    """One client connection to proxyd, written and read byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), GUARD)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """False when proxyd has closed the connection already."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def answer(self) -> Answer:
        async def read() -> Answer:
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            headers: dict[str, str] = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                    body += await self.reader.readexactly(size + 2)
                    body = body[:-2]
                await self.reader.readuntil(b"\r\n")
            else:
                body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            return Answer(int(status_line.split()[1]), headers, body)

        return await asyncio.wait_for(read(), GUARD)

    async def closed(self, within: float = GUARD) -> bytes:
        """Wait until proxyd closes the connection; whatever it sent before (b"" = nothing)."""
        try:
            return await asyncio.wait_for(self.reader.read(), within)
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        self.writer.close()


@dataclass
class Trickled:
    sent: int  # bytes sent before proxyd closed the connection
    seconds: float  # from connecting to the close
    answer: bytes  # what proxyd wrote before closing (nothing, for a cut head)


async def trickle(conn: Raw, started: asyncio.Event | None = None) -> Trickled:
    """Send a head that never ends, one byte every PACE, until proxyd closes the connection."""
    head = b"POST /mcp/apps/a HTTP/1.1\r\nHost: proxyd.test\r\nX-Slow: "
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < GUARD:
        byte = head[sent : sent + 1] or b"a"
        if not await conn.send(byte):
            return Trickled(sent, time.monotonic() - t0, b"")
        sent += 1
        if started is not None:
            started.set()
        try:
            # The pace of the trickle, and the watch for proxyd's close.
            data = await asyncio.wait_for(conn.reader.read(1024), PACE)
        except TimeoutError:
            continue
        except ConnectionResetError:
            data = b""
        if not data:
            return Trickled(sent, time.monotonic() - t0, b"")
        return Trickled(sent, time.monotonic() - t0, data + await conn.closed())
    raise AssertionError(f"a trickled head was not cut within {GUARD}s ({sent} bytes sent)")


async def canary(port: int) -> Trickled:
    """A new connection trickling a head, until proxyd cuts it: proof that the header
    timeout has run out for everything started before it."""
    conn = await Raw.open(port)
    try:
        return await trickle(conn)
    finally:
        conn.close()


def assert_cut(t: Trickled, timeout: float = HEADER_TIMEOUT) -> None:
    assert t.answer == b"", f"proxyd answered a head that never ended: {t.answer[:200]!r}"
    # Bytes kept coming well within the timeout; they never extended it.
    assert t.sent >= 3, t
    # Never before the timeout (proxyd's timer starts at accept, after the client connected).
    assert t.seconds >= timeout * 0.9, t


# --------------------------------------------------------------------------------------------
# (a) slowloris


async def test_slowloris_connections_are_cut_after_header_timeout_while_clients_are_served(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    # Longer than elsewhere: the normal client must get answers while every attacker is
    # still connected, on a machine that may be busy.
    timeout = 2 * HEADER_TIMEOUT
    proxyd, _ = await start_proxyd(
        issuer, launch, upstreams, tmp_path, header_timeout=f"{timeout}s"
    )
    token = issuer.token(time.time())
    async with aiohttp.ClientSession() as http:
        m0 = await scrape(http, proxyd)
        assert m0.types["proxyd_open_connections"] == "gauge"
        assert m0.types["proxyd_connections_refused"] == "counter"
        assert m0.value("proxyd_connections_closed_total", reason="header_timeout") == 0
        # An established client (its session verified and cached) before the attack starts.
        assert (await post(http, proxyd.url("a"), token))[0] == 200

        conns = [await Raw.open(proxyd.port) for _ in range(ATTACKERS)]
        started = [asyncio.Event() for _ in conns]
        attack = [
            asyncio.create_task(trickle(c, started=s)) for c, s in zip(conns, started, strict=True)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), GUARD)

            async def all_accepted() -> bool:
                # A client's connect returns once the kernel has the connection; proxyd may
                # not have accepted it yet: wait for it, never assume it.
                during = await scrape(http, proxyd)
                return during.value("proxyd_open_connections") >= ATTACKERS

            await until(all_accepted, what="every attacker's connection accepted", every=0)
            # A normal client, while every attacker holds its connection open.
            served_during_attack = 0
            while not all(t.done() for t in attack):
                status, body = await post(http, proxyd.url("a"), token)
                assert (status, body["result"]) == (200, {}), body
                if not any(t.done() for t in attack):
                    served_during_attack += 1
            cut = await asyncio.gather(*attack)
        finally:
            for conn in conns:
                conn.close()
        assert served_during_attack >= 1, "no answer while the attack was in progress"
        for t in cut:
            assert_cut(t, timeout)
        # And after it, as before.
        assert (await post(http, proxyd.url("a"), token))[0] == 200

        async def counted() -> bool:
            m = await scrape(http, proxyd)
            return m.value("proxyd_connections_closed_total", reason="header_timeout") == ATTACKERS

        await until(counted, what="every cut counted")
        m = await scrape(http, proxyd)
        assert m.value("proxyd_connections_refused_total") == 0
        assert m.value("proxyd_open_connections") < ATTACKERS


# --------------------------------------------------------------------------------------------
# (b) a keep-alive connection: the next head is timed from its first byte


async def test_keepalive_connection_trickling_its_next_head_is_cut(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, _ = await start_proxyd(
        issuer,
        launch,
        upstreams,
        tmp_path,
        header_timeout=f"{HEADER_TIMEOUT}s",
        keepalive_timeout="30s",
    )
    token = issuer.token(time.time())
    conn = await Raw.open(proxyd.port)
    try:
        assert await conn.send(ping(token))
        first = await conn.answer()
        assert first.status == 200, first
        assert first.headers.get("connection", "").lower() != "close"
        # Idle longer than the header timeout: idleness is the keep-alive timeout's business.
        assert_cut(await canary(proxyd.port))
        assert await conn.send(ping(token))
        second = await conn.answer()
        assert second.status == 200, second
        # The third head trickles: cut, counted from its first byte.
        assert_cut(await trickle(conn))
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# (c) streams and requests in progress are not timed by the header timeout


async def test_streams_and_slow_requests_outlive_the_header_timeout(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, upstream = await start_proxyd(
        issuer, launch, upstreams, tmp_path, header_timeout=f"{HEADER_TIMEOUT}s"
    )
    token = issuer.token(time.time())
    url = proxyd.url("a")
    async with aiohttp.ClientSession() as http:
        # An SSE answer in progress.
        stream = await open_stream(http, url, token, upstream)
        await stream.relay("one")
        # A request the upstream takes long to answer.
        held = asyncio.create_task(post(http, url, token, "hold"))
        await asyncio.wait_for(upstream.holding.wait(), GUARD)
        # A request whose body arrives slowly (its head complete at once).
        body = json.dumps(rpc()).encode()
        slow = await Raw.open(proxyd.port)
        try:
            assert await slow.send(request_head(token, body) + body[:5])

            async def feed_body() -> None:
                for i in range(5, len(body)):
                    assert await slow.send(body[i : i + 1])
                    await asyncio.sleep(PACE)  # the pace of the upload, not a wait for a state

            feeding = asyncio.create_task(feed_body())
            # The header timeout runs out for everything above.
            assert_cut(await canary(proxyd.port))
            await stream.relay("two")
            upstream.release.set()
            status, answer = await asyncio.wait_for(held, GUARD)
            assert status == 200 and isinstance(answer["result"], str), answer
            await asyncio.wait_for(feeding, GUARD * 2)
            done = await slow.answer()
            assert done.status == 200, done
            assert done.json()["result"] == {}
        finally:
            slow.close()
        await stream.relay("three")
        assert await stream.finish() == b""
        stream.resp.close()
        m = await scrape(http, proxyd)
        assert m.value("proxyd_connections_closed_total", reason="header_timeout") == 1


# --------------------------------------------------------------------------------------------
# (d) max_connections


async def test_connections_above_max_connections_are_closed_at_accept_and_counted(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    # Timeouts far above GUARD: any close seen here is the cap's.
    proxyd, _ = await start_proxyd(
        issuer,
        launch,
        upstreams,
        tmp_path,
        max_connections=5,
        header_timeout="60s",
        keepalive_timeout="60s",
    )
    token = issuer.token(time.time())
    served = [await Raw.open(proxyd.port) for _ in range(5)]
    try:
        for conn in served:
            assert await conn.send(ping(token))
            assert (await conn.answer()).status == 200
        sixth = await Raw.open(proxyd.port)
        try:
            # Closed without a byte sent either way: not queued, not served.
            assert await sixth.closed() == b""
            await sixth.send(ping(token))  # a write into a closed connection may still succeed
            assert await sixth.closed() == b""
        finally:
            sixth.close()
        async with aiohttp.ClientSession() as http:
            # (The admin listener is not capped: these scrapes are answered meanwhile.)
            m = await scrape(http, proxyd)
            assert m.value("proxyd_connections_refused_total") == 1
            assert m.value("proxyd_open_connections") == 5
            warning = await proxyd.wait_for("connections_refused")
            assert warning["max_connections"] == 5
            # The ones open keep working.
            assert await served[0].send(ping(token))
            assert (await served[0].answer()).status == 200

            served.pop().close()

            async def four_open() -> bool:
                return (await scrape(http, proxyd)).value("proxyd_open_connections") == 4

            await until(four_open, what="the closed connection released")
            again = await Raw.open(proxyd.port)
            served.append(again)
            assert await again.send(ping(token))
            assert (await again.answer()).status == 200
            m = await scrape(http, proxyd)
            assert m.value("proxyd_connections_refused_total") == 1
    finally:
        for conn in served:
            conn.close()


async def test_a_reload_applies_a_new_cap_to_the_next_connections(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    _, url = await start_upstream(upstreams)
    server: dict[str, Any] = {"max_connections": 2, "header_timeout": "60s"}
    doc = proxyd_config(issuer, tmp_path, {"a": [url]}, server=server)
    path = write_config(tmp_path / "proxyd.toml", doc)
    proxyd = await launch(path)
    token = issuer.token(time.time())
    conns = [await Raw.open(proxyd.port) for _ in range(2)]
    try:
        for conn in conns:
            assert await conn.send(ping(token))
            assert (await conn.answer()).status == 200
        refused = await Raw.open(proxyd.port)
        assert await refused.closed() == b""
        refused.close()

        doc["server"]["max_connections"] = 3
        write_config(path, doc)
        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        await proxyd.wait_for("config_reloaded", since=mark)
        assert proxyd.find("config_change_needs_restart", since=mark) == []
        conns.append(await Raw.open(proxyd.port))
        assert await conns[-1].send(ping(token))
        assert (await conns[-1].answer()).status == 200
        fourth = await Raw.open(proxyd.port)
        assert await fourth.closed() == b""
        fourth.close()
    finally:
        for conn in conns:
            conn.close()


# --------------------------------------------------------------------------------------------
# (e) heads over any header limit: 431 with proxyd's JSON-RPC error body


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({f"X-Pad-{i}": "v" for i in range(200)}, id="200-small-headers"),
        pytest.param({"X-Huge": "h" * (100 * 1024)}, id="one-100KiB-line"),
        pytest.param({"X-Big": "b" * (40 * 1024)}, id="over-max_header_size"),
    ],
)
async def test_heads_over_any_header_limit_get_431_with_a_json_rpc_body(
    extra: dict[str, str],
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    tmp_path: Path,
) -> None:
    proxyd, upstream = await start_proxyd(issuer, launch, upstreams, tmp_path)
    token = issuer.token(time.time())
    conn = await Raw.open(proxyd.port)
    try:
        assert await conn.send(ping(token, **extra))
        answer = await conn.answer()
    finally:
        conn.close()
    assert answer.status == 431, answer
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["jsonrpc"] == "2.0" and body["id"] is None
    assert body["error"]["data"] == {"status": 431, "reason": "headers_too_large"}
    assert upstream.calls == 0
    # Normal heads are still answered, and the connection's 431 was not a crash.
    async with aiohttp.ClientSession() as http:
        assert (await post(http, proxyd.url("a"), token))[0] == 200
    assert "Error handling request" not in proxyd.stderr.decode(errors="replace")


async def test_a_head_longer_than_any_valid_one_is_answered_431_before_it_ends(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    # Lines of 60 KiB, each under aiohttp's field ceiling (64 KiB), fewer than its 128: its
    # parser alone would buffer 7 MiB of them and answer nothing until the head ended.
    proxyd, upstream = await start_proxyd(issuer, launch, upstreams, tmp_path)
    lines = 120
    conn = await Raw.open(proxyd.port)
    reading = asyncio.create_task(conn.answer())
    try:
        assert await conn.send(b"POST /mcp/apps/a HTTP/1.1\r\nHost: proxyd.test\r\n")
        sent = 0
        while sent < lines and not reading.done():
            if not await conn.send(b"X-Pad-%d: " % sent + b"p" * (60 * 1024) + b"\r\n"):
                break
            sent += 1
            await asyncio.sleep(PACE / 10)  # the pace of the upload, not a wait for a state
        answer = await reading
        assert sent < lines, "answered only once the head was complete"
        assert await conn.closed() == b""  # nothing after the answer
    finally:
        reading.cancel()
        conn.close()
    assert answer.status == 431, answer
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert answer.json()["error"]["data"] == {"status": 431, "reason": "headers_too_large"}
    assert upstream.calls == 0
    async with aiohttp.ClientSession() as http:
        m = await scrape(http, proxyd)
        assert m.value("proxyd_connections_closed_total", reason="headers_too_large") == 1
        assert m.value("proxyd_connections_closed_total", reason="header_timeout") == 0
    line = await proxyd.wait_for("request_rejected")
    assert (line["status"], line["reason"]) == (431, "headers_too_large")


# --------------------------------------------------------------------------------------------
# (f) keepalive_timeout


async def test_keepalive_timeout_closes_an_idle_connection(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, _ = await start_proxyd(
        issuer, launch, upstreams, tmp_path, keepalive_timeout="1s", header_timeout="60s"
    )
    token = issuer.token(time.time())
    conn = await Raw.open(proxyd.port)
    try:
        assert await conn.send(ping(token))
        answered = await conn.answer()
        assert answered.status == 200
        idle_since = time.monotonic()
        assert await conn.closed() == b""
        assert time.monotonic() - idle_since >= 0.9  # idle, then closed; never at once
    finally:
        conn.close()
    async with aiohttp.ClientSession() as http:
        m = await scrape(http, proxyd)
        assert m.value("proxyd_connections_closed_total", reason="header_timeout") == 0


# --------------------------------------------------------------------------------------------
# The site on a socket bound elsewhere (as systemd socket activation will hand it over)


async def test_listener_site_serves_an_inherited_socket() -> None:
    app = web.Application()

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = ServerSettings(max_connections=1)
    site = ListenerSite(runner, Listener(lambda: settings), sock=sock)
    try:
        await site.start()
        assert site.name == f"http://127.0.0.1:{port}"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/") as resp,
        ):
            assert (resp.status, await resp.text()) == (200, "hello")
        with pytest.raises(ValueError, match="exactly one of port, path or sock"):
            ListenerSite(runner, Listener(lambda: settings), port=1, path="/x")
    finally:
        await runner.cleanup()
        with contextlib.suppress(OSError):
            sock.close()


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Type: application/json\r\nContent-Type: application/json; charset=utf-7\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"X-Bad\x01: v\r\n",
    ],
    ids=["two-content-types", "two-lengths", "te-and-cl", "control-char"],
)
async def test_a_malformed_request_is_400_without_a_traceback(
    head: bytes, issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    """aiohttp answered these with a plain-text 400 and logged a traceback at error level:
    any client could flood the log. Now one info line, a JSON-RPC body, and the token the
    client sent appears nowhere."""
    proxyd, upstream = await start_proxyd(issuer, launch, upstreams, tmp_path)
    token = issuer.token(time.time())
    conn = await Raw.open(proxyd.port)
    try:
        request = (
            b"POST /mcp/apps/a HTTP/1.1\r\nHost: proxyd.test\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\n"
            + head
            + b"\r\n{}"
        )
        assert await conn.send(request)
        answer = await conn.answer()
    finally:
        conn.close()
    assert answer.status == 400, answer
    assert answer.json()["error"]["data"] == {"status": 400, "reason": "malformed_request"}
    assert upstream.calls == 0
    line = await proxyd.wait_for("request_rejected", reason="malformed_request")
    assert line["level"] == "info"
    output = json.dumps(proxyd.lines) + proxyd.stderr.decode(errors="replace")
    assert "Error handling request" not in output and "Traceback" not in output
    assert token not in output
