"""proxyd's own upstream client (proxyd/upstream/) against real servers on 127.0.0.1.

Raw asyncio servers misbehave on purpose (close idle keep-alive connections, die mid-body,
send malformed or interim answers, huge heads, trailers, bodies ended by EOF); aiohttp servers
play honest upstreams. Nothing is mocked; no sleeps: every wait is on a condition, under a
guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxyd.errors import ConnectFailed, UpstreamError, UpstreamTimeout
from proxyd.upstream import HIGH_WATER, MAX_HEAD, Connection, Origin, UpstreamClient, request_head
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import RPC, access_lines, bearer, config, rpc_error
from tests.kit.wait import GUARD, until

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


# --------------------------------------------------------------------------------------------
# A raw upstream: one handler per connection, told what to answer


@dataclass
class Seen:
    head: bytes
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Seen | None:
    """One request (Content-Length or chunked body), or None at the connection's end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    fields = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
    }
    body = b""
    if b"content-length" in fields:
        body = await reader.readexactly(int(fields[b"content-length"]))
    elif fields.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return Seen(head, body)


Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Script = Callable[["RawUpstream", Reader, Writer], Awaitable[None]]


@dataclass
class RawUpstream:
    script: Script
    connections: int = 0  # accepted (proxyd's TCP health checks count too)
    requests: list[Seen] = field(default_factory=list)
    ended: int = 0  # connections that carried requests and then saw the client's close
    server: asyncio.Server | None = None
    talking: set[int] = field(default_factory=set)

    @property
    def used(self) -> int:
        """Connections that carried at least one request."""
        return len(self.talking)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        scheme = "https" if ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{port}/mcp"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: part of several tests
        finally:
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> Seen | None:
        seen = await read_request(reader)
        if seen is None:
            self.ended += id(reader) in self.talking
        else:
            self.talking.add(id(reader))
            self.requests.append(seen)
        return seen

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def answering(*answers: bytes, then_close: bool = False) -> Script:
    """Answer the n-th request (on any connection) with the n-th answer; the last repeats."""

    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        while await up.next_request(reader) is not None:
            w.write(answers[min(len(up.requests) - 1, len(answers) - 1)])
            await w.drain()
            if then_close:
                return

    return script


RawStart = Callable[[Script], Awaitable[tuple[RawUpstream, str]]]


@pytest.fixture
async def raw() -> AsyncIterator[RawStart]:
    started: list[RawUpstream] = []

    async def start(script: Script) -> tuple[RawUpstream, str]:
        up = RawUpstream(script)
        started.append(up)
        return up, await up.start()

    yield start
    for up in started:
        await up.close()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(keepalive_timeout=60.0, max_idle=8)
    yield c
    await c.close()


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    conn: Connection


async def exchange(
    client: UpstreamClient,
    url: str,
    body: bytes | None = b"{}",
    *,
    method: str = "POST",
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),),
    idle_timeout: float = GUARD,
) -> Answer:
    """One request the way proxyd.forward sends it, the answer read whole."""
    origin = client.origin(url)
    framing = f"Content-Length: {len(body)}\r\n" if body is not None else ""
    head = request_head(method, origin, "", headers, framing)
    conn = client.pooled(origin) or await client.connect(origin, GUARD)
    try:
        conn.send(head, body, idle_timeout)
        await conn.head()
        data = await conn.read_whole(1 << 26)
        assert data is not None
        return Answer(conn.status, conn.reason, list(conn.headers), data, conn)
    finally:
        conn.finish()


# --------------------------------------------------------------------------------------------
# The request as written


