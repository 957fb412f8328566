"""MCP audit events (proxyd.mcp.audit): the official SDK client and server through proxyd,
both protocol eras, on the ``proxyd.audit`` logger and in the audit file.

A role allows ``echo`` and denies ``add``. Events that follow an answer the client already
has (a GET stream's, a DELETE's) are awaited on the log stream itself: every write sets an
event, every wait is under a guard, never a sleep.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from mcp import MCPError
from mcp.shared.exceptions import MCPDeprecationWarning

from proxyd.config import AuditSettings
from proxyd.log import configure
from proxyd.mcp.audit import Auditor
from tests.conftest import FakeClock, LogCapture, ProxyFactory, base_config
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import MINTED, TestIssuer
from tests.kit.mcpkit import LEGACY, MODERN, UpstreamServer, mcp_client, upstream_server
from tests.kit.proxy import Client, bearer, rpc_error
from tests.kit.wait import GUARD

USER = "alice@example.com"
ROLES = [
    {
        "name": "echo-only",
        "users": [USER],
        "app_labels": {"env": "test"},
        "mcp": {"tools": ["echo"]},
        "deny": {"mcp": {"tools": ["add"]}},
    }
]
# On every event of a verified session.
COMMON = ("user", "issuer", "app", "client", "session", "status", "latency_ms")
SECRET_FIELDS = ("token", "authorization", "bearer", "assertion")
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


class NotifyingStream(io.StringIO):
    """The log capture's stream, setting an asyncio.Event on every line written."""

    def __init__(self, inner: io.StringIO) -> None:
        super().__init__()
        self.inner = inner
        self.changed = asyncio.Event()

    def write(self, text: str) -> int:
        self.changed.set()
        return self.inner.write(text)


class Audit:
    def __init__(self, logs: LogCapture) -> None:
        self.logs = logs
        self.stream = NotifyingStream(logs.stream)
        configure("debug", "json", self.stream)  # the autouse guard still reads every line

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = [line for line in self.logs.lines() if line.get("logger_name") == "proxyd.audit"]
        return [line for line in lines if name is None or line["event"] == name]

    def requests(self) -> list[tuple[Any, ...]]:
        return [
            (e["mcp_method"], e.get("name"), e["allowed"], e["status"])
            for e in self.events("mcp.session.request")
        ]

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(GUARD):
            while True:
                self.stream.changed.clear()
                if condition():
                    return
                await self.stream.changed.wait()


@pytest.fixture
def audit(logs: LogCapture) -> Iterator[Audit]:
    yield Audit(logs)


def audit_config(issuer: TestIssuer, url: str, tmp_path: Path, **audit: Any) -> dict[str, Any]:
    return base_config(issuer, {"a": [url]}, tmp_path, roles=ROLES, audit=audit)


def expected_hash(arguments: Any) -> str:
    """Computed here, independently: canonical JSON (sorted keys, no spaces), SHA-256."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def no_secrets(events: list[dict[str, Any]], text: str) -> None:
    for event in events:
        for field in SECRET_FIELDS:
            assert field not in event, field
    assert MINTED
    for token in MINTED:
        signature = token.rsplit(".", 1)[-1]
        assert token not in text
        assert not signature or signature not in text


async def session_of(
    up: UpstreamServer, proxy: Client, token: str, mode: str
) -> tuple[list[str], int]:
    """list_tools, echo, then a denied add; returns the tools seen and the denied call's code."""
    async with mcp_client(str(proxy.make_url("/mcp/apps/a")), token, mode=mode) as c:
        tools = [t.name for t in (await c.list_tools()).tools]
        echoed = await c.call_tool("echo", {"text": "héllo", "n": 1})
        assert echoed.content[0].text == "héllo"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as denied:
            await c.call_tool("add", {"a": 1, "b": 2})
    return tools, denied.value.error.code


