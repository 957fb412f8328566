"""Issue 10: one reading of every message. Hostile requests and answers through a real proxyd,
with a recording upstream that keeps every byte it receives: a refused request never reaches
it, an allowed one reaches it byte for byte, and no answer lists a tool the session may not use.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.bodies import UTF7_DUAL_BODY
from tests.kit.issuer import TestIssuer
from tests.kit.nodekit import node_upstream, run_client
from tests.kit.proxy import bearer, config, rpc_error
from tests.kit.recording import (
    Answer,
    RawRequest,
    chunked_answer,
    json_answer,
    recording_upstream,
)
from tests.kit.wait import GUARD

Client = TestClient[web.Request, web.Application]

ROLES = [
    {
        "name": "readers",
        "users": ["alice@example.com"],
        "app_labels": {"env": "test"},
        "mcp": {"tools": ["echo", "get_*"]},
        "deny": {"mcp": {"tools": ["delete_everything"]}},
    }
]
DENIED = ("delete_everything", "get_secret\x00", "search_docs")
ALL_TOOLS = [
    {"name": "echo", "inputSchema": {"type": "object"}},
    {"name": "get_time", "inputSchema": {"type": "object"}},
    {"name": "delete_everything", "inputSchema": {"type": "object"}},
    {"name": "search_docs", "inputSchema": {"type": "object"}},
]
ALLOWED_NAMES = ["echo", "get_time"]
JSON = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
OK = json_answer(b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}')


def call(name: str, request_id: Any = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": {}},
    }


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Proxy:
    def __init__(self, client: Client, token: str) -> None:
        self.client = client
        self.token = token

    async def post(
        self, body: bytes, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        all_headers = {**bearer(self.token), **JSON, **(headers or {})}
        return await self.client.post("/mcp/apps/a", data=body, headers=all_headers)


ProxyTo = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def proxy_to(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> ProxyTo:
    """proxyd with ROLES in front of the upstream at ``url``, and a token for alice."""

    async def start(url: str, **sections: Any) -> Proxy:
        doc = config(issuer, {"a": url}, tmp_path, roles=ROLES, **sections)
        return Proxy(await make_proxy(doc), issuer.token(clock.wall()))

    return start


# --------------------------------------------------------------------------------------------
# Requests: one canonical reading of a POST body


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-7",
        "application/json; charset=UTF-7",
        'application/json; charset="utf-7"',
        "application/json; charset=utf-16",
        "application/json; charset=utf-16le",
        "application/json; charset=iso-8859-1",
        "application/json; charset=utf8",  # not the registered name: one library's alias
        "application/json; charset=utf-8; charset=utf-7",
        "application/json; charset=utf-7; charset=utf-8",
        "application/json; foo=bar",
        "application/json;",
        "application/json, text/plain",
        "text/plain",
        "application/jsonx",
        "application/json-rpc",
        "application/x-www-form-urlencoded",
        "",
    ],
)
async def test_a_body_not_declared_utf8_json_is_415_and_never_forwarded(
    content_type: str,
    proxy_to: ProxyTo,
    logs: LogCapture,
) -> None:
    """Finding 1 (critical): body-parser decodes the declared charset (UTF-7 included) while
    proxyd read UTF-8, so one body named `echo` to proxyd and a denied tool upstream."""
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        resp = await proxy.post(compact(call("echo")), {"Content-Type": content_type})
        await rpc_error(resp, 415)
        assert up.requests == []
        assert [e["reason"] for e in logs.events("mcp.invalid_request")] == [
            "unsupported_media_type"
        ]


async def test_missing_or_repeated_content_type_is_415(proxy_to: ProxyTo) -> None:
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        headers = {**bearer(proxy.token), "Accept": JSON["Accept"]}
        body = compact(call("echo"))
        resp = await proxy.client.post("/mcp/apps/a", data=body, headers=headers)
        await rpc_error(resp, 415)  # aiohttp's client sends none for raw bytes
        twice = [*headers.items(), ("Content-Type", "application/json")]
        twice.append(("Content-Type", "application/json; charset=utf-7"))
        resp = await proxy.client.post("/mcp/apps/a", data=body, headers=twice)
        assert resp.status == 400  # aiohttp's parser refuses a repeated Content-Type itself
        assert up.requests == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/json \t; \tcharset=utf-8",
    ],
)
async def test_utf8_json_reaches_the_upstream_byte_for_byte(
    content_type: str,
    proxy_to: ProxyTo,
) -> None:
    body = b'{ "jsonrpc":"2.0", "id":1, "method":"tools/call",\n "params":{"name":"\\u0065cho"}}'
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        resp = await proxy.post(body, {"Content-Type": content_type})
        assert resp.status == 200, await resp.text()
        assert [r.body for r in up.requests] == [body]
        assert up.requests[0].header("Content-Type") == [content_type.strip()]


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbf" + compact(call("echo")),  # a BOM (RFC 8259 8.1)
        compact(call("echo")).replace(b"echo", b"ech\xff"),  # not UTF-8
        compact(call("echo")).replace(b"echo", b"ech\xc3"),  # truncated sequence
        compact(call("echo")).replace(b"echo", b"\xed\xa0\x80echo"),  # an encoded surrogate
        compact(call("echo")).replace(b"echo", b"\xc1\xa5cho"),  # an overlong 'e'
        json.dumps(call("echo")).encode("utf-16"),
        json.dumps(call("echo")).encode("utf-16-le"),
        json.dumps(call("echo")).encode("utf-32"),
        # Duplicate members: proxyd and JSON.parse keep the last, other parsers the first.
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"delete_everything","name":"echo"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping",'
        b'"params":{"name":"delete_everything"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_everything"},'
        b'"params":{"name":"echo"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"delete_everything","n\\u0061me":"echo"}}',
        # The same member in another case: one member to Go's case-insensitive decoder.
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"Name":"delete_everything","name":"echo"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"},'
        b'"PARAMS":{"name":"delete_everything"}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"},'
        '"param\u017f":{"name":"delete_everything"}}'.encode(),
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","Method":"tools/list",'
        b'"params":{"name":"echo"}}',
        # A member a lenient reader takes for one proxyd reads (Go: any case; cJSON: up to a
        # NUL): a "response" to proxyd, a tools/call to Go's SDK.
        b'{"jsonrpc":"2.0","id":0,"METHOD":"tools/call","result":{},'
        b'"params":{"name":"delete_everything"}}',
        b'{"jsonrpc":"2.0","id":0,"Method":"tools/call","error":{"code":1,"message":"x"},'
        b'"params":{"name":"delete_everything"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"delete_everything"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name\\u0000":"delete_everything","name":"echo"}}',
        b'{"jsonrpc":"2.0","id":1,"method\\u0000x":"tools/call","result":{},'
        b'"params":{"name":"delete_everything"}}',
        # A method that is another name to a reader stopping at a NUL or a control character.
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call\\u0000","params":{"name":"delete_everything"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call\\n","params":{"name":"delete_everything"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call ","params":{"name":"delete_everything"}}',
        # Not JSON to JSON.parse, JSON to Python.
        b'{"jsonrpc":"2.0","id":NaN,"method":"tools/call","params":{"name":"echo"}}',
        b'{"jsonrpc":"2.0","id":Infinity,"method":"tools/call","params":{"name":"echo"}}',
        # A lone surrogate: kept, replaced or refused depending on the parser.
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo\\udc00"}}',
        b"[" * 50_000 + b"]" * 50_000,
        # A batch: not MCP since 2025-06-18.
        b"[" + compact(call("echo")) + b"," + compact(call("delete_everything")) + b"]",
        compact(call("echo")) + b" x",
        compact(call("echo")) + b"\x00",
        b"\x0c" + compact(call("echo")),  # form feed: JSON whitespace to nobody
        compact(call("echo")) + b"\xc2\xa0",  # NBSP after the message
    ],
)
async def test_a_body_with_two_readings_is_400_and_never_forwarded(
    body: bytes,
    proxy_to: ProxyTo,
) -> None:
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        resp = await proxy.post(body)
        error = await rpc_error(resp, 400)
        assert error["error"]["code"] == -32600
        assert up.requests == []


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


@pytest.mark.parametrize(
    ("codings", "body"),
    [
        # A second gzip member: Node's zlib reads it, Python's stops at the first.
        (["gzip"], _gzip(compact(call("echo"))) + _gzip(b" ")),
        (["gzip"], _gzip(compact(call("echo"))) + b"trailing"),
        (["gzip"], _gzip(compact(call("echo")))[:-4]),  # cut short
        (["gzip", "gzip"], _gzip(compact(call("echo")))),
        (["identity", "gzip"], _gzip(compact(call("echo")))),
        (["gzip, identity"], _gzip(compact(call("echo")))),
        (["gzip,gzip"], _gzip(_gzip(compact(call("echo"))))),
        (["br"], compact(call("echo"))),
        ([""], compact(call("echo"))),
        (["deflate"], zlib.compress(compact(call("echo"))) + b"x"),
        (["deflate"], zlib.compress(compact(call("echo")), wbits=-15)),  # raw, not RFC 1950
    ],
)
async def test_a_compressed_body_with_two_readings_is_refused(
    codings: list[str],
    body: bytes,
    proxy_to: ProxyTo,
) -> None:
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        headers = [*bearer(proxy.token).items(), *JSON.items()]
        headers += [("Content-Encoding", c) for c in codings]
        resp = await proxy.client.post("/mcp/apps/a", data=body, headers=headers)
        await rpc_error(resp, 400)
        assert up.requests == []


@pytest.mark.parametrize("coding", ["gzip", "deflate", "GZIP", "identity"])
async def test_a_single_complete_coding_passes_compressed(
    coding: str,
    proxy_to: ProxyTo,
) -> None:
    encode: dict[str, Callable[[bytes], bytes]] = {
        "gzip": _gzip,
        "deflate": zlib.compress,
        "identity": bytes,
    }
    body = encode[coding.lower()](compact(call("echo")))
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        resp = await proxy.post(body, {"Content-Encoding": coding})
        assert resp.status == 200, await resp.text()
        assert [r.body for r in up.requests] == [body]
        # ... and a denied tool, compressed, is still denied.
        denied = encode[coding.lower()](compact(call("delete_everything")))
        resp = await proxy.post(denied, {"Content-Encoding": coding})
        assert (await resp.json())["error"]["code"] == -32602
        assert len(up.requests) == 1


@pytest.mark.parametrize(
    "name",
    [
        "get_time\x00",
        "get_\x00delete_everything",
        "get_time\n",
        "get_time\r\ndelete_everything",
        "get_\u0085x",
        "get_time\u200b",
        "get_t\u0131me",  # dotless i
        "get_" + "x" * 125,  # 129 characters
        "get_time ",
        "get_time\t",
        "get_\u202etime",
    ],
)
async def test_tool_names_outside_the_mcp_naming_rules_are_denied(
    name: str,
    proxy_to: ProxyTo,
) -> None:
    """Finding 5: a glob (`get_*`) matched a name with a NUL or a newline."""
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        resp = await proxy.post(compact(call(name)))
        assert resp.status == 200
        assert (await resp.json())["error"]["code"] == -32602
        assert up.requests == []
        resp = await proxy.post(compact(call("get_" + "x" * 124)))  # 128: allowed
        assert resp.status == 200 and len(up.requests) == 1


# --------------------------------------------------------------------------------------------
# Answers: every tool list is filtered


def listed(answer_body: bytes) -> list[str]:
    """Every tool name a lenient reader could find in an answer, JSON or SSE."""
    names: list[str] = []
    texts = [answer_body]
    if b"data:" in answer_body:
        texts = [
            line.partition(b":")[2].strip()
            for line in answer_body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            if line.lstrip(b"\xef\xbb\xbf").startswith(b"data:")
        ]
    for text in texts:
        try:
            message = json.loads(text)
        except ValueError:
            continue
        for m in message if isinstance(message, list) else [message]:
            result = m.get("result") if isinstance(m, dict) else None
            tools = result.get("tools") if isinstance(result, dict) else None
            names += [t["name"] for t in tools or [] if isinstance(t, dict) and "name" in t]
    return names


LIST_ANSWER = {"jsonrpc": "2.0", "id": 2, "result": {"tools": ALL_TOOLS}}


def sse(*messages: Any, start: bytes = b"", nl: bytes = b"\n") -> list[bytes]:
    """Events led by their data line: ``start`` (a BOM) then stands right before ``data:``."""
    return [start] + [b"data: " + compact(m) + nl + b"event: message" + nl + nl for m in messages]


ANSWERS: dict[str, Answer] = {
    "201": json_answer(compact(LIST_ANSWER), "201 Created"),
    "203": json_answer(compact(LIST_ANSWER), "203 Non-Authoritative Information"),
    "206": json_answer(compact(LIST_ANSWER), "206 Partial Content"),
    "400": json_answer(compact(LIST_ANSWER), "400 Bad Request"),
    "404": json_answer(compact(LIST_ANSWER), "404 Not Found"),
    "500": json_answer(compact(LIST_ANSWER), "500 Internal Server Error"),
    "string-id": json_answer(compact({**LIST_ANSWER, "id": "2"})),
    "float-id": json_answer(compact({**LIST_ANSWER, "id": 2.0})),
    "other-id": json_answer(compact({**LIST_ANSWER, "id": 99})),
    "text/plain": json_answer(compact(LIST_ANSWER), content_type="text/plain"),
    "no-type": json_answer(compact(LIST_ANSWER), content_type=""),
    "json-utf16": json_answer(
        json.dumps(LIST_ANSWER).encode("utf-16"), content_type="application/json; charset=utf-16"
    ),
    "json-utf7": json_answer(compact(LIST_ANSWER), content_type="application/json; charset=utf-7"),
    "json-bom": json_answer(b"\xef\xbb\xbf" + compact(LIST_ANSWER)),
    "sse-bom": chunked_answer(sse(LIST_ANSWER, start=b"\xef\xbb\xbf")),
    "sse-bom-split": chunked_answer([b"\xef", b"\xbb", b"\xbf" + sse(LIST_ANSWER)[1]]),
    "sse-201": chunked_answer(sse(LIST_ANSWER), "201 Created"),
    "sse-cr": chunked_answer(sse(LIST_ANSWER, nl=b"\r")),
    "sse-crlf-split": chunked_answer(
        [b"event: message\r", b"\ndata: " + compact(LIST_ANSWER) + b"\r", b"\n\r", b"\n"]
    ),
    "sse-upper-type": chunked_answer(sse(LIST_ANSWER), content_type="Text/Event-Stream"),
    "sse-typed-json": chunked_answer(
        sse(LIST_ANSWER), content_type='application/json; x="text/event-stream"'
    ),
    "sse-multiline": chunked_answer(
        [
            b"data: "
            + json.dumps(LIST_ANSWER, indent=1).encode().replace(b"\n", b"\ndata: ")
            + b"\n\n"
        ]
    ),
    "sse-no-space": chunked_answer([b"data:" + compact(LIST_ANSWER) + b"\n\n"]),
    "sse-escaped": chunked_answer(
        [b"data: " + compact(LIST_ANSWER).replace(b'"tools"', b'"tool\\u0073"') + b"\n\n"]
    ),
    "sse-case": chunked_answer(
        [b"data: " + compact(LIST_ANSWER).replace(b'"tools"', b'"Tools"') + b"\n\n"]
    ),
    "sse-batch": chunked_answer(sse([LIST_ANSWER])),
    "sse-no-end": chunked_answer([b"data: " + compact(LIST_ANSWER)]),
    "sse-dup": chunked_answer(
        [
            b'data: {"jsonrpc":"2.0","id":2,"result":{"tools":[]},"result":'
            + compact(LIST_ANSWER["result"])
            + b"}\n\n"
        ]
    ),
}


@pytest.mark.parametrize("method", ["tools/list", "tools/call", "ping"])
@pytest.mark.parametrize("form", list(ANSWERS))
async def test_no_answer_lists_a_denied_tool(
    form: str,
    method: str,
    proxy_to: ProxyTo,
) -> None:
    """Finding 2: answers with status 201/203, a string id or a BOM-led stream skipped the
    filter. Whatever the request (an answer can be matched by id on another request's
    stream), status, id, media type or framing, no denied tool reaches the client."""
    async with recording_upstream(ANSWERS[form]) as up:
        proxy = await proxy_to(up.url)
        request = {"jsonrpc": "2.0", "id": 2, "method": method}
        if method == "tools/call":
            request["params"] = {"name": "echo"}
        resp = await proxy.post(compact(request))
        body = await resp.read()
        names = listed(body)
        assert not set(names) - set(ALLOWED_NAMES), (form, body[:300])
        assert len(up.requests) == 1
        if form in ("201", "203", "string-id", "sse-bom", "sse-201", "404"):
            assert names == ALLOWED_NAMES  # filtered, not just broken


async def test_a_tools_list_on_a_get_stream_and_a_delete_is_filtered(proxy_to: ProxyTo) -> None:
    async with recording_upstream(chunked_answer(sse(LIST_ANSWER))) as up:
        proxy = await proxy_to(up.url)
        for method in ("GET", "DELETE"):
            headers = {**bearer(proxy.token), "Accept": "text/event-stream"}
            resp = await proxy.client.request(method, "/mcp/apps/a", headers=headers)
            assert listed(await resp.read()) == ALLOWED_NAMES
        assert [r.method for r in up.requests] == ["GET", "DELETE"]


# --------------------------------------------------------------------------------------------
# Bounded client keys


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        ("x" * 12_000, "127.0.0.1"),
        ("198.51.100.7, " + "x" * 12_000, "127.0.0.1"),
        ("x" * 12_000 + ", 198.51.100.7", "198.51.100.7"),
        ("fe80::1%" + "x" * 12_000, "127.0.0.1"),
        ("[fe80::1%eth0]:443", "127.0.0.1"),
        ("203.0.113.9, 10.0.0.1%x, 198.51.100.7", "198.51.100.7"),
        ("203.0.113.9, junk, 127.0.0.2", "127.0.0.2"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
async def test_a_forwarded_hop_that_is_not_an_address_ends_the_walk(
    xff: str,
    client: str,
    proxy_to: ProxyTo,
    logs: LogCapture,
) -> None:
    """Finding 6: a junk hop became the limiter key (+242 MB for 20k requests)."""
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(
            up.url,
            server={"trusted_proxies": ["127.0.0.0/8"], "max_header_size": "64KiB"},
        )
        headers = {"X-Forwarded-For": xff}
        resp = await proxy.client.post("/mcp/apps/a", json=call("echo"), headers=headers)
        assert resp.status == 401  # no token: the limiter was asked with the client's key
        resp = await proxy.post(compact(call("echo")), headers)
        assert resp.status == 200
        assert [line["client"] for line in logs.events("request")] == [client, client]
        # The limiter is asked with the same key the access line and the audit record show.
        audit = logs.events("app_auth.verify.failure") + logs.events("mcp.session.request")
        assert audit and all(event["client"] == client for event in audit)
        assert len(up.requests) == 1


# --------------------------------------------------------------------------------------------
# End to end with the official TypeScript SDK: an express.json() upstream, the SDK's client


async def test_a_utf7_body_never_reaches_an_express_upstream(proxy_to: ProxyTo) -> None:
    """Finding 1 as found: proxyd read UTF-8 and allowed `echo`; express.json() decoded the
    declared UTF-7 and ran `delete_everything`. Now 415, and the upstream runs nothing."""
    async with node_upstream(stateless=True, json_response=True) as up:
        proxy = await proxy_to(up.url)
        for content_type in ("application/json; charset=utf-7", "application/json;charset=UTF-7"):
            resp = await proxy.post(UTF7_DUAL_BODY, {"Content-Type": content_type})
            await rpc_error(resp, 415)
        resp = await proxy.post(UTF7_DUAL_BODY)  # as UTF-8 it is an honest call of echo
        assert resp.status == 200, await resp.text()
        assert [name for name, _ in await up.tools_run()] == ["echo"]


def sdk_answers(tools_list: Answer) -> Answer:
    """An MCP server for the SDK client: initialize, its notification, then ``tools_list``."""

    def answer(request: RawRequest) -> list[bytes]:
        if request.method != "POST":
            return [b"HTTP/1.1 405 Method Not Allowed\r\nAllow: POST\r\nContent-Length: 0\r\n\r\n"]
        message = json.loads(request.body)
        if message.get("method") == "tools/list":
            return tools_list(request)
        if "id" not in message:
            return [b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"]
        result = {
            "protocolVersion": message["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "odd", "version": "1"},
        }
        body = compact({"jsonrpc": "2.0", "id": message["id"], "result": result})
        return json_answer(body)(request)

    return answer


def with_id(form: str) -> Answer:
    """The tools/list answer in ``form``, echoing the request's id (as a string for one)."""

    def answer(request: RawRequest) -> list[bytes]:
        request_id = json.loads(request.body)["id"]
        message = {**LIST_ANSWER, "id": str(request_id) if form == "string-id" else request_id}
        if form in ("201", "203"):
            status = {"201": "201 Created", "203": "203 Non-Authoritative Information"}[form]
            return json_answer(compact(message), status)(request)
        if form == "string-id":
            return json_answer(compact(message))(request)
        start = {"sse-bom": b"\xef\xbb\xbf", "sse-latin1-bom": "\xef\xbb\xbf".encode()}[form]
        return chunked_answer(sse(message, start=start))(request)

    return answer