def test_request_head_is_exactly_what_was_asked() -> None:
    origin = Origin.parse("http://127.0.0.1:8080/a%2Fb/mcp")
    head = request_head(
        "POST",
        origin,
        "q=a%26b&flag",
        [("X-One", "1"), ("X-Multi", "a"), ("X-Multi", "b"), ("X-Raw", "caf\udcc3\udca9")],
        "Content-Length: 2\r\n",
    )
    assert head == (
        b"POST /a%2Fb/mcp?q=a%26b&flag HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"X-One: 1\r\nX-Multi: a\r\nX-Multi: b\r\nX-Raw: caf\xc3\xa9\r\n"
        b"Content-Length: 2\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("url", "host", "key"),
    [
        ("http://127.0.0.1/mcp", "127.0.0.1", "http://127.0.0.1"),
        ("http://h.example:80/mcp", "h.example", "http://h.example"),
        ("https://h.example/mcp", "h.example", "https://h.example"),
        ("https://h.example:8443/mcp", "h.example:8443", "https://h.example:8443"),
        ("http://[::1]:3001/mcp", "[::1]:3001", "http://[::1]:3001"),
    ],
)
def test_origin_host_header(url: str, host: str, key: str) -> None:
    origin = Origin.parse(url)
    assert origin.host_header == host
    assert origin.key == key
    assert origin.tls == url.startswith("https")


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
def test_line_breaks_in_fields_are_refused(value: str) -> None:
    origin = Origin.parse("http://127.0.0.1:1/mcp")
    with pytest.raises(UpstreamError, match="line break"):
        request_head("GET", origin, "", [("X-Value", value)], "")
    with pytest.raises(UpstreamError, match="line break"):
        request_head("GET", origin, "", [(f"X-{value}", "v")], "")


def test_head_is_never_sent() -> None:
    with pytest.raises(ValueError, match="HEAD"):
        request_head("HEAD", Origin.parse("http://127.0.0.1:1/mcp"), "", [], "")


# --------------------------------------------------------------------------------------------
# Keep-alive and the pool


async def test_keep_alive_connection_is_reused(raw: RawStart, client: UpstreamClient) -> None:
    up, url = await raw(answering(OK))
    for _ in range(3):
        answer = await exchange(client, url)
        assert (answer.status, answer.body) == (200, b"{}")
    assert up.connections == 1
    assert len(up.requests) == 3
    assert client.idle_connections(client.origin(url)) == 1


async def test_upstream_connections_send_without_nagle_delay(
    raw: RawStart, client: UpstreamClient
) -> None:
    # The loop sets TCP_NODELAY on its TCP transports; proxyd relies on it (connection_made).
    _, url = await raw(answering(OK))
    answer = await exchange(client, url)
    transport = answer.conn.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_upstream_connections_send_without_nagle_delay_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")  # proxyd's loop in production (process/loop.py)

    async def nodelay() -> int:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = UpstreamClient()
        try:
            conn = await client.connect(client.origin(f"http://127.0.0.1:{port}/mcp"), GUARD)
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            await client.close()
            server.close()

    assert uvloop.run(nodelay()) != 0


async def test_connection_closed_while_idle_is_never_used(
    raw: RawStart, client: UpstreamClient
) -> None:
    """The upstream closes an idle keep-alive connection (no Connection: close said): the
    close is noticed before anything is written, and the request goes on a fresh one."""
    up, url = await raw(answering(OK, then_close=True))
    first = await exchange(client, url)
    assert first.status == 200
    await until(lambda: client.idle_connections(client.origin(url)) == 0, every=0)
    second = await exchange(client, url)
    assert second.status == 200
    assert second.conn is not first.conn
    assert up.connections == 2
    assert len(up.requests) == 2  # each request sent exactly once


async def test_request_on_a_connection_that_breaks_after_writing_is_not_replayed(
    raw: RawStart, client: UpstreamClient
) -> None:
    """Once a request may have reached the upstream, a broken connection is a 502, never a
    second attempt (the upstream may have run the tool call)."""

    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        await up.next_request(reader)
        w.write(OK)
        await w.drain()
        await up.next_request(reader)  # read, maybe acted upon, never answered
        w.transport.abort()

    up, url = await raw(script)
    assert (await exchange(client, url)).status == 200
    with pytest.raises(UpstreamError) as caught:
        await exchange(client, url)
    assert not isinstance(caught.value, ConnectFailed)
    assert caught.value.status == 502
    assert len(up.requests) == 2
    assert up.connections == 1


async def test_broken_reused_connection_is_502_through_proxyd_and_not_replayed(
    raw: RawStart,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        await up.next_request(reader)
        w.write(OK)
        await w.drain()
        await up.next_request(reader)
        w.transport.abort()

    up, url = await raw(script)
    client = await make_proxy(config(issuer, {"a": url}, tmp_path))
    token = issuer.token(clock.wall())
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer(token)), 502)
    assert len(up.requests) == 2
    assert up.used == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",  # 1.0 without keep-alive
    ],
)
async def test_answer_that_closes_is_not_pooled(
    answer: bytes, raw: RawStart, client: UpstreamClient
) -> None:
    up, url = await raw(answering(answer, then_close=True))
    for _ in range(2):
        assert (await exchange(client, url)).body == b"{}"
        assert client.idle_connections(client.origin(url)) == 0
    assert up.connections == 2


