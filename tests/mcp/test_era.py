"""Both MCP protocol eras on one endpoint; the 2026-07-28 routing-header check; body bounds.

The stateless era (``MCP-Protocol-Version: 2026-07-28``) has no session: any healthy server
takes any request, and a stray ``Mcp-Session-Id`` is dropped. Its routing headers
(``Mcp-Method``, ``Mcp-Name``) must mirror the JSON-RPC body or proxyd answers 400 with
JSON-RPC error -32020 before anything reaches an upstream. Two real SDK upstreams; only time
and randomness are faked.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from tests.kit.mcpkit import (
    LEGACY,
    LEGACY_VERSION,
    MODERN,
    MODERN_VERSION,
    UpstreamServer,
    mcp_client,
)
from tests.kit.sessions import (
    ACCEPT,
    Answer,
    Rig,
    call,
    initialize,
    marks,
    owner_index,
    since,
    text_of,
    url_of,
)

Client = TestClient[web.Request, web.Application]

META_VERSION = "io.modelcontextprotocol/protocolVersion"


def b64name(value: str) -> str:
    return f"=?base64?{base64.b64encode(value.encode()).decode()}?="


def message(
    method: str, params: dict[str, Any] | None = None, version: str | None = MODERN_VERSION
) -> dict[str, Any]:
    """A 2026-07-28 request: every one carries the envelope in ``params._meta`` (the SDK
    server refuses one without it); ``version=None`` leaves the version key out."""
    meta: dict[str, Any] = {
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "0"},
    }
    if version is not None:
        meta[META_VERSION] = version
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": method,
        "params": {**(params or {}), "_meta": meta},
    }


def tool_call(
    name: str, arguments: dict[str, Any], version: str | None = MODERN_VERSION
) -> dict[str, Any]:
    return message("tools/call", {"name": name, "arguments": arguments}, version)


async def modern(
    proxy: Client,
    token: str,
    body: dict[str, Any] | list[Any] | bytes,
    headers: Sequence[tuple[str, str]] | None = None,
    **kwargs: Any,
) -> Answer:
    """A 2026-07-28 POST; ``headers`` default to the routing headers the body calls for."""
    if headers is None:
        assert isinstance(body, dict)
        headers = routing_headers(body)
    sent: CIMultiDict[str] = CIMultiDict(
        [
            ("Authorization", f"Bearer {token}"),
            ("Accept", ACCEPT),
            ("Content-Type", "application/json"),
        ]
    )
    for name, value in headers:
        sent.add(name, value)  # add, not set: some tests repeat a header
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await proxy.post("/mcp/apps/a", data=data, headers=sent, **kwargs)
    return Answer(resp.status, resp.headers, await resp.text())


def routing_headers(body: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("MCP-Protocol-Version", MODERN_VERSION), ("Mcp-Method", body["method"])]
    params = body.get("params") or {}
    key = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(body["method"])
    if key is not None:
        out.append(("Mcp-Name", params[key]))
    return out


def mismatch(answer: Answer) -> str:
    """A 400 with JSON-RPC error -32020 (header/body mismatch); returns its message."""
    assert answer.status == 400, (answer.status, answer.text)
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.message["error"]
    assert error["code"] == -32020, error
    assert error["data"] == {"status": 400, "reason": "header_mismatch"}
    text: str = error["message"]
    return text


def nothing_reached(ups: Sequence[UpstreamServer], mark: Sequence[int]) -> bool:
    return marks(ups) == list(mark)


# --------------------------------------------------------------------------------------------
# Stateless era: any server, no session


async def test_modern_requests_spread_over_both_servers(rig: Rig) -> None:
    proxy = await rig.proxy()
    async with mcp_client(url_of(proxy), rig.token(), mode=MODERN) as c:
        assert c.protocol_version == MODERN_VERSION
        for i in range(24):
            result = await c.call_tool("add", {"a": i, "b": 1})
            assert result.content[0].text == str(i + 1)  # type: ignore[union-attr]
    per_server = [len(up.calls) for up in rig.ups]
    assert sum(per_server) == 24 and all(per_server), per_server  # both took some
    seen = [r for up in rig.ups for r in up.requests]
    assert seen and all(r.method == "POST" for r in seen)
    assert all("mcp-session-id" not in r.headers for r in seen)
    assert all(r.headers["mcp-protocol-version"] == MODERN_VERSION for r in seen)
    assert {r.method for r in c.sent} == {"POST"}  # no GET stream, no DELETE in this era
    assert c.session_id is None


async def test_sdk_modern_client_end_to_end(rig: Rig) -> None:
    proxy = await rig.proxy()
    async with mcp_client(url_of(proxy), rig.token(email="dana@example.com"), mode=MODERN) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert {"echo", "add", "whoami"} <= names
        echoed = await c.call_tool("echo", {"text": "grüße, 世界"})
        assert echoed.content[0].text == "grüße, 世界"  # type: ignore[union-attr]
        assertion = (await c.call_tool("whoami", {})).content[0].text  # type: ignore[union-attr]
        assert assertion.count(".") == 2  # the signed identity assertion reached the tool
    calls = [
        r for up in rig.ups for r in up.requests if r.headers.get("mcp-method") == "tools/call"
    ]
    assert {r.headers["mcp-name"] for r in calls} == {"echo", "whoami"}
    assert all("authorization" not in r.headers for up in rig.ups for r in up.requests)


async def test_default_client_negotiates_modern_through_proxyd(rig: Rig) -> None:
    proxy = await rig.proxy()
    async with mcp_client(url_of(proxy), rig.token()) as c:  # mode AUTO: server/discover
        assert c.protocol_version == MODERN_VERSION
        assert (await c.call_tool("echo", {"text": "auto"})).content[0].text == "auto"  # type: ignore[union-attr]
    assert c.sent[0].rpc_method == "server/discover"
    assert all(r.status == 200 for r in c.received)


@pytest.mark.parametrize("which", ["sealed", "garbage", "upstream"])
async def test_stray_session_id_is_stripped(rig: Rig, which: str) -> None:
    proxy = await rig.proxy()
    token = rig.token()
    mark = marks(rig.ups)
    sealed = await initialize(proxy, token)
    owner = owner_index(rig.ups, mark)
    upstream_id = since(rig.ups, mark)[owner][-1].headers["mcp-session-id"]
    stray = {"sealed": sealed, "garbage": "pxs1.nonsense", "upstream": upstream_id}[which]
    mark = marks(rig.ups)
    body = tool_call("echo", {"text": "stateless"})
    answers = [
        await modern(proxy, token, body, [*routing_headers(body), ("Mcp-Session-Id", stray)])
        for _ in range(12)
    ]
    assert all(text_of(a) == "stateless" for a in answers)
    assert all("Mcp-Session-Id" not in a.headers for a in answers)
    fresh = [r for seen in since(rig.ups, mark) for r in seen]
    assert len(fresh) == 12 and all("mcp-session-id" not in r.headers for r in fresh)
    # not pinned either: the requests spread like any stateless work
    assert all(since(rig.ups, mark)), [len(s) for s in since(rig.ups, mark)]


# --------------------------------------------------------------------------------------------
# The routing-header check


def _bad_cases() -> list[tuple[str, dict[str, Any], list[tuple[str, str]]]]:
    v = ("MCP-Protocol-Version", MODERN_VERSION)
    echo = tool_call("echo", {"text": "x"})
    prompt = message("prompts/get", {"name": "greet"})
    read = message("resources/read", {"uri": "file:///etc/motd"})
    return [
        ("wrong method", echo, [v, ("Mcp-Method", "tools/list"), ("Mcp-Name", "echo")]),
        ("method case", echo, [v, ("Mcp-Method", "Tools/Call"), ("Mcp-Name", "echo")]),
        ("missing method", echo, [v, ("Mcp-Name", "echo")]),
        ("missing method, no name", message("tools/list"), [v]),
        ("wrong name", echo, [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "add")]),
        ("missing name", echo, [v, ("Mcp-Method", "tools/call")]),
        ("empty name", echo, [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "")]),
        (
            "name in body missing",
            message("tools/call", {"arguments": {}}),
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "echo")],
        ),
        (
            "b64 of another name",
            echo,
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", b64name("add"))],
        ),
        (
            "b64 unpadded",
            echo,
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?ZWNobw?=")],
        ),
        (
            "b64 non-canonical bits",
            echo,
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?ZWNobx==?=")],
        ),
        (
            "b64 url-safe alphabet",
            tool_call("\u00ff\u00ff", {}),
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?w7_Dvw==?=")],
        ),
        ("b64 invalid", echo, [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?***?=")]),
        ("b64 not utf-8", echo, [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?/w==?=")]),
        ("prompt wrong name", prompt, [v, ("Mcp-Method", "prompts/get"), ("Mcp-Name", "other")]),
        ("prompt missing name", prompt, [v, ("Mcp-Method", "prompts/get")]),
        ("resource missing uri", read, [v, ("Mcp-Method", "resources/read")]),
        (
            "resource uri mismatch",
            read,
            [v, ("Mcp-Method", "resources/read"), ("Mcp-Name", "file:///etc/passwd")],
        ),
        (
            "duplicate method",
            echo,
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/call"), ("Mcp-Name", "echo")],
        ),
        (
            "duplicate name",
            echo,
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "echo"), ("Mcp-Name", "echo")],
        ),
        (
            "duplicate name, second differs",
            echo,
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "echo"), ("Mcp-Name", "add")],
        ),
        ("duplicate version", echo, [v, v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "echo")]),
        (
            "_meta version disagrees",
            tool_call("echo", {"text": "x"}, LEGACY_VERSION),
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", "echo")],
        ),
        (
            "future version checked too",
            echo,
            [
                ("MCP-Protocol-Version", "2027-01-01"),
                ("Mcp-Method", "tools/list"),
                ("Mcp-Name", "echo"),
            ],
        ),
    ]


BAD = _bad_cases()
# What the 400 says, so a client's user can tell which header is wrong.
WHY = {
    "missing method": "Mcp-Method header is required",
    "missing method, no name": "Mcp-Method header is required",
    "missing name": "Mcp-Name header is required for tools/call",
    "prompt missing name": "Mcp-Name header is required for prompts/get",
    "resource missing uri": "Mcp-Name header is required for resources/read",
    "duplicate method": "Mcp-Method header appears more than once",
    "duplicate name": "Mcp-Name header appears more than once",
    "duplicate name, second differs": "Mcp-Name header appears more than once",
    "duplicate version": "MCP-Protocol-Version header appears more than once",
    "_meta version disagrees": "protocol version",
    "wrong method": "Mcp-Method header does not match",
    "method case": "Mcp-Method header does not match",
    "future version checked too": "Mcp-Method header does not match",
    "resource uri mismatch": "Mcp-Name header does not match the request body's 'uri'",
}


@pytest.mark.parametrize(("case", "body", "headers"), BAD, ids=[c[0] for c in BAD])
async def test_header_body_mismatch_is_400_32020_before_any_upstream(
    rig: Rig, case: str, body: dict[str, Any], headers: list[tuple[str, str]]
) -> None:
    proxy = await rig.proxy()
    mark = marks(rig.ups)
    answer = await modern(proxy, rig.token(), body, headers)
    assert WHY.get(case, "Mcp-Name header does not match") in mismatch(answer)
    assert nothing_reached(rig.ups, mark)


def _good_cases() -> list[tuple[str, dict[str, Any], list[tuple[str, str]] | None, str]]:
    """(case, body, headers or None for the honest ones, what the upstream answers)."""
    v = ("MCP-Protocol-Version", MODERN_VERSION)
    return [
        ("plain", tool_call("echo", {"text": "x"}), None, "text:x"),
        (
            "b64 name",
            tool_call("echo", {"text": "x"}),
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", b64name("echo"))],
            "text:x",
        ),
        # the upstream decodes it too, agrees, and finds no such tool
        (
            "b64 non-ascii name",
            tool_call("grüße/世界", {}),
            [v, ("Mcp-Method", "tools/call"), ("Mcp-Name", b64name("grüße/世界"))],
            "text:Unknown tool: grüße/世界",
        ),
        # no version in _meta is no disagreement: the server, not proxyd, insists on it
        ("_meta without a version", tool_call("echo", {"text": "x"}, None), None, "error:-32602"),
        (
            "resource uri",
            message("resources/read", {"uri": "file:///etc/motd"}),
            None,
            "error:-32602",
        ),
        ("prompt name", message("prompts/get", {"name": "greet"}), None, "error:-32603"),
        ("no name needed", message("tools/list"), None, "tools"),
    ]


GOOD = _good_cases()


@pytest.mark.parametrize(("case", "body", "headers", "expected"), GOOD, ids=[c[0] for c in GOOD])
async def test_matching_headers_are_forwarded(
    rig: Rig,
    case: str,
    body: dict[str, Any],
    headers: list[tuple[str, str]] | None,
    expected: str,
) -> None:
    proxy = await rig.proxy()
    mark = marks(rig.ups)
    answer = await modern(proxy, rig.token(), body, headers)
    fresh = [r for seen in since(rig.ups, mark) for r in seen]
    assert len(fresh) == 1, answer.text  # proxyd forwarded it, once
    got = fresh[0].headers
    assert got["mcp-method"] == body["method"]
    if headers is not None:  # the headers go up byte for byte, encoded form included
        assert got["mcp-name"] == dict(headers)["Mcp-Name"]
    kind, _, value = expected.partition(":")
    reply = answer.message
    if kind == "text":
        assert reply["result"]["content"][0]["text"] == value
    elif kind == "error":  # the upstream's own error, not one of proxyd's
        assert reply["error"]["code"] == int(value) and "reason" not in str(reply["error"])
    else:
        assert {t["name"] for t in reply["result"]["tools"]} >= {"echo", "add"}


async def test_legacy_era_requests_are_not_header_checked(rig: Rig) -> None:
    """A handshake-era version means the 2025 transport: no routing headers defined there."""
    proxy = await rig.proxy()
    token = rig.token()
    sid = await initialize(proxy, token)
    body = tool_call("echo", {"text": "legacy"})
    headers = [
        ("Mcp-Session-Id", sid),
        ("MCP-Protocol-Version", LEGACY_VERSION),
        ("Mcp-Method", "tools/list"),  # would be a mismatch in 2026-07-28
        ("Mcp-Name", "add"),
    ]
    assert text_of(await modern(proxy, token, body, headers)) == "legacy"


# --------------------------------------------------------------------------------------------
# Bodies proxyd must read


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]', "invalid_jsonrpc"),
        (b'"tools/list"', "invalid_jsonrpc"),
        (b'{"jsonrpc":"2.0","id":1,"result":{}}', "invalid_jsonrpc"),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', "invalid_jsonrpc"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    ],
    ids=["broken", "empty", "batch", "scalar", "response", "method not a string", "deep"],
)
async def test_unparseable_modern_bodies_are_400(rig: Rig, body: bytes, reason: str) -> None:
    proxy = await rig.proxy()
    mark = marks(rig.ups)
    headers = [("MCP-Protocol-Version", MODERN_VERSION), ("Mcp-Method", "tools/list")]
    answer = await modern(proxy, rig.token(), body, headers)
    assert answer.status == 400, answer.text
    error = answer.message["error"]
    assert error["code"] == -32600 and error["data"]["reason"] == reason
    assert nothing_reached(rig.ups, mark)


def _sized(size: int) -> bytes:
    """A valid tools/call for echo whose JSON is exactly ``size`` bytes."""
    empty = json.dumps(tool_call("echo", {"text": ""})).encode()
    body = json.dumps(tool_call("echo", {"text": "z" * (size - len(empty))})).encode()
    assert len(body) == size
    return body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_modern_body_over_the_limit_is_413_and_never_forwarded(
    rig: Rig, framing: str
) -> None:
    proxy = await rig.proxy(server={"max_request_body": "2KiB"})
    token = rig.token()
    headers = routing_headers(tool_call("echo", {"text": ""}))

    def framed(body: bytes) -> bytes | AsyncIterator[bytes]:
        if framing == "content-length":
            return body

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(body), 300):
                yield body[offset : offset + 300]

        return chunks()

    mark = marks(rig.ups)
    for size in (2049, 64 * 1024):
        resp = await proxy.post(
            "/mcp/apps/a",
            data=framed(_sized(size)),
            headers=CIMultiDict(
                [
                    ("Authorization", f"Bearer {token}"),
                    ("Accept", ACCEPT),
                    ("Content-Type", "application/json"),
                    *headers,
                ]
            ),
        )
        text = await resp.text()
        assert resp.status == 413, text
        assert json.loads(text)["error"]["data"]["reason"] == "body_too_large"
        if framing == "chunked":
            assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert nothing_reached(rig.ups, mark)
    # exactly at the limit: read, checked and forwarded
    resp = await proxy.post(
        "/mcp/apps/a",
        data=framed(_sized(2048)),
        headers=CIMultiDict(
            [
                ("Authorization", f"Bearer {token}"),
                ("Accept", ACCEPT),
                ("Content-Type", "application/json"),
                *headers,
            ]
        ),
    )
    assert resp.status == 200, await resp.text()
    assert [len(c.arguments["text"]) for up in rig.ups for c in up.calls] == [
        2048 - len(json.dumps(tool_call("echo", {"text": ""})))
    ]


# --------------------------------------------------------------------------------------------
# Both eras at once


async def test_legacy_and_modern_clients_interleaved_on_one_endpoint(rig: Rig) -> None:
    proxy = await rig.proxy()
    url = url_of(proxy)
    async with (
        mcp_client(url, rig.token(email="old@example.com"), mode=LEGACY) as old,
        mcp_client(url, rig.token(email="new@example.com"), mode=MODERN) as new,
    ):
        for i in range(12):
            legacy_result, modern_result = await asyncio.gather(
                old.call_tool("echo", {"text": f"legacy {i}"}),
                new.call_tool("echo", {"text": f"modern {i}"}),
            )
            assert legacy_result.content[0].text == f"legacy {i}"  # type: ignore[union-attr]
            assert modern_result.content[0].text == f"modern {i}"  # type: ignore[union-attr]
        sid = old.session_id
    assert sid is not None and sid.startswith("pxs1.")
    assert new.session_id is None
    legacy_by_server = [
        [r for r in up.requests if r.headers.get("mcp-protocol-version") != MODERN_VERSION]
        for up in rig.ups
    ]
    modern_calls = [[c for c in up.calls if c.protocol_version == MODERN_VERSION] for up in rig.ups]
    [owner] = [i for i, seen in enumerate(legacy_by_server) if seen]  # one server: the session
    [upstream_id] = {r.headers.get("mcp-session-id") for r in legacy_by_server[owner][1:]}
    assert upstream_id and not upstream_id.startswith("pxs1.")
    assert [
        c.arguments["text"] for c in rig.ups[owner].calls if c.protocol_version == LEGACY_VERSION
    ] == [f"legacy {i}" for i in range(12)]
    assert sum(len(calls) for calls in modern_calls) == 12
    assert all(modern_calls), [len(c) for c in modern_calls]  # stateless work on both
    assert [r.method for r in legacy_by_server[owner]][-1] == "DELETE"


async def test_modern_request_does_not_disturb_a_pinned_session(rig: Rig) -> None:
    """The same user, same token: a legacy session and stateless calls side by side."""
    proxy = await rig.proxy()
    token = rig.token()
    mark = marks(rig.ups)
    sid = await initialize(proxy, token)
    owner = owner_index(rig.ups, mark)
    for i in range(6):
        assert text_of(await modern(proxy, token, tool_call("echo", {"text": str(i)}))) == str(i)
        answer = await call(proxy, token, sid, "add", {"a": i, "b": 0})
        assert text_of(answer) == str(i)
    legacy_calls = [[c for c in up.calls if c.protocol_version == LEGACY_VERSION] for up in rig.ups]
    assert [len(c) for c in legacy_calls] == [6 if i == owner else 0 for i in range(2)]