@pytest.mark.parametrize("form", ["201", "203", "string-id", "sse-bom", "sse-latin1-bom"])
async def test_the_sdk_client_lists_only_allowed_tools(form: str, proxy_to: ProxyTo) -> None:
    """Finding 2 as found: the TypeScript SDK client, through proxyd, listed denied tools from
    a 201 or 203 answer, an answer whose id was "2" for request 2, and an SSE answer led by a
    BOM (and, found since, by the BOM's Latin-1 reading, which its SSE parser also drops)."""
    async with recording_upstream(sdk_answers(with_id(form))) as up:
        proxy = await proxy_to(up.url)
        url = str(proxy.client.make_url("/mcp/apps/a"))
        listing = await run_client(url, proxy.token, "list")
        assert listing["tools"] == ALLOWED_NAMES
        methods = [json.loads(r.body).get("method") for r in up.requests if r.body]
        assert "tools/list" in methods


# --------------------------------------------------------------------------------------------
# Honest statuses


async def test_a_client_gone_before_the_end_of_a_stream_is_499(
    proxy_to: ProxyTo,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 7: a client closing right after the last event made write_eof() raise
    ClientConnectionResetError outside the relay's try: aiohttp logged an unhandled error and
    the access line said 500 while the upstream had answered 200. The moment is forced here
    (the connection closes as write_eof starts: aiohttp itself then raises), the rest is real."""
    original = web.StreamResponse.write_eof

    async def client_gone_first(self: web.StreamResponse, data: bytes = b"") -> None:
        if self.headers.get("Content-Type") == "text/event-stream" and self._req is not None:
            transport = self._req.transport
            assert transport is not None
            transport.close()
        await original(self, data)

    monkeypatch.setattr(web.StreamResponse, "write_eof", client_gone_first)
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}
    async with recording_upstream(chunked_answer(sse(answer))) as up:
        proxy = await proxy_to(up.url)
        with pytest.raises(aiohttp.ClientPayloadError):
            resp = await proxy.post(compact(call("echo")))
            await resp.read()
    [line] = logs.events("request")
    assert (line["status"], line["broken"], line["upstream_status"]) == (
        499,
        "client_disconnected",
        200,
    )
    assert [r.levelname for r in caplog.records if r.name.startswith("aiohttp")] == []
    assert [e["status"] for e in logs.events("mcp.session.request")] == [200]


async def test_a_client_that_stops_sending_its_body_gets_408(proxy_to: ProxyTo) -> None:
    """server.body_timeout: silence while a request body is read (slow-body attacks)."""
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url, server={"body_timeout": "200ms"})
        port = proxy.client.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = compact(call("echo"))
        head = (
            f"POST /mcp/apps/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body[:10])
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD)
            length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answer += await asyncio.wait_for(reader.readexactly(length), GUARD)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert b'"reason":"body_timeout"' in answer
        assert up.requests == []


@pytest.mark.parametrize(
    "fields",
    [
        [("MCP-Protocol-Version", "2025-06-18"), ("MCP-Protocol-Version", "2026-07-28")],
        [("MCP-Protocol-Version", "2026-07-28"), ("MCP-Protocol-Version", "2025-06-18")],
        [("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list")],
        [("Mcp-Name", "echo"), ("Mcp-Name", "delete_everything")],
        [("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")],
        [("Last-Event-ID", "1"), ("Last-Event-ID", "2")],
    ],
    ids=["version-legacy-first", "version-modern-first", "method", "name", "session", "event"],
)
async def test_a_repeated_mcp_field_is_refused_in_either_era(
    fields: list[tuple[str, str]],
    proxy_to: ProxyTo,
) -> None:
    """proxyd reads the first of two fields, Node joins them, others take the last: a second
    MCP-Protocol-Version could switch the era (and skip the header/body check) upstream."""
    async with recording_upstream(OK) as up:
        proxy = await proxy_to(up.url)
        headers = [*bearer(proxy.token).items(), *JSON.items(), *fields]
        resp = await proxy.client.post("/mcp/apps/a", data=compact(call("echo")), headers=headers)
        error = await rpc_error(resp, 400)
        assert error["error"]["code"] == -32020
        assert up.requests == []