async def test_http10_answer_with_transfer_encoding_is_not_pooled(
    raw: RawStart, client: UpstreamClient
) -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing (it may
    have passed a 1.0 hop that knew no chunked): close after it, whatever Connection says."""
    answer = (
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    up, url = await raw(answering(answer))
    for _ in range(2):
        assert (await exchange(client, url)).body == b"{}"
    assert up.connections == 2


async def test_idle_connection_that_speaks_is_dropped(
    raw: RawStart, client: UpstreamClient
) -> None:
    """Bytes on an idle connection (a 408 before a close, or junk) make it untrustworthy."""
    sent = asyncio.Event()

    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        await up.next_request(reader)
        w.write(OK)
        await w.drain()
        if up.connections == 1:
            w.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            await w.drain()
            sent.set()
        while await up.next_request(reader) is not None:
            w.write(OK)

    up, url = await raw(script)
    await exchange(client, url)
    await asyncio.wait_for(sent.wait(), GUARD)
    await until(lambda: client.idle_connections(client.origin(url)) == 0, every=0)
    assert (await exchange(client, url)).status == 200
    assert up.connections == 2


async def test_bytes_after_a_complete_answer_forbid_reuse(
    raw: RawStart, client: UpstreamClient
) -> None:
    up, url = await raw(answering(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    assert (await exchange(client, url)).body == b"{}"
    assert (await exchange(client, url)).body == b"{}"
    assert up.connections == 2


@pytest.mark.parametrize(
    "second",
    [
        b"HTTP/1.1 404 Not Found\r\nX-Second: 1\r\nContent-Length: 5\r\n\r\nEVIL!",
        b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nEVIL!\r\n0\r\n\r\n",
    ],
)
async def test_a_second_answer_never_leaks_into_the_first(
    second: bytes, raw: RawStart, client: UpstreamClient
) -> None:
    """A second answer to one request, in the same read as the first: its status, fields and
    body belong to no request (RFC 9112 §9.3: answers pair with requests in order), so none of
    them may reach the client as part of the first (response splitting)."""
    _, url = await raw(answering(OK + second))
    answer = await exchange(client, url)
    assert (answer.status, answer.reason, answer.body) == (200, "OK", b"{}")
    assert answer.headers == [("Content-Type", "application/json"), ("Content-Length", "2")]
    assert client.idle_connections(client.origin(url)) == 0


async def test_idle_connections_beyond_the_limit_are_closed(raw: RawStart) -> None:
    gate = asyncio.Event()

    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        while await up.next_request(reader) is not None:
            if len(up.requests) == 3:
                gate.set()
            await gate.wait()  # all three are open at once
            w.write(OK)
            await w.drain()

    up, url = await raw(script)
    client = UpstreamClient(keepalive_timeout=60.0, max_idle=1)
    try:
        answers = await asyncio.gather(*(exchange(client, url) for _ in range(3)))
        assert [a.status for a in answers] == [200, 200, 200]
        assert up.connections == 3  # open connections are never capped
        assert client.idle_connections(client.origin(url)) == 1
        await until(lambda: up.ended == 2, every=0)  # the other two were closed
    finally:
        await client.close()


async def test_idle_connections_expire(raw: RawStart) -> None:
    up, url = await raw(answering(OK))
    client = UpstreamClient(keepalive_timeout=0.05, max_idle=8)
    try:
        await exchange(client, url)
        await until(lambda: up.ended == 1, every=0)  # closed by the sweep, not by a request
        assert client.idle_connections(client.origin(url)) == 0
        assert client.open_connections == 0
    finally:
        await client.close()


async def test_connection_idle_too_long_is_not_reused(
    raw: RawStart, client: UpstreamClient
) -> None:
    up, url = await raw(answering(OK))
    first = await exchange(client, url)
    first.conn.idle_since -= 3600  # as if the sweep had not run yet
    second = await exchange(client, url)
    assert second.conn is not first.conn
    assert up.connections == 2
    await until(lambda: up.ended == 1, every=0)


async def test_close_closes_every_connection(raw: RawStart) -> None:
    gate = asyncio.Event()

    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        while await up.next_request(reader) is not None:
            if len(up.requests) >= 2:
                gate.set()
            await gate.wait()
            w.write(OK)

    up, url = await raw(script)
    client = UpstreamClient(keepalive_timeout=60.0, max_idle=8)
    await asyncio.gather(exchange(client, url), exchange(client, url))
    assert client.open_connections == 2
    await client.close()
    assert client.open_connections == 0
    await until(lambda: up.ended == 2, every=0)
    with pytest.raises(ConnectFailed):
        await client.connect(client.origin(url), GUARD)


async def test_cancelled_exchange_closes_its_connection(
    raw: RawStart, client: UpstreamClient
) -> None:
    """The client of proxyd left: the upstream connection is closed, never pooled."""
    asked = asyncio.Event()

    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        await up.next_request(reader)
        asked.set()
        await up.next_request(reader)  # no answer; the close arrives as an EOF

    up, url = await raw(script)
    task = asyncio.create_task(exchange(client, url))
    await asyncio.wait_for(asked.wait(), GUARD)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: up.ended == 1, every=0)
    assert client.idle_connections(client.origin(url)) == 0
    assert client.open_connections == 0


# --------------------------------------------------------------------------------------------
# Answers, well and badly formed


async def test_interim_answers_are_skipped(raw: RawStart, client: UpstreamClient) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    )
    final = b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\n{}"
    up, url = await raw(answering(interim + final))
    for _ in range(2):
        answer = await exchange(client, url)
        assert (answer.status, answer.reason, answer.body) == (201, "Created", b"{}")
        assert answer.headers == [("X-Final", "yes"), ("Content-Length", "2")]
    assert up.connections == 1


async def test_switching_protocols_is_an_error(raw: RawStart, client: UpstreamClient) -> None:
    _, url = await raw(answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"))
    with pytest.raises(UpstreamError, match="101"):
        await exchange(client, url)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"SPDY/9 what\r\n\r\n",
        # Status codes outside 100..599 are invalid (RFC 9110 §15); llhttp takes any 3 digits.
        b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_malformed_answers_are_502(
    answer: bytes, raw: RawStart, client: UpstreamClient
) -> None:
    _, url = await raw(answering(answer))
    with pytest.raises(UpstreamError) as caught:
        await exchange(client, url)
    assert caught.value.status == 502
    await until(lambda: client.open_connections == 0, every=0)


async def test_huge_answer_head_is_refused(raw: RawStart, client: UpstreamClient) -> None:
    def head(size: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * size + b"\r\nContent-Length: 2\r\n\r\n{}"

    endless = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 * MAX_HEAD)  # never ends
    _, url = await raw(answering(head(MAX_HEAD // 2), head(MAX_HEAD), endless))
    answer = await exchange(client, url)
    assert answer.status == 200
    assert dict(answer.headers)["X-Big"] == "a" * (MAX_HEAD // 2)
    for _ in range(2):
        with pytest.raises(UpstreamError, match="too big a header"):
            await exchange(client, url)


async def test_endless_trailer_is_refused(raw: RawStart, client: UpstreamClient) -> None:
    """A trailer section is fields too: httptools buffers a field until its end, so one that
    never ends must hit the head's limit, not grow in memory (and, still arriving, never let
    the idle timeout fire). (Bytes after the body in the read that ended it are not counted:
    the trailer here is longer than any one read.)"""
    endless = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: " + b"a" * (8 * MAX_HEAD)  # never ends
    )
    _, url = await raw(answering(endless))
    with pytest.raises(UpstreamError, match="too big a header"):
        await exchange(client, url)
    await until(lambda: client.open_connections == 0, every=0)


async def test_chunk_extensions_and_trailers(raw: RawStart, client: UpstreamClient) -> None:
    """Extensions are ignored, trailers dropped (RFC 9112 §7.1.2), and none of them leaks
    into the next answer on the same connection."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\nX-Trailer: one\r\nX-Last: two\r\n\r\n"
    )
    plain = b"HTTP/1.1 200 OK\r\nX-Next: 1\r\nContent-Length: 0\r\n\r\n"
    up, url = await raw(answering(chunked, plain))
    first = await exchange(client, url)
    assert first.body == b"hello world"
    assert first.headers == [("Transfer-Encoding", "chunked")]
    second = await exchange(client, url)
    assert second.headers == [("X-Next", "1"), ("Content-Length", "0")]
    assert up.connections == 1