# --------------------------------------------------------------------------------------------
# Sessions, both eras


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
async def test_legacy_session_events(
    json_response: bool,
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async with upstream_server(json_response=json_response) as up:
        proxy = await make_proxy(audit_config(issuer, up.url, tmp_path))
        token = issuer.token(clock.wall())
        tools, code = await session_of(up, proxy, token, LEGACY)
        # The GET stream's event comes when the stream ends (the DELETE ends it upstream).
        await audit.until(lambda: bool(audit.events("mcp.session.listen_stream")))
    assert "add" not in tools and "echo" in tools
    assert code == -32602
    assert [call.name for call in up.calls] == ["echo"]  # the denied call never went up

    [verified] = audit.events("app_auth.verify.success")
    assert verified["user"] == USER and verified["app"] == "a"
    assert verified["config"] == "test-idp" and verified["client"] == "127.0.0.1"
    assert verified["username_claim"] == "email"  # which claim named the user (issue 12)
    [start] = audit.events("mcp.session.start")
    # tools/list is not recorded (it succeeded); the denied add is, with allowed=false.
    assert audit.requests() == [
        ("initialize", None, True, 200),
        ("tools/call", "echo", True, 200),
        ("tools/call", "add", False, 200),
    ]
    init, echo, add = audit.events("mcp.session.request")
    [notification] = audit.events("mcp.session.notification")
    assert notification["mcp_method"] == "notifications/initialized"
    assert notification["status"] == 202
    [listen] = audit.events("mcp.session.listen_stream")
    [end] = audit.events("mcp.session.end")
    assert end["status"] == 200
    assert listen["status"] in (200, 499)  # the stream ends upstream, or as the client leaves

    everything = [start, init, echo, add, notification, listen, end]
    for event in everything:
        for field in COMMON:
            assert field in event, (event["event"], field)
        assert event["user"] == USER and event["app"] == "a" and event["client"] == "127.0.0.1"
        assert event["issuer"] == issuer.issuer
        assert event["username_claim"] == "email"
        assert isinstance(event["latency_ms"], float | int) and event["latency_ms"] >= 0
    # One proxyd session throughout (a hash, not the token); one MCP session after initialize.
    assert len({e["session"] for e in everything}) == 1
    assert len(start["session"]) == 16 and start["session"] not in token
    assert "mcp_session" not in start and "mcp_session" not in init
    mcp_sessions = {e["mcp_session"] for e in [echo, add, notification, listen, end]}
    assert len(mcp_sessions) == 1
    # Forwarded requests name the upstream; the denied call reached none.
    for event in [start, init, echo, notification, listen, end]:
        assert event["upstream"] == up.url
    assert "upstream" not in add
    # Ids are the JSON-RPC ids; arguments only as their hash.
    assert isinstance(init["id"], int) and isinstance(echo["id"], int) and init["id"] < echo["id"]
    assert echo["id"] < add["id"]
    assert echo["arguments_hash"] == expected_hash({"text": "héllo", "n": 1})
    assert add["arguments_hash"] == expected_hash({"a": 1, "b": 2})
    assert all("arguments" not in e for e in everything)
    assert "arguments_hash" not in init
    no_secrets(audit.events(), audit.logs.text())


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
async def test_modern_era_events(
    json_response: bool,
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """2026-07-28 is stateless: no initialize, no GET stream, no DELETE; only requests."""
    async with upstream_server(json_response=json_response) as up:
        proxy = await make_proxy(audit_config(issuer, up.url, tmp_path))
        tools, code = await session_of(up, proxy, issuer.token(clock.wall()), MODERN)
    assert "add" not in tools and code == -32602
    assert [call.name for call in up.calls] == ["echo"]
    assert [e["event"] for e in audit.events()] == [
        "app_auth.verify.success",
        "mcp.session.request",
        "mcp.session.request",
    ]
    assert audit.requests() == [
        ("tools/call", "echo", True, 200),
        ("tools/call", "add", False, 200),
    ]
    echo, add = audit.events("mcp.session.request")
    assert echo["upstream"] == up.url and "upstream" not in add
    assert "mcp_session" not in echo and "mcp_session" not in add
    assert echo["arguments_hash"] == expected_hash({"text": "héllo", "n": 1})
    assert echo["session"] == add["session"]


# --------------------------------------------------------------------------------------------
# Settings: list methods, arguments, the file


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_list_methods_and_ping_are_recorded_when_configured(
    mode: str,
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async with upstream_server() as up:
        proxy = await make_proxy(audit_config(issuer, up.url, tmp_path, list_methods=True))
        url = str(proxy.make_url("/mcp/apps/a"))
        async with mcp_client(url, issuer.token(clock.wall()), mode=mode) as c:
            await c.list_tools()
            await c.client.list_resources()
            if mode == LEGACY:
                # ping is gone in 2026-07-28; the SDK warns even when the session is legacy.
                with pytest.warns(MCPDeprecationWarning):
                    await c.client.send_ping()
    listed = [e for e in audit.events("mcp.session.request") if e["mcp_method"] != "initialize"]
    expected = ["tools/list", "resources/list"] + (["ping"] if mode == LEGACY else [])
    assert [e["mcp_method"] for e in listed] == expected
    for event in listed:
        assert event["status"] == 200 and event["allowed"] is True
        assert event["upstream"] == up.url and isinstance(event["id"], int)


async def test_list_methods_and_ping_are_recorded_only_when_they_fail(
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    failing = {"value": False}

    async def answer(request: web.Request) -> web.StreamResponse:
        rpc = await request.json()
        if failing["value"]:
            return web.json_response({"jsonrpc": "2.0", "id": rpc["id"]}, status=500)
        return web.json_response({"jsonrpc": "2.0", "id": rpc["id"], "result": {"tools": []}})

    up = web.Application()
    up.router.add_post("/mcp", answer)
    url = await upstreams.start(up)
    proxy = await make_proxy(audit_config(issuer, url, tmp_path))
    headers = {**bearer(issuer.token(clock.wall())), **JSON_HEADERS}
    for method in ("tools/list", "ping", "resources/list", "resources/templates/list"):
        rpc = {"jsonrpc": "2.0", "id": 1, "method": method}
        assert (await proxy.post("/mcp/apps/a", json=rpc, headers=headers)).status == 200
    assert audit.events("mcp.session.request") == []
    failing["value"] = True
    for method in ("tools/list", "ping"):
        rpc = {"jsonrpc": "2.0", "id": 2, "method": method}
        assert (await proxy.post("/mcp/apps/a", json=rpc, headers=headers)).status == 500
    assert audit.requests() == [("tools/list", None, True, 500), ("ping", None, True, 500)]
    # An upstream that is gone: the request failed in proxyd (502), and is recorded too.
    await upstreams.close()
    rpc = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
    await rpc_error(await proxy.post("/mcp/apps/a", json=rpc, headers=headers), 502)
    assert audit.requests()[-1] == ("tools/list", None, True, 502)
    assert audit.events("mcp.session.request")[-1]["upstream"] == url


async def test_only_a_successful_initialize_starts_a_session(
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    statuses = [503, 200]

    async def answer(request: web.Request) -> web.StreamResponse:
        rpc = await request.json()
        result = {"protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {}}
        body = {"jsonrpc": "2.0", "id": rpc["id"], "result": result}
        return web.json_response(body, status=statuses.pop(0))

    up = web.Application()
    up.router.add_post("/mcp", answer)
    url = await upstreams.start(up)
    proxy = await make_proxy(audit_config(issuer, url, tmp_path))
    headers = {**bearer(issuer.token(clock.wall())), **JSON_HEADERS}
    params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}}
    rpc = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
    assert (await proxy.post("/mcp/apps/a", json=rpc, headers=headers)).status == 503
    assert audit.events("mcp.session.start") == []
    assert (await proxy.post("/mcp/apps/a", json=rpc, headers=headers)).status == 200
    [start] = audit.events("mcp.session.start")
    assert start["status"] == 200 and start["upstream"] == url
    assert audit.requests() == [("initialize", None, True, 503), ("initialize", None, True, 200)]


async def test_include_arguments_adds_them_beside_the_hash(
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async with upstream_server() as up:
        proxy = await make_proxy(audit_config(issuer, up.url, tmp_path, include_arguments=True))
        await session_of(up, proxy, issuer.token(clock.wall()), LEGACY)
    _, echo, add = audit.events("mcp.session.request")
    assert echo["arguments"] == {"text": "héllo", "n": 1}
    assert echo["arguments_hash"] == expected_hash({"text": "héllo", "n": 1})
    assert add["arguments"] == {"a": 1, "b": 2} and add["allowed"] is False


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_audit_file_has_the_same_events_as_json_lines(
    mode: str,
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit" / "events.jsonl"
    path.parent.mkdir()
    async with upstream_server() as up:
        proxy = await make_proxy(audit_config(issuer, up.url, tmp_path, file=str(path)))
        await session_of(up, proxy, issuer.token(clock.wall()), mode)
        if mode == LEGACY:
            await audit.until(lambda: bool(audit.events("mcp.session.listen_stream")))
        # A failed verification is recorded in the file too.
        bad = issuer.token(clock.wall(), aud="someone-else")
        resp = await proxy.post("/mcp/apps/a", json={}, headers=bearer(bad))
        assert resp.status == 401
    text = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600  # audit records are nobody else's to read
    lines = [json.loads(line) for line in text.splitlines()]
    logged = audit.events()
    assert len(lines) == len(logged) >= 4
    for line, event in zip(lines, logged, strict=True):
        assert isinstance(line.pop("time"), float)
        expected = {
            k: v for k, v in event.items() if k not in ("logger_name", "level", "timestamp")
        }
        assert line == expected
    assert lines[-1]["event"] == "app_auth.verify.failure"
    no_secrets(lines, text)


# --------------------------------------------------------------------------------------------
# Verification and invalid requests


async def test_app_auth_verify_failure_names_the_reason_never_the_token(
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    proxy = await make_proxy(audit_config(issuer, await upstreams.start(echo.app()), tmp_path))
    good = issuer.token(clock.wall())
    rejected = {
        "expired": issuer.token(clock.wall() - 7200),
        "bad_signature": issuer.tampered(good, email="mallory@example.com"),
        "wrong_audience": issuer.token(clock.wall(), aud="another-service"),
        "alg_not_allowed": issuer.unsigned_token(clock.wall()),
    }
    for token in rejected.values():
        resp = await proxy.post("/mcp/apps/a", json={}, headers=bearer(token))
        assert resp.status == 401
    await proxy.post("/mcp/apps/a", json={})  # no token at all: nothing was verified
    failures = audit.events("app_auth.verify.failure")
    assert [f["reason"] for f in failures] == list(rejected)
    for failure in failures:
        assert failure["app"] == "a" and failure["client"] == "127.0.0.1"
        assert "user" not in failure  # never a claim of an unverified token
    assert audit.events("app_auth.verify.success") == []
    assert "mallory" not in audit.logs.text()
    assert echo.seen == []
    no_secrets(audit.events(), audit.logs.text())


INVALID = [
    (b"not json at all", "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call"', "invalid_json"),
    (b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]', "invalid_jsonrpc"),  # a batch
    (b"[]", "invalid_jsonrpc"),
    (b'"tools/call"', "invalid_jsonrpc"),
    (b'{"id":1,"method":"tools/call"}', "invalid_jsonrpc"),  # no jsonrpc member
    (b'{"jsonrpc":"1.0","id":1,"method":"tools/call"}', "invalid_jsonrpc"),
    (b'{"jsonrpc":"2.0","id":1}', "invalid_jsonrpc"),  # neither method nor result/error
    (b'{"jsonrpc":"2.0","method":7}', "invalid_jsonrpc"),
]


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
async def test_post_that_is_not_one_json_rpc_message_is_400_and_audited(
    gzipped: bool,
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    proxy = await make_proxy(audit_config(issuer, await upstreams.start(echo.app()), tmp_path))
    headers = {**bearer(issuer.token(clock.wall())), **JSON_HEADERS}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    for body, _ in INVALID:
        data = gzip.compress(body) if gzipped else body
        await rpc_error(await proxy.post("/mcp/apps/a", data=data, headers=headers), 400)
    events = audit.events("mcp.invalid_request")
    assert [e["reason"] for e in events] == [reason for _, reason in INVALID]
    for event in events:
        assert event["user"] == USER and event["app"] == "a" and event["client"] == "127.0.0.1"
        assert event["method"] == "POST" and event["error"]
        assert "upstream" not in event
    assert echo.seen == []
    assert audit.events("mcp.session.request") == []
    # A client's answer to a server request is one JSON-RPC message too: forwarded, no event.
    answer = {"jsonrpc": "2.0", "id": 5, "result": {}}
    headers.pop("Content-Encoding", None)
    assert (await proxy.post("/mcp/apps/a", json=answer, headers=headers)).status == 200
    assert len(echo.seen) == 1 and len(audit.events("mcp.invalid_request")) == len(INVALID)
    no_secrets(audit.events(), audit.logs.text())


async def test_modern_header_mismatch_is_an_invalid_request(
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """A 2026-07-28 request whose Mcp-Name says echo while its body calls add."""
    echo = Echo()
    proxy = await make_proxy(audit_config(issuer, await upstreams.start(echo.app()), tmp_path))
    headers = {
        **bearer(issuer.token(clock.wall())),
        **JSON_HEADERS,
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
    }
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add"}}
    resp = await proxy.post("/mcp/apps/a", json=rpc, headers=headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == -32020
    [event] = audit.events("mcp.invalid_request")
    assert event["reason"] == "header_mismatch"
    assert audit.events("mcp.session.request") == []
    assert echo.seen == []


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_client_leaving_mid_stream_is_still_audited(
    method: str,
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    hold = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": working\n\n")
        await hold.wait()
        return resp

    up = web.Application()
    up.router.add_route("*", "/mcp", stream)
    url = await upstreams.start(up)
    proxy = await make_proxy(audit_config(issuer, url, tmp_path))
    headers = {**bearer(issuer.token(clock.wall())), **JSON_HEADERS}
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
    try:
        resp = await proxy.request(
            method, "/mcp/apps/a", json=rpc if method == "POST" else None, headers=headers
        )
        async with asyncio.timeout(GUARD):
            assert await resp.content.readuntil(b"\n\n") == b": working\n\n"
        resp.close()  # the client goes away while the upstream still works
        await audit.until(lambda: bool(audit.logs.events("request")))
        [line] = audit.logs.events("request")
        assert line["status"] == 499
        name = "mcp.session.request" if method == "POST" else "mcp.session.listen_stream"
        [event] = audit.events(name)
        assert event["upstream"] == url
    finally:
        hold.set()


async def test_app_auth_verify_failure_names_the_config(
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy(audit_config(issuer, await upstreams.start(Echo().app()), tmp_path))
    bad = issuer.token(clock.wall(), aud="another-service")
    assert (await proxy.post("/mcp/apps/a", json={}, headers=bearer(bad))).status == 401
    [failure] = audit.events("app_auth.verify.failure")
    assert failure["reason"] == "wrong_audience"
    assert failure["config"] == "test-idp"


async def test_audit_file_lines_of_a_turn_are_written_together_and_all_by_close(
    tmp_path: Path,
) -> None:
    """Issue 15: the file's records leave once per loop turn in whole-line writes; closing
    writes what is pending (a SIGTERM drain closes the auditor last), so none is lost."""
    path = tmp_path / "audit.jsonl"
    auditor = Auditor(AuditSettings(file=str(path)))
    for i in range(3):
        auditor.emit("mcp.session.request", user="alice", n=i)
    assert path.read_text() == ""  # pending until the turn ends
    await asyncio.sleep(0)
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [0, 1, 2]
    for i in range(3, 200):  # more than one 4 KiB write's worth, then closed at once
        auditor.emit("mcp.session.request", user="alice", n=i)
    auditor.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(200))


# What the fast JSON encoder refuses, from a client (issue 15: log lines moved to orjson):
# integers outside 64 bits (orjson takes -2**63 .. 2**64-1), as the JSON-RPC id or deep in the
# arguments, and nesting past its 254 levels. Each record must still be written, in the log and
# in the file, as JSON that reads back to what was sent. A lone surrogate (from a \u escape)
# belongs to the class too, but proxyd's strict parser refuses it before any record: a 400.
# (label, JSON-RPC id, arguments, forwarded)
REFUSED_BY_ORJSON: list[tuple[str, Any, Any, bool]] = [
    ("id 2**64, the first unsigned refused", 2**64, {"n": 1}, True),
    ("id -2**63-1, the first signed refused", -(2**63) - 1, {"n": 1}, True),
    ("id far past 64 bits", 2**70, {"n": 2**70}, True),
    ("argument past 64 bits, deep in a list", 7, {"xs": [[1, {"n": -(2**64) - 1}]]}, True),
    ("nesting past 254 levels", 8, {"x": json.loads("[" * 300 + "]" * 300)}, True),
    ("lone surrogate", "id-\ud800", {"text": "\udfff"}, False),
]


async def test_records_orjson_refuses_are_still_written_whole(
    audit: Audit,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    echo = Echo()
    config = audit_config(
        issuer, await upstreams.start(echo.app()), tmp_path, file=str(path), include_arguments=True
    )
    proxy = await make_proxy(config)
    headers = {
        **bearer(issuer.token(clock.wall())),
        **JSON_HEADERS,
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
    }
    sent: list[tuple[Any, Any]] = []
    forwarded: list[bytes] = []
    for label, rpc_id, arguments, passes in REFUSED_BY_ORJSON:
        rpc = {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call"}
        rpc["params"] = {"name": "echo", "arguments": arguments}
        # json.dumps escapes the lone surrogates (ASCII), as a client's JSON would carry them.
        data = json.dumps(rpc).encode()
        resp = await proxy.post("/mcp/apps/a", data=data, headers=headers)
        if passes:
            assert resp.status == 200, (label, await resp.text())
            sent.append((rpc_id, arguments))
            forwarded.append(data)
        else:
            await rpc_error(resp, 400)
    # What reached the app server: each accepted request's own bytes, the refused one not at all.
    assert [seen.body for seen in echo.seen] == forwarded
    logged = audit.events("mcp.session.request")
    assert [(e["id"], e["arguments"]) for e in logged] == sent
    assert [e["arguments_hash"] for e in logged] == [expected_hash(a) for _, a in sent]
    # The file's lines left with their loop turn, before the answers did.
    filed = [json.loads(line) for line in path.read_text().splitlines()]
    filed = [e for e in filed if e["event"] == "mcp.session.request"]
    assert [(e["id"], e["arguments"], e["arguments_hash"]) for e in filed] == [
        (e["id"], e["arguments"], e["arguments_hash"]) for e in logged
    ]
    access = [line for line in audit.logs.lines() if line.get("logger_name") == "proxyd.access"]
    assert len([a for a in access if a["path"] == "/mcp/apps/a"]) == len(REFUSED_BY_ORJSON)
    [invalid] = audit.events("mcp.invalid_request")
    assert invalid["reason"] == "invalid_json" and "lone surrogate" in invalid["error"]
