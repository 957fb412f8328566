"""Self-tests for tests/kit/mcpkit.py: SDK client <-> SDK upstream server, no proxy in between."""

from __future__ import annotations

import asyncio
import itertools

import httpx2
import pytest
from mcp import MCPError
from mcp_types import CONNECTION_CLOSED, UNSUPPORTED_PROTOCOL_VERSION, TextContent

from tests.kit.mcpkit import (
    AUTO,
    LEGACY,
    LEGACY_VERSION,
    MODERN,
    MODERN_VERSION,
    Era,
    McpClient,
    ToolCall,
    mcp_client,
    upstream_server,
)

pytestmark = pytest.mark.asyncio

ERAS = [LEGACY, MODERN]
EXPECTED_VERSION = {LEGACY: LEGACY_VERSION, MODERN: MODERN_VERSION}


def _leaves(exc: BaseException) -> list[BaseException]:
    """Flatten (nested) exception groups: errors inside `async with Client` come wrapped."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _text(result: object) -> str:
    content = getattr(result, "content", [])
    assert content, result
    first = content[0]
    assert isinstance(first, TextContent)
    return first.text


@pytest.mark.parametrize("json_response", [False, True])
@pytest.mark.parametrize("mode", ERAS)
async def test_initialize_list_and_call(mode: str, json_response: bool) -> None:
    async with (
        upstream_server(json_response=json_response) as up,
        mcp_client(up.url, "tok-1", mode=mode) as c,
    ):
        assert c.protocol_version == EXPECTED_VERSION[mode]
        tools = await c.list_tools()
        assert {t.name for t in tools.tools} == set(up.tool_names())
        assert _text(await c.call_tool("echo", {"text": "héllo"})) == "héllo"
        result = await c.call_tool("add", {"a": 2, "b": 40})
        assert _text(result) == "42"
        assert result.structured_content == {"result": 42}
        want_ct = "application/json" if json_response else "text/event-stream"
        if mode == MODERN:
            want_ct = "application/json"  # silent handlers never commit SSE at 2026-07-28
        call_responses = [r for r in c.received if r.method == "POST" and r.status == 200]
        assert call_responses[-1].headers["content-type"].startswith(want_ct)
    assert up.calls == [
        ToolCall("echo", {"text": "héllo"}, EXPECTED_VERSION[mode]),
        ToolCall("add", {"a": 2, "b": 40}, EXPECTED_VERSION[mode]),
    ]


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_arrives_one_by_one(mode: str) -> None:
    steps, delay = 4, 0.3
    async with (
        upstream_server() as up,
        mcp_client(up.url, "tok", mode=mode) as c,
    ):
        loop = asyncio.get_running_loop()
        result, events = await c.call_tool_with_progress(
            "progress", {"steps": steps, "delay": delay}
        )
        done_at = loop.time()
    assert _text(result) == "done"
    assert [e.progress for e in events] == [1, 2, 3, 4]
    assert all(e.total == steps for e in events)
    assert events[0].message == "step 1/4"
    gaps = [b.at - a.at for a, b in itertools.pairwise(events)]
    # Streamed, not batched: every notification arrives about `delay` after the last.
    assert all(delay * 0.5 <= g <= delay * 5 for g in gaps), gaps
    assert done_at >= events[-1].at


@pytest.mark.parametrize("mode", ERAS)
async def test_json_response_mode_drops_progress(mode: str) -> None:
    async with (
        upstream_server(json_response=True) as up,
        mcp_client(up.url, "tok", mode=mode) as c,
    ):
        result, events = await c.call_tool_with_progress("progress", {"steps": 3, "delay": 0.05})
    assert _text(result) == "done"
    assert events == []


@pytest.mark.parametrize("json_response", [False, True])
async def test_legacy_session_id_headers_and_delete(json_response: bool) -> None:
    async with upstream_server(json_response=json_response) as up:
        async with mcp_client(up.url, "tok", mode=LEGACY) as c:
            sid = c.session_id
            assert sid
            await c.call_tool("echo", {"text": "x"})
            init = c.sent_for("initialize")[0]
            assert "mcp-session-id" not in init.headers
            assert "mcp-protocol-version" not in init.headers
            for req in c.sent[1:]:
                assert req.headers["mcp-session-id"] == sid
                assert req.headers["mcp-protocol-version"] == LEGACY_VERSION
                assert "mcp-method" not in req.headers
                assert "mcp-name" not in req.headers
            assert init.headers["accept"] == "application/json, text/event-stream"
            # the standalone GET stream is opened after notifications/initialized
            assert any(r.method == "GET" for r in c.sent)
        # the transport DELETEs the session on exit
        deletes = [r for r in c.received if r.method == "DELETE"]
        assert [r.status for r in deletes] == [200]
        seen_delete = [r for r in up.requests if r.method == "DELETE"]
        assert seen_delete[-1].headers["mcp-session-id"] == sid
        methods = [r.method for r in up.rpcs]
        assert methods[:2] == ["initialize", "notifications/initialized"]


async def test_explicit_delete_kills_session() -> None:
    async with (
        upstream_server() as up,
        mcp_client(up.url, "tok", mode=LEGACY) as c,
    ):
        assert await c.delete_session() == 200
        with pytest.raises(MCPError) as err:
            await c.call_tool("echo", {"text": "x"})
        # 404 + JSON-RPC body -> the body's error is surfaced as is
        assert err.value.error.message == "Session not found"
    assert up.calls == []


@pytest.mark.parametrize("mode", [AUTO, MODERN])
async def test_modern_era_is_sessionless_and_labels_requests(mode: str) -> None:
    async with upstream_server() as up:
        async with mcp_client(up.url, "tok", mode=mode) as c:
            assert c.protocol_version == MODERN_VERSION
            assert c.session_id is None
            await c.call_tool("add", {"a": 1, "b": 2})
        if mode == AUTO:
            assert c.sent[0].rpc_method == "server/discover"
        for req in c.sent:
            assert req.method == "POST"
            assert req.headers["mcp-protocol-version"] == MODERN_VERSION
            assert req.headers["mcp-method"] == req.rpc_method
            assert "mcp-session-id" not in req.headers
        call = c.sent_for("tools/call")[0]
        assert call.headers["mcp-name"] == "add"
        # the client lists tools by itself after the first call (output-schema check)
        assert [r.rpc_method for r in c.sent][-2:] == ["tools/call", "tools/list"]
    assert all(r.method == "POST" for r in up.requests)  # no GET stream, no DELETE


async def test_bearer_extra_headers_and_whoami() -> None:
    extra = {"x-proxyd-identity": "alice"}
    async with upstream_server() as up:
        for mode in ERAS:
            async with mcp_client(up.url, "sekrit", extra, mode=mode) as c:
                assert _text(await c.call_tool("whoami", {})) == "alice"
        async with mcp_client(up.url, None, mode=MODERN) as c:
            assert _text(await c.call_tool("whoami", {})) == ""
    with_token = [h for h in up.headers_seen if "authorization" in h]
    assert with_token
    assert all(h["authorization"] == "Bearer sekrit" for h in with_token)
    assert all(h.get("x-proxyd-identity") == "alice" for h in with_token)
    assert "authorization" not in up.headers_seen[-1]


async def test_foreign_host_and_origin_are_accepted() -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": LEGACY_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    headers = {
        "accept": "application/json, text/event-stream",
        "host": "proxy.example:8443",
        "origin": "https://app.example",
    }
    async with upstream_server(json_response=True) as up, httpx2.AsyncClient() as h:
        resp = await h.post(up.url, json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        assert resp.headers["mcp-session-id"]
        assert resp.json()["result"]["protocolVersion"] == LEGACY_VERSION
    assert up.headers_seen[-1]["host"] == "proxy.example:8443"


async def test_stateless_legacy_mode() -> None:
    async with upstream_server(stateless=True) as up:
        async with mcp_client(up.url, "tok", mode=LEGACY) as c:
            assert c.protocol_version == LEGACY_VERSION
            assert c.session_id is None
            assert _text(await c.call_tool("add", {"a": 1, "b": 1})) == "2"
        assert {r.method for r in c.sent} == {"POST"}  # no GET stream, no DELETE
        # the era is picked per request by header, so stateless servers also speak 2026
        async with mcp_client(up.url, "tok", mode=AUTO) as c:
            assert c.protocol_version == MODERN_VERSION


@pytest.mark.parametrize(
    ("era", "mode", "expected"),
    [
        ("legacy", AUTO, LEGACY_VERSION),
        ("legacy", LEGACY, LEGACY_VERSION),
        ("modern", AUTO, MODERN_VERSION),
        ("modern", MODERN, MODERN_VERSION),
    ],
)
async def test_single_era_server_emulation(era: Era, mode: str, expected: str) -> None:
    async with upstream_server(era=era) as up:
        async with mcp_client(up.url, "tok", mode=mode) as c:
            assert c.protocol_version == expected
            assert _text(await c.call_tool("echo", {"text": "e"})) == "e"
        if era == "legacy" and mode == AUTO:
            assert c.sent[0].rpc_method == "server/discover"
            assert c.received[0].status == 400
            assert c.sent[1].rpc_method == "initialize"


@pytest.mark.parametrize(("era", "mode"), [("legacy", MODERN), ("modern", LEGACY)])
async def test_single_era_server_rejects_other_era(era: Era, mode: str) -> None:
    async with upstream_server(era=era) as up:
        with pytest.raises(BaseException) as err:  # leaves checked below
            # mode=MODERN sends nothing on connect; the first request fails instead
            async with mcp_client(up.url, "tok", mode=mode) as c:
                await c.call_tool("echo", {"text": "never"})
    leaves = _leaves(err.value)
    assert any(
        isinstance(e, MCPError) and e.error.code == UNSUPPORTED_PROTOCOL_VERSION for e in leaves
    ), leaves


async def test_stop_and_restart_on_same_port() -> None:
    async with upstream_server() as up:
        port, url = up.port, up.url
        async with mcp_client(up.url, "tok", mode=LEGACY) as c:
            await c.call_tool("echo", {"text": "before"})
            await up.stop()
            assert not up.running
            async with httpx2.AsyncClient() as h:
                with pytest.raises(httpx2.ConnectError):
                    await h.post(url, json={})
            await up.start()
            assert (up.port, up.url) == (port, url)
            # the old session died with the server: 404 -> MCPError, no re-initialize
            with pytest.raises(MCPError) as err:
                await c.call_tool("echo", {"text": "stale"})
            assert err.value.error.message == "Session not found"
        async with mcp_client(up.url, "tok", mode=LEGACY) as fresh:
            assert _text(await fresh.call_tool("echo", {"text": "after"})) == "after"
    assert [call.arguments["text"] for call in up.calls] == ["before", "after"]


@pytest.mark.parametrize("mode", ERAS)
async def test_stop_mid_stream_cuts_the_call(mode: str) -> None:
    async with upstream_server() as up:
        async with mcp_client(up.url, "tok", mode=mode) as c:
            first = asyncio.Event()

            async def on_progress(
                progress: float, total: float | None, message: str | None
            ) -> None:
                first.set()

            call = asyncio.ensure_future(
                c.call_tool("progress", {"steps": 50, "delay": 0.1}, progress_callback=on_progress)
            )
            await asyncio.wait_for(first.wait(), 5)
            await up.stop()
            with pytest.raises(MCPError) as err:
                await asyncio.wait_for(call, 5)
            assert err.value.error.code == CONNECTION_CLOSED
            assert "SSE stream ended" in err.value.error.message
        await up.start()
        async with mcp_client(up.url, "tok", mode=mode) as c2:
            assert _text(await c2.call_tool("echo", {"text": "up"})) == "up"


async def test_client_wrapper_exposes_sdk_objects() -> None:
    async with (
        upstream_server(name="named-up") as up,
        mcp_client(up.url, "tok", mode=LEGACY) as c,
    ):
        assert isinstance(c, McpClient)
        assert c.session.protocol_version == LEGACY_VERSION
        info = c.client.server_info
        assert info is not None
        assert info.name == "named-up"