async def test_body_ended_by_the_close_is_complete(raw: RawStart, client: UpstreamClient) -> None:
    """No Content-Length, not chunked: the body runs to the close (RFC 9112 §6.3)."""
    up, url = await raw(
        answering(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it", then_close=True)
    )
    answer = await exchange(client, url)
    assert (answer.status, answer.body) == (200, b"all of it")
    assert client.idle_connections(client.origin(url)) == 0
    assert up.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: "x"\r\n\r\n',
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_answers_without_a_body_complete_at_once(
    answer: bytes, raw: RawStart, client: UpstreamClient
) -> None:
    up, url = await raw(answering(answer))
    for _ in range(2):
        assert (await exchange(client, url)).body == b""
    assert up.connections == 1  # complete, so reusable


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
)
async def test_upstream_dying_mid_body_is_an_error(
    answer: bytes, raw: RawStart, client: UpstreamClient
) -> None:
    _, url = await raw(answering(answer, then_close=True))
    origin = client.origin(url)
    conn = await client.connect(origin, GUARD)
    try:
        conn.send(request_head("GET", origin, "", (), ""), None, GUARD)
        await conn.head()
        assert conn.status == 200
        received = b""
        with pytest.raises(UpstreamError, match="closed the connection"):
            while chunk := await conn.read():
                received += chunk
        assert received in (b"0123456789", b"hello")  # what arrived is relayed first
    finally:
        conn.finish()


