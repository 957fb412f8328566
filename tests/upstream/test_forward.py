"""The streaming forwarder through a real proxyd: header rules, X-Forwarded-*, bytes untouched,
Content-Length vs chunked, SSE flushing, client disconnects and upstreams dying mid-stream.
Real aiohttp upstreams on 127.0.0.1; no sleeps: every wait is on an event, under a guard.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import (
    IDENTITY,
    PUBLIC_URL,
    RPC,
    Client,
    access_lines,
    bearer,
    config,
    decode_assertion,
    padded_rpc,
    proxy_keys,
    rpc_error,
)
from tests.kit.wait import GUARD

SSE = "text/event-stream"


async def echo_proxy(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    **sections: Any,
) -> tuple[Client, Echo, str]:
    echo = Echo()
    url = await upstreams.start(echo.app())
    client = await make_proxy(config(issuer, {"a": url}, tmp_path, **sections))
    return client, echo, url


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------------------------
# Request headers


async def test_request_header_rules(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    # (Mcp-Session-Id is translated, not passed: see tests/mcp/test_pinning.py.)
    kept = {
        "MCP-Protocol-Version": "2025-11-25",
        "Last-Event-ID": "ev-17",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "add",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "X-Custom": "kept",
    }
    hop = {
        "Connection": "keep-alive, X-Foo",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "X-Foo": "connection-specific",
    }
    resp = await client.post(
        "/mcp/apps/a",
        data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
        headers={**bearer(token), **kept, **hop},
    )
    assert resp.status == 200, await resp.text()
    seen = echo.last.headers
    for name, value in kept.items():
        assert seen.getall(name) == [value], name
    assert "Authorization" not in seen
    for name in ("Keep-Alive", "TE", "Upgrade", "Proxy-Authorization", "X-Foo"):
        assert name not in seen, name
    # The upstream hop's own Connection header is aiohttp's, never the client's tokens.
    assert "x-foo" not in seen.get("Connection", "").lower()
    assert token not in str(echo.last.raw_headers)
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{client.port}"
    assert seen["Host"] != f"127.0.0.1:{client.port}"  # Host is the upstream's


async def test_proxyd_adds_no_request_headers_of_its_own(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """No Accept-Encoding, User-Agent, Accept or Content-Type the client did not send."""
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    skip = ["Accept-Encoding", "User-Agent", "Accept", "Content-Type"]
    resp = await client.get("/mcp/apps/a", headers=bearer(token), skip_auto_headers=skip)
    assert resp.status == 200
    for name in skip:
        assert name not in echo.last.headers, name
    resp = await client.get(
        "/mcp/apps/a", headers={**bearer(token), "Accept-Encoding": "br"}, skip_auto_headers=skip
    )
    assert echo.last.headers.getall("Accept-Encoding") == ["br"]


async def test_repeated_headers_keep_every_value(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    headers = [("Authorization", f"Bearer {token}"), ("X-Multi", "one"), ("X-Multi", "two")]
    resp = await client.post("/mcp/apps/a", json=RPC, headers=headers)
    assert resp.status == 200
    assert echo.last.headers.getall("X-Multi") == ["one", "two"]


async def test_client_identity_header_is_replaced(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290In0."
    headers = [("Authorization", f"Bearer {token}"), (IDENTITY, forged), (IDENTITY.lower(), forged)]
    assert (await client.post("/mcp/apps/a", json=RPC, headers=headers)).status == 200
    [value] = echo.last.headers.getall(IDENTITY)
    assert value != forged
    claims = decode_assertion(value, await proxy_keys(client))
    assert claims["sub"] == "alice@example.com"


async def test_spoofed_forwarded_headers_from_untrusted_peer_are_ignored(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    spoof = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=203.0.113.9",
        "X-Real-IP": "203.0.113.9",
    }
    resp = await client.post("/mcp/apps/a", json=RPC, headers={**bearer(token), **spoof})
    assert resp.status == 200
    seen = echo.last.headers
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [f"127.0.0.1:{client.port}"]
    assert "Forwarded" not in seen
    assert "X-Real-IP" not in seen
    [line] = access_lines(logs)
    assert line["client"] == "127.0.0.1"
    assert logs.events("session_created")[0]["client"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("xff", "client_ip"),
    [
        ("203.0.113.7, 198.51.100.9", "198.51.100.9"),  # right-most untrusted hop
        ("203.0.113.7, 127.0.0.5", "203.0.113.7"),  # trusted hops are skipped
        ("203.0.113.7", "203.0.113.7"),
    ],
)
async def test_forwarded_for_from_trusted_proxy_is_extended(
    xff: str,
    client_ip: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, echo, _ = await echo_proxy(
        issuer, make_proxy, upstreams, tmp_path, server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    token = issuer.token(clock.wall())
    headers = {
        **bearer(token),
        "X-Forwarded-For": xff,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "mcp.example.com",
    }
    assert (await client.post("/mcp/apps/a", json=RPC, headers=headers)).status == 200
    seen = echo.last.headers
    assert seen.getall("X-Forwarded-For") == [f"{xff}, 127.0.0.1"]
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Host"] == "mcp.example.com"
    [line] = access_lines(logs)
    assert line["client"] == client_ip


async def test_every_forwarded_for_line_counts(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """A trusted proxy may add its hop as a new header line; the client's own line before it
    must not decide who the client is."""
    client, echo, _ = await echo_proxy(
        issuer, make_proxy, upstreams, tmp_path, server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    token = issuer.token(clock.wall())
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("X-Forwarded-For", "1.2.3.4"),  # written by the client: a lie
        ("X-Forwarded-For", "198.51.100.9"),  # added by the trusted proxy: the real client
    ]
    assert (await client.post("/mcp/apps/a", json=RPC, headers=headers)).status == 200
    assert echo.last.headers.getall("X-Forwarded-For") == ["1.2.3.4, 198.51.100.9, 127.0.0.1"]
    [line] = access_lines(logs)
    assert line["client"] == "198.51.100.9"


async def test_query_string_passes_unchanged(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    query = "q=a%26b&plus=1%2B1&sp=x%20y&flag"
    resp = await client.get(f"/mcp/apps/a?{query}", headers=bearer(token))
    assert resp.status == 200
    assert echo.last.raw_query == query
    assert echo.last.path == "/mcp"


@pytest.mark.parametrize(
    ("client_query", "upstream_query"),
    [("", "tenant=t%201"), ("q=1&flag", "tenant=t%201&q=1&flag")],
)
async def test_a_server_url_query_is_kept_and_the_clients_follows_it(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    clock: FakeClock,
    client_query: str,
    upstream_query: str,
) -> None:
    echo = Echo()
    url = await upstreams.start(echo.app())
    client = await make_proxy(config(issuer, {"a": f"{url}?tenant=t%201"}, tmp_path))
    token = issuer.token(clock.wall())
    path = "/mcp/apps/a" + (f"?{client_query}" if client_query else "")
    resp = await client.get(path, headers=bearer(token))
    assert resp.status == 200
    assert echo.last.raw_query == upstream_query
    assert echo.last.path == "/mcp"


async def test_methods_and_bodies_reach_the_upstream(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    await client.get("/mcp/apps/a", headers={**bearer(token), "Accept": SSE})
    await client.delete("/mcp/apps/a", headers=bearer(token))
    assert [(s.method, s.body) for s in echo.seen] == [
        ("POST", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'),
        ("GET", b""),
        ("DELETE", b""),
    ]


# --------------------------------------------------------------------------------------------
# Responses


@pytest.mark.parametrize("status", [200, 201, 202, 204, 400, 404, 409, 500, 503])
async def test_upstream_status_and_headers_pass(
    status: int,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    body = b"" if status in (202, 204) else b'{"jsonrpc":"2.0","id":1,"result":{}}'

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.Response(status=status, body=body or None, content_type="application/json")
        resp.headers["Mcp-Session-Id"] = "s-9"
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers["X-Upstream"] = "yes"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
        resp.headers["X-Hop"] = "connection-specific"
        resp.headers["Connection"] = "keep-alive, X-Hop"
        return resp

    up = web.Application()
    up.router.add_post("/mcp", answer)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    assert resp.status == status
    assert await resp.read() == body
    # The upstream's session id never reaches the client: it is sealed (tests/mcp/test_pinning.py).
    assert resp.headers["Mcp-Session-Id"].startswith("pxs1.")
    assert "s-9" not in resp.headers["Mcp-Session-Id"]
    assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert resp.headers["X-Upstream"] == "yes"
    for name in ("Keep-Alive", "Proxy-Authenticate", "X-Hop"):
        assert name not in resp.headers, name


async def test_json_answer_keeps_content_length(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, _, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    body = await resp.read()
    assert resp.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in resp.headers


async def test_streamed_answer_is_chunked(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"jsonrpc":')
        await resp.write(b'"2.0"}')
        await resp.write_eof()
        return resp

    up = web.Application()
    up.router.add_post("/mcp", stream)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    assert await resp.read() == b'{"jsonrpc":"2.0"}'
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in resp.headers


async def test_gzip_answer_passes_byte_identical(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    compressed = gzip.compress(b'{"jsonrpc":"2.0","id":1,"result":{"text":"' + b"z" * 5000 + b'"}}')
    seen_encodings: list[str | None] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        seen_encodings.append(request.headers.get("Accept-Encoding"))
        return web.Response(
            body=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    up = web.Application()
    up.router.add_post("/mcp", answer)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.post(
        "/mcp/apps/a",
        json=RPC,
        headers=bearer(token),
        skip_auto_headers=["Accept-Encoding"],
        auto_decompress=False,
    )
    assert resp.status == 200
    assert await resp.read() == compressed
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Content-Length"] == str(len(compressed))
    resp = await client.post(
        "/mcp/apps/a",
        json=RPC,
        headers={**bearer(token), "Accept-Encoding": "gzip"},
        auto_decompress=False,
    )
    assert await resp.read() == compressed
    assert seen_encodings == [None, "gzip"]


async def test_gzip_request_body_passes_byte_identical(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    url = await upstreams.start(echo.app(), auto_decompress=False)  # see the raw bytes
    client = await make_proxy(config(issuer, {"a": url}, tmp_path))
    token = issuer.token(clock.wall())
    message = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"x" * 5000 + b'"}}'
    compressed = gzip.compress(message)  # proxyd inflates it to read it, forwards it as sent
    headers = {**bearer(token), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    resp = await client.post("/mcp/apps/a", data=compressed, headers=headers)
    assert resp.status == 200, await resp.text()
    assert echo.last.body == compressed
    assert echo.last.headers["Content-Encoding"] == "gzip"
    assert echo.last.headers["Content-Length"] == str(len(compressed))


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_request_body_arrives_byte_identical(
    chunked: bool,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """A 2 MiB JSON-RPC message is read whole and parsed, but forwarded as the client wrote
    it: never re-encoded. A chunked client body reaches the upstream with a Content-Length."""
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    payload = padded_rpc(2 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(payload), 65536):
            yield payload[offset : offset + 65536]

    data: Any = chunks() if chunked else payload
    headers = {**bearer(token), "Content-Type": "application/json"}
    resp = await client.post("/mcp/apps/a", data=data, headers=headers)
    assert resp.status == 200, await resp.text()
    assert hashlib.sha256(echo.last.body).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert echo.last.headers["Content-Length"] == str(len(payload))
    assert "Transfer-Encoding" not in echo.last.headers
    [line] = access_lines(logs)
    assert line["bytes_in"] == len(payload)


async def test_expect_100_continue_body_arrives(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """curl sends ``Expect: 100-continue`` for bodies over 1 MiB."""
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    payload = padded_rpc(1536 * 1024, seed=3)
    resp = await asyncio.wait_for(
        client.post(
            "/mcp/apps/a",
            data=payload,
            headers={**bearer(token), "Content-Type": "application/json"},
            expect100=True,
        ),
        GUARD,
    )
    assert resp.status == 200, await resp.text()
    assert echo.last.body == payload


@pytest.mark.parametrize("streamed", [False, True])
async def test_large_response_arrives_byte_identical(
    streamed: bool,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    payload = blob(10 * 1024 * 1024, seed=2)

    async def answer(request: web.Request) -> web.StreamResponse:
        if not streamed:
            return web.Response(body=payload, content_type="application/octet-stream")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for offset in range(0, len(payload), 100_000):
            await resp.write(payload[offset : offset + 100_000])
        await resp.write_eof()
        return resp

    up = web.Application()
    up.router.add_get("/mcp", answer)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.get("/mcp/apps/a", headers=bearer(token))
    body = await resp.read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()
    if streamed:
        assert resp.headers["Transfer-Encoding"] == "chunked"
    else:
        assert resp.headers["Content-Length"] == str(len(payload))
    [line] = access_lines(logs)
    assert line["bytes_out"] == len(payload)
    assert "broken" not in line


async def test_upstream_answering_garbage_is_502(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = await make_proxy(config(issuer, {"a": f"http://127.0.0.1:{port}/mcp"}, tmp_path))
        token = issuer.token(clock.wall())
        await rpc_error(await client.get("/mcp/apps/a", headers=bearer(token)), 502)
    finally:
        server.close()
        await server.wait_closed()


async def test_small_answer_cut_short_is_502_not_a_truncated_200(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """A small Content-Length answer is read whole before anything goes to the client, so an
    upstream that dies inside it still gets an honest 502."""

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b'Content-Length: 100\r\n\r\n{"jsonrpc":')
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = await make_proxy(config(issuer, {"a": f"http://127.0.0.1:{port}/mcp"}, tmp_path))
        token = issuer.token(clock.wall())
        await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer(token)), 502)
    finally:
        server.close()
        await server.wait_closed()
    [line] = access_lines(logs)
    assert line["status"] == 502


# --------------------------------------------------------------------------------------------
# Streaming


async def test_sse_events_arrive_one_by_one(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    gate = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": SSE, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b'event: message\ndata: {"progress":1}\n\n')
        await gate.wait()  # set by the test only after event 1 went through proxyd
        await resp.write(b'event: message\ndata: {"progress":2}\n\n')
        await resp.write_eof()
        return resp

    up = web.Application()
    up.router.add_post("/mcp", sse)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await asyncio.wait_for(
        client.post("/mcp/apps/a", json=RPC, headers={**bearer(token), "Accept": SSE}), GUARD
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == SSE
    assert resp.headers["X-Accel-Buffering"] == "no"
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), GUARD)
    assert first == b'event: message\ndata: {"progress":1}\n\n'
    gate.set()
    rest = await asyncio.wait_for(resp.content.read(), GUARD)
    assert rest == b'event: message\ndata: {"progress":2}\n\n'
    [line] = access_lines(logs)
    assert line["status"] == 200
    assert "broken" not in line


async def test_json_answer_has_no_accel_buffering_header(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, _, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(issuer.token(clock.wall())))
    assert resp.status == 200
    assert "X-Accel-Buffering" not in resp.headers


async def test_client_disconnect_closes_upstream_stream(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    upstream_closed = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        await resp.write(b"id: 1\ndata: hello\n\n")
        try:
            await asyncio.Event().wait()  # a long GET stream: silent until its client leaves
        except (asyncio.CancelledError, ConnectionResetError):
            upstream_closed.set()
            raise
        return resp

    up = web.Application()
    up.router.add_get("/mcp", stream)
    # The default idle timeout (5 min) is far beyond the guard: only the disconnect can close it.
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.get("/mcp/apps/a", headers={**bearer(token), "Accept": SSE})
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), GUARD)
    assert first == b"id: 1\ndata: hello\n\n"
    assert not upstream_closed.is_set()
    resp.close()  # the client goes away
    await asyncio.wait_for(upstream_closed.wait(), GUARD)
    [line] = access_lines(logs)
    assert line["reason"] == "client_disconnected"
    assert line["status"] == 499


async def test_client_leaving_before_the_answer_closes_upstream_request(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    called = asyncio.Event()
    upstream_closed = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        called.set()
        try:
            await asyncio.Event().wait()  # a long tool call: no answer yet
        except asyncio.CancelledError:
            upstream_closed.set()
            raise
        return web.json_response({})

    up = web.Application()
    up.router.add_post("/mcp", slow)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    pending = asyncio.create_task(client.post("/mcp/apps/a", json=RPC, headers=bearer(token)))
    await asyncio.wait_for(called.wait(), GUARD)
    pending.cancel()  # the client goes away while proxyd waits for the upstream's headers
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.wait_for(upstream_closed.wait(), GUARD)
    [line] = access_lines(logs)
    assert line["status"] == 499
    assert line["reason"] == "client_disconnected"


async def test_many_open_streams_are_not_capped(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """aiohttp's default pool allows 100 connections; GET streams must not queue behind it."""
    streams = 120
    opened = 0
    all_open = asyncio.Event()
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal opened
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        await resp.write(b"data: open\n\n")
        opened += 1
        if opened == streams:
            all_open.set()
        await release.wait()
        await resp.write_eof()
        return resp

    up = web.Application()
    up.router.add_get("/mcp", stream)
    proxy = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    headers = {**bearer(token), "Accept": SSE}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> bytes:
            async with session.get(proxy.make_url("/mcp/apps/a"), headers=headers) as resp:
                return await resp.read()

        tasks = [asyncio.create_task(one()) for _ in range(streams)]
        try:
            await asyncio.wait_for(all_open.wait(), GUARD)
        finally:
            release.set()
        bodies = await asyncio.wait_for(asyncio.gather(*tasks), GUARD)
    assert bodies == [b"data: open\n\n"] * streams


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_upstream_dying_mid_stream_truncates_the_client(
    framing: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    gate = asyncio.Event()

    async def dying(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        if framing == "content-length":
            resp.content_length = 10_000
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await gate.wait()
        assert request.transport is not None
        request.transport.abort()  # the upstream dies
        await asyncio.Event().wait()  # cancelled with the connection
        return resp

    up = web.Application()
    up.router.add_post("/mcp", dying)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.post("/mcp/apps/a", json=RPC, headers={**bearer(token), "Accept": SSE})
    assert resp.status == 200
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), GUARD) == b"data: 1\n\n"
    gate.set()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.content.read(), GUARD)
    [line] = access_lines(logs)
    assert line["broken"] == "upstream_reset"
    assert line["bytes_out"] == len(b"data: 1\n\n")


async def test_upstream_silent_mid_stream_past_idle_timeout_truncates(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    release = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await release.wait()
        return resp

    up = web.Application()
    up.router.add_post("/mcp", stalls)
    doc = config(
        issuer, {"a": await upstreams.start(up)}, tmp_path, upstream={"idle_timeout": "200ms"}
    )
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    resp = await client.post("/mcp/apps/a", json=RPC, headers={**bearer(token), "Accept": SSE})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.content.read(), GUARD)
    release.set()
    [line] = access_lines(logs)
    assert line["broken"] == "upstream_idle_timeout"


async def test_public_url_is_not_the_forwarded_host(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """X-Forwarded-Host says what the client asked for; the assertion's iss is public_url."""
    client, echo, _ = await echo_proxy(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall())
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    claims = decode_assertion(echo.last.headers[IDENTITY], await proxy_keys(client))
    assert claims["iss"] == PUBLIC_URL
    assert echo.last.headers["X-Forwarded-Host"] == f"127.0.0.1:{client.port}"