async def test_silent_upstream_times_out(raw: RawStart, client: UpstreamClient) -> None:
    async def script(up: RawUpstream, reader: Reader, w: Writer) -> None:
        await up.next_request(reader)
        await up.next_request(reader)  # never answers; waits for the close

    up, url = await raw(script)
    with pytest.raises(UpstreamTimeout) as caught:
        await exchange(client, url, idle_timeout=0.05)
    assert caught.value.status == 504
    await until(lambda: up.ended == 1, every=0)  # the timed-out connection was closed


async def test_slow_reader_pauses_the_upstream(raw: RawStart, client: UpstreamClient) -> None:
    """Read-side flow control: past HIGH_WATER unread bytes, reading from the upstream stops
    (the client is slow); it resumes when the reader takes them."""
    size = 4 * HIGH_WATER
    payload = bytes(range(256)) * (size // 256)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + payload
    _, url = await raw(answering(answer))
    origin = client.origin(url)
    conn = await client.connect(origin, GUARD)
    try:
        conn.send(request_head("GET", origin, "", (), ""), None, GUARD)
        await conn.head()
        await until(lambda: conn._read_paused, every=0)
        received = b""
        while chunk := await conn.read():
            received += chunk
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    finally:
        conn.finish()
    assert client.idle_connections(origin) == 1


# --------------------------------------------------------------------------------------------
# Connecting


async def test_refused_connection_is_connect_failed(
    refused_url: str, client: UpstreamClient
) -> None:
    with pytest.raises(ConnectFailed) as caught:
        await exchange(client, refused_url)
    assert caught.value.status == 502
    assert caught.value.reason == "upstream_unreachable"


@pytest.fixture
def unanswered_url() -> Iterator[str]:
    """A port whose accept queue is full: a new connection attempt hangs (SYNs dropped)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # in progress: the handshake may never end
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield f"http://127.0.0.1:{port}/mcp"
    for filler in fillers:
        filler.close()
    listener.close()


async def test_connect_timeout_is_504_and_failover_may_follow(unanswered_url: str) -> None:
    client = UpstreamClient()
    try:
        with pytest.raises(ConnectFailed) as caught:
            await client.connect(client.origin(unanswered_url), 0.05)
        assert caught.value.status == 504
        assert caught.value.reason == "upstream_connect_timeout"
    finally:
        await client.close()


async def test_connect_timeout_through_proxyd(
    unanswered_url: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    doc = config(issuer, {"a": unanswered_url}, tmp_path, upstream={"connect_timeout": "50ms"})
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    body = await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer(token)), 504)
    assert body["error"]["data"]["reason"] == "upstream_connect_timeout"
    [line] = access_lines(logs)
    assert line["reason"] == "upstream_connect_timeout"


def _certificate() -> tuple[bytes, bytes]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxyd test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_tls_upstream_is_verified(tmp_path: Path) -> None:
    await _tls_round(tmp_path)


def test_tls_upstream_is_verified_on_uvloop(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(_tls_round(tmp_path))


async def _tls_round(tmp_path: Path) -> None:
    cert, key = _certificate()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    up = RawUpstream(answering(OK))
    url = await up.start(server_side)
    assert url.startswith("https://")
    # Default verification (the system's CAs, as aiohttp's client did): an unknown issuer
    # means no connection, so another server may be tried.
    default = UpstreamClient()
    trusting_context = ssl.create_default_context(cadata=cert.decode())
    trusting = UpstreamClient(ssl_context=trusting_context)
    try:
        with pytest.raises(ConnectFailed):
            await exchange(default, url)
        for _ in range(2):
            answer = await exchange(trusting, url)
            assert (answer.status, answer.body) == (200, b"{}")
        assert trusting.idle_connections(trusting.origin(url)) == 1
    finally:
        await default.close()
        await trusting.close()
        await up.close()
    assert up.connections == 1  # one reused connection (the refused handshake never opened)


def test_the_client_runs_on_uvloop() -> None:
    """proxyd runs on uvloop, whose transports are not asyncio's: one full round there."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        empty = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        up = RawUpstream(answering(OK, empty))
        url = await up.start()
        client = UpstreamClient()
        try:
            assert (await exchange(client, url)).body == b"{}"
            assert (await exchange(client, url)).body == b""
            assert up.connections == 1
        finally:
            await client.close()
            await up.close()

    uvloop.run(main())


# --------------------------------------------------------------------------------------------
# Through proxyd: streamed request bodies and answers


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_get_or_delete_with_a_body_is_refused_and_never_forwarded(
    method: str,
    framing: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """MCP's GET and DELETE carry no message; one with a body used to reach the upstream
    uninspected, a tools/call inside it included (issue 10): 400, and nothing is sent."""
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    token = issuer.token(clock.wall())
    call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}'

    async def chunks() -> AsyncIterator[bytes]:
        yield call

    data: Any = chunks() if framing == "chunked" else call
    headers = {**bearer(token), "Content-Type": "application/json"}
    resp = await client.request(method, "/mcp/apps/a", data=data, headers=headers)
    await rpc_error(resp, 400)
    assert echo.seen == []
    assert [e["reason"] for e in logs.events("mcp.invalid_request")] == ["bad_request"]
    # Without a body (Content-Length: 0 included) the same request goes through.
    empty = {**bearer(token), "Content-Length": "0"}
    resp = await client.request(method, "/mcp/apps/a", headers=empty)
    assert resp.status == 200
    assert len(echo.seen) == 1 and echo.last.body == b""


async def test_body_to_the_close_through_proxyd_is_a_clean_end(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    raw: RawStart,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    _, url = await raw(
        answering(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n",
            then_close=True,
        )
    )
    client = await make_proxy(config(issuer, {"a": url}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.get("/mcp/apps/a", headers={**bearer(token), "Accept": "text/event-stream"})
    assert resp.status == 200
    assert await asyncio.wait_for(resp.read(), GUARD) == b"data: 1\n\ndata: 2\n\n"
    assert resp.headers["Transfer-Encoding"] == "chunked"
    [line] = access_lines(logs)
    assert "broken" not in line


async def test_proxyd_reuses_one_connection_and_closes_it_at_cleanup(
    raw: RawStart,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """The pool belongs to the app's cleanup context: one connection serves every request,
    and it is closed when the app stops."""
    up, url = await raw(answering(OK))
    client = await make_proxy(config(issuer, {"a": url}, tmp_path))
    token = issuer.token(clock.wall())
    for _ in range(3):
        assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    assert up.used == 1
    await client.close()
    await until(lambda: up.ended == 1, every=0)
