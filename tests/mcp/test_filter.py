"""tools/list filtering (proxyd.mcp.filter and Forwarder._filtered), on both answer forms.

Unit tests drive ToolsListFilter and SseFilter with bytes: every way a stream can be cut into
chunks, the three SSE line endings, events that are not the answer (byte for byte, at once),
answers that cannot be filtered (a JSON-RPC internal error, never the unfiltered list).
HTTP tests run proxyd with a role that allows ``echo`` but not ``add`` in front of aiohttp
upstreams the test controls; every wait is on an event, under a guard, never a sleep.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxyd.mcp.filter import INTERNAL_ERROR, MAX_JSON_ANSWER, ToolsListFilter
from proxyd.mcp.policy import Access, ToolMatcher
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import Client, access_lines, bearer, config
from tests.kit.wait import GUARD

SSE = "text/event-stream"
ID = 7
ECHO = {"name": "echo", "description": "Return the text unchanged.", "inputSchema": {}}
ADD = {"name": "add", "description": "Add two integers.", "inputSchema": {}}
PROGRESS = {"name": "progress", "inputSchema": {"type": "object"}}
ALL_TOOLS = [ECHO, ADD, PROGRESS]
# What a session allowed `echo` and `prog*` sees; `add` is never allowed.
KEPT = [ECHO, PROGRESS]


def access() -> Access:
    return Access(True, [ToolMatcher(["echo", "prog*"])], [ToolMatcher(["add"])])


def tools_filter(request_id: Any = ID, *, strict: bool = True) -> ToolsListFilter:
    return ToolsListFilter(access(), request_id=request_id, strict=strict)


def answer(tools: list[Any], request_id: Any = ID, **result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": {"tools": tools, **result}}


def compact(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def internal_error(data: bytes, request_id: Any = ID) -> None:
    """``data`` is a JSON-RPC internal error for the request, naming no tool at all."""
    message = json.loads(data)
    assert message["jsonrpc"] == "2.0"
    assert message["id"] == request_id
    assert message["error"]["code"] == INTERNAL_ERROR == -32603
    assert "proxyd could not filter the tools" in message["error"]["message"]
    assert "result" not in message
    for name in (b"echo", b"add", b"progress"):
        assert name not in data


# --------------------------------------------------------------------------------------------
# A reference SSE parser (WHATWG HTML §9.2.6), to check what a client would dispatch


def dispatched(stream: bytes) -> list[tuple[str, str, str]]:
    """(event type, data, last event id) of every event a browser would dispatch."""
    events: list[tuple[str, str, str]] = []
    kind, data, last_id = "", "", ""
    lines = re.split(r"\r\n|\n|\r", stream.decode())
    for line in lines[:-1]:  # the last piece has no line ending: never processed
        if not line:
            if data:
                events.append((kind or "message", data.removesuffix("\n"), last_id))
            kind, data = "", ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data += value + "\n"
        elif name == "id" and "\0" not in value:
            last_id = value
    return events


def event(*lines: str | bytes, nl: bytes = b"\n") -> bytes:
    encoded = [line.encode() if isinstance(line, str) else line for line in lines]
    return nl.join(encoded) + nl + nl


def progress_data(step: int) -> str:
    params = {"progressToken": 1, "progress": step, "total": 3, "message": 'a "result" soon'}
    return json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})


def answer_lines(message: Any) -> list[str]:
    """The answer as multi-line data, cut where JSON allows whitespace."""
    text = json.dumps(message, indent=1)
    return ["data: " + line for line in text.split("\n")]


def stream_events(nl: bytes) -> tuple[list[bytes], int]:
    """A stream of a tools/list answer among other events; also the answer's index."""
    events = [
        event(": a comment, then a retry", "retry: 3000", nl=nl),
        event("id: 1", "event: message", "data: " + progress_data(1), nl=nl),
        event(b": keep-alive", nl=nl),
        event("id: 2", "event: message", *answer_lines(answer(ALL_TOOLS)), nl=nl),
        event("id: 3", "data: " + progress_data(3), nl=nl),
        event("event: other", "data: " + json.dumps(answer([], request_id=1)), nl=nl),
    ]
    return events, 3


def filtered_answer_event() -> bytes:
    return b"id: 2\nevent: message\ndata: " + compact(answer(KEPT)) + b"\n\n"


def expected_stream(nl: bytes) -> bytes:
    events, at = stream_events(nl)
    events[at] = filtered_answer_event()
    return b"".join(events)


NEWLINES = pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])


# --------------------------------------------------------------------------------------------
# JSON answers


def test_json_answer_keeps_only_allowed_tools_and_everything_else() -> None:
    odd = {"name": "echo2"}  # not allowed: exact entries are exact
    message = answer([ECHO, ADD, odd, PROGRESS], nextCursor="c-2", _meta={"k": "v"})
    message["extra"] = {"kept": True}
    f = tools_filter()
    out = json.loads(f.json_body(json.dumps(message, indent=2).encode()))
    assert out == {**message, "result": {"tools": KEPT, "nextCursor": "c-2", "_meta": {"k": "v"}}}
    assert f.removed == 2


def test_json_tools_without_a_usable_name_are_dropped() -> None:
    tools: list[Any] = [ECHO, "echo", {"name": 3}, {"title": "echo"}, None, ["echo"]]
    assert json.loads(tools_filter().json_body(compact(answer(tools)))) == answer([ECHO])


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"Method not found"}}',
        # An error answer mentioning tools passes as is: it lists none.
        b'{ "jsonrpc" : "2.0", "id" : 7, "error" : {"code": -1, "message": "add failed"} }',
        b'{"jsonrpc":"2.0","method":"notifications/message","params":{"tools":"add"}}',
        # Nothing removed: the bytes as they came.
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"echo"}]}}',
    ],
    ids=["error", "error-spaced", "notification", "all-allowed"],
)
def test_json_answers_not_to_filter_pass_unchanged(body: bytes) -> None:
    f = tools_filter()
    assert f.json_body(body) == body  # not even re-encoded
    assert f.removed == 0


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"add"},',  # truncated
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":{"add":{}}}}',  # tools not an array
        b'{"jsonrpc":"2.0","id":7,"result":{"add":{}}}',  # no tools at all
        b'{"jsonrpc":"2.0","id":7,"result":[{"name":"add"}]}',  # result not an object
        b'{"jsonrpc":"2.0","id":7}',  # neither result nor error
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"\xff"}]}}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any parser goes
    ],
    ids=["empty", "text", "truncated", "object", "no-tools", "list", "bare", "utf8", "deep"],
)
def test_json_answer_that_cannot_be_filtered_is_an_internal_error(body: bytes) -> None:
    internal_error(tools_filter().json_body(body))


@pytest.mark.parametrize("strict", [True, False], ids=["tools-list", "any-request"])
@pytest.mark.parametrize("other_id", [8, "7", 7.0, None, "x", [7]], ids=repr)
def test_json_answer_with_any_id_is_filtered(other_id: Any, strict: bool) -> None:
    """A client matches "7" to its request 7 (issue 10), and answers may arrive on another
    request's stream: whatever the id, a listed tool is filtered."""
    out = json.loads(tools_filter(strict=strict).json_body(compact(answer(ALL_TOOLS, other_id))))
    assert out == answer(KEPT, other_id)


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":7,"Result":{"tools":[{"name":"add"}]}}',
        b'{"jsonrpc":"2.0","id":7,"result":{"TOOLS":[{"name":"add"}]}}',
        b'{"jsonrpc":"2.0","id":7,"result":{"tool\\u0073":[{"name":"add"}]}}',
        '{"jsonrpc":"2.0","id":7,"result":{"tool\u017f":[{"name":"add"}]}}'.encode(),
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"NAME":"add"}]}}',
    ],
    ids=["Result", "TOOLS", "escaped", "long-s", "NAME"],
)
def test_json_members_in_another_case_are_read_as_a_case_insensitive_client_reads_them(
    body: bytes,
) -> None:
    """Go's encoding/json matches member names ignoring case (with Unicode folding)."""
    for strict in (True, False):
        out = json.loads(tools_filter(strict=strict).json_body(body))
        result = next(v for k, v in out.items() if k.casefold() == "result")
        tools = next(v for k, v in result.items() if k.casefold() == "tools")
        assert tools == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[]},"result":{"tools":[{"name":"add"}]}}',
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[],"Tools":[{"name":"add"}]}}',
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"echo","name":"add"}]}}',
        b'\xef\xbb\xbf{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"add"}]}}',
        '{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"add"}]}}'.encode("utf-16"),
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"add"}]},"x":NaN}',
        b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"add\\ud800"}]}}',
    ],
    ids=["dup-result", "dup-tools-case", "dup-name", "bom", "utf-16", "nan", "lone-surrogate"],
)
def test_json_answer_with_two_readings_is_an_internal_error(body: bytes) -> None:
    for strict in (True, False):
        internal_error(tools_filter(strict=strict).json_body(body))


def test_json_batch_answer_is_filtered_too() -> None:
    """An answer inside a JSON array is still the answer (a 2025-03-26 server may batch)."""
    batch = [answer(ALL_TOOLS, request_id=6), answer(ALL_TOOLS)]
    out = json.loads(tools_filter().json_body(compact(batch)))
    assert out == [answer(KEPT, request_id=6), answer(KEPT)]


# --------------------------------------------------------------------------------------------
# SSE answers


@NEWLINES
def test_sse_answer_is_filtered_and_everything_else_passes_byte_for_byte(nl: bytes) -> None:
    events, _ = stream_events(nl)
    f = tools_filter()
    sse = f.sse()
    out = sse.feed(b"".join(events)) + sse.finish()
    assert out == expected_stream(nl)
    assert f.removed == 1
    # What a client dispatches: the same events, the same ids and types, the answer filtered.
    before, after = dispatched(b"".join(events)), dispatched(out)
    assert len(before) == len(after) == 4
    assert after[1] == (before[1][0], json.dumps(answer(KEPT), separators=(",", ":")), "2")
    assert [e for i, e in enumerate(after) if i != 1] == [e for i, e in enumerate(before) if i != 1]


@NEWLINES
def test_sse_output_is_the_same_however_the_stream_is_cut(nl: bytes) -> None:
    events, _ = stream_events(nl)
    stream = b"".join(events)
    expected = expected_stream(nl)

    def run(cuts: list[int]) -> bytes:
        sse = tools_filter().sse()
        bounds = [0, *cuts, len(stream)]
        out = b"".join(sse.feed(stream[a:b]) for a, b in itertools.pairwise(bounds))
        return out + sse.finish()

    assert run(list(range(1, len(stream)))) == expected  # one byte at a time
    for cut in range(1, len(stream)):  # every single boundary
        assert run([cut]) == expected, f"cut at {cut}: {stream[cut - 2 : cut + 2]!r}"
    rng = random.Random(5)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
        assert run(cuts) == expected, cuts


@NEWLINES
def test_sse_events_are_emitted_as_soon_as_they_are_complete(nl: bytes) -> None:
    """Events other than the answer are never held back waiting for it (or for more bytes)."""
    events, at = stream_events(nl)
    sse = tools_filter().sse()
    for i, raw in enumerate(events):
        head = raw.removesuffix(nl)  # all but the blank line that ends it
        assert sse.feed(head) == b"", "an event was emitted before its blank line"
        out = sse.feed(nl)
        assert out == (filtered_answer_event() if i == at else raw)
    # A CRLF split between its CR and LF ends the event on the CR already; the LF follows.
    if nl == b"\r\n":
        raw = event("data: " + progress_data(2), nl=nl)
        assert sse.feed(raw[:-1]) == raw[:-1]
        assert sse.feed(raw[-1:]) == b"\n"
    assert sse.finish() == b""


@NEWLINES
def test_sse_multi_line_answer_data_is_filtered(nl: bytes) -> None:
    raw = event("event: message", *answer_lines(answer(ALL_TOOLS)), nl=nl)
    out = tools_filter().sse().feed(raw)
    assert out == b"event: message\ndata: " + compact(answer(KEPT)) + b"\n\n"


@NEWLINES
def test_sse_error_answers_pass_byte_for_byte_and_foreign_ones_are_filtered(nl: bytes) -> None:
    error = {"jsonrpc": "2.0", "id": ID, "error": {"code": -32601, "message": "no tools"}}
    raw = event("id: 9", "data: " + json.dumps(error), nl=nl)
    f = tools_filter()
    sse = f.sse()
    assert sse.feed(raw) == raw
    for other in (ID + 1, str(ID)):
        foreign = event("data: " + json.dumps(answer(ALL_TOOLS, request_id=other)), nl=nl)
        assert sse.feed(foreign) == event(b"data: " + compact(answer(KEPT, request_id=other)))
    assert f.removed == 2


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4])
def test_sse_stream_starting_with_a_bom_is_read_as_a_client_reads_it(cut: int) -> None:
    """WHATWG SSE: UTF-8 decoding drops one leading BOM, so "\\ufeffdata:" is a data line
    to a client (issue 10: the filter read the field name "\\ufeffdata" and passed it)."""
    stream = b"\xef\xbb\xbf" + event(b"data: " + compact(answer(ALL_TOOLS)))
    for strict in (True, False):
        sse = tools_filter(strict=strict).sse()
        out = sse.feed(stream[:cut]) + sse.feed(stream[cut:]) + sse.finish()
        assert out == b"\xef\xbb\xbf" + event(b"data: " + compact(answer(KEPT)))
    # A second BOM is part of the field name to a WHATWG parser, but a client that decodes
    # each line (or chunk) on its own drops it too: read as data, filtered.
    sse = tools_filter(strict=False).sse()
    twice = b"\xef\xbb\xbf" + stream
    assert sse.feed(twice) + sse.finish() == b"\xef\xbb\xbf" + event(
        b"data: " + compact(answer(KEPT))
    )


@pytest.mark.parametrize(
    "data",
    [
        '{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"add"},',  # cut short
        '{"jsonrpc":"2.0","id":7,"result":{"add":{"name":"add"}}}',  # no tools array
        '{"jsonrpc":"2.0","id":7,"result":{"tools":{"add":1}}}',
    ],
    ids=["truncated", "no-tools", "tools-object"],
)
def test_sse_answer_that_cannot_be_filtered_is_an_internal_error(data: str) -> None:
    out = tools_filter().sse().feed(event("id: 4", "data: " + data))
    assert out.startswith(b"id: 4\ndata: ") and out.endswith(b"\n\n")
    internal_error(out.removeprefix(b"id: 4\ndata: ").removesuffix(b"\n\n"))


def test_sse_answer_with_escaped_keys_is_still_filtered() -> None:
    r"""``"\u0072esult"`` is "result" to every JSON parser: a cheap byte test must not miss it."""
    data = compact(answer(ALL_TOOLS)).replace(b'"result"', b'"\\u0072esult"')
    assert json.loads(data) == answer(ALL_TOOLS)
    assert tools_filter().sse().feed(b"data: " + data + b"\n\n") == event(
        b"data: " + compact(answer(KEPT))
    )


def test_sse_batch_answer_is_filtered_too() -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
        answer(ALL_TOOLS),
    ]
    out = tools_filter().sse().feed(event("data: " + json.dumps(batch)))
    assert json.loads(out.removeprefix(b"data: ")) == [batch[0], answer(KEPT)]


def test_sse_finish_with_a_partial_event() -> None:
    # Not the answer: its bytes as they came (a client drops an event that never ended).
    sse = tools_filter().sse()
    partial = b"id: 5\r\ndata: " + progress_data(1).encode()
    assert sse.feed(partial) == b""
    assert sse.finish() == partial
    # The answer without its blank line: still filtered, never passed as it came.
    f = tools_filter()
    sse = f.sse()
    assert sse.feed(b"event: message\ndata: " + compact(answer(ALL_TOOLS)) + b"\n") == b""
    assert sse.finish() == b"event: message\ndata: " + compact(answer(KEPT)) + b"\n\n"
    assert f.removed == 1
    # The answer cut short by the end of the stream: an internal error, not its tool names.
    sse = tools_filter().sse()
    assert sse.feed(b"data: " + compact(answer(ALL_TOOLS))[:40]) == b""
    internal_error(sse.finish().removeprefix(b"data: ").removesuffix(b"\n\n"))
    # Nothing left, or only line endings: nothing invented.
    sse = tools_filter().sse()
    assert sse.feed(event("data: x")) == event("data: x")
    assert sse.finish() == b""
    assert sse.feed(b"\r") == b"" and sse.finish() == b"\r"


# --------------------------------------------------------------------------------------------
# Through proxyd

ROLES = [
    {
        "name": "echo-only",
        "users": ["alice@example.com"],
        "app_labels": {"env": "test"},
        "mcp": {"tools": ["echo", "prog*"]},
        "deny": {"mcp": {"tools": ["add"]}},
    }
]
LIST = {"jsonrpc": "2.0", "id": ID, "method": "tools/list"}
ACCEPT = {"Accept": f"application/json, {SSE}", "Content-Type": "application/json"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def seen() -> list[web.Request]:
    return []


@pytest.fixture
def proxy_for(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    seen: list[web.Request],
) -> Callable[..., Awaitable[Client]]:
    async def make(handler: Handler, *, roles: Any = ROLES, **runner: Any) -> Client:
        async def record(request: web.Request) -> web.StreamResponse:
            seen.append(request)
            return await handler(request)

        up = web.Application()
        up.router.add_route("*", "/mcp", record)
        url = await upstreams.start(up, **runner)
        return await make_proxy(config(issuer, {"a": url}, tmp_path, roles=roles))

    return make


async def post_list(client: Client, token: str, **headers: str) -> aiohttp.ClientResponse:
    return await client.post(
        "/mcp/apps/a", json=LIST, headers={**bearer(token), **ACCEPT, **headers}
    )


async def test_sse_answer_among_progress_events_is_filtered_without_delay(
    proxy_for: Callable[..., Awaitable[Client]], issuer: TestIssuer, clock: FakeClock
) -> None:
    """The upstream sends a notification and waits until the client has it (through proxyd)
    before it sends anything more: proxyd held nothing back. Then the answer, filtered."""
    notified = asyncio.Event()
    first = event("id: 1", "event: message", "data: " + progress_data(1), nl=b"\r\n")
    last = event("id: 3", "event: message", "data: " + progress_data(3), nl=b"\r\n")
    answer_raw = event("id: 2", "event: message", *answer_lines(answer(ALL_TOOLS)), nl=b"\r\n")

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        await resp.write(first)
        await notified.wait()
        cuts = [0, 13, len(answer_raw) - 3, len(answer_raw) - 1, len(answer_raw)]
        for a, b in itertools.pairwise(cuts):  # one event in pieces, CR|LF cut too
            await resp.write(answer_raw[a:b])
        await resp.write(last)
        await resp.write_eof()
        return resp

    client = await proxy_for(stream)
    async with asyncio.timeout(GUARD):
        resp = await post_list(client, issuer.token(clock.wall()))
        assert resp.status == 200
        assert resp.headers["Content-Type"] == SSE
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert await resp.content.readuntil(b"\r\n\r\n") == first
        notified.set()
        rest = await resp.content.read()
    assert rest == filtered_answer_event() + last
    events = dispatched(first + rest)
    assert [json.loads(e[1]).get("id") for e in events] == [None, ID, None]
    assert json.loads(events[1][1])["result"]["tools"] == KEPT


async def test_json_answer_is_filtered_with_a_correct_content_length(
    proxy_for: Callable[..., Awaitable[Client]],
    issuer: TestIssuer,
    clock: FakeClock,
    logs: LogCapture,
) -> None:
    async def json_answer(request: web.Request) -> web.StreamResponse:
        rpc = await request.json()
        return web.json_response(answer(ALL_TOOLS, request_id=rpc["id"]))

    client = await proxy_for(json_answer)
    resp = await post_list(client, issuer.token(clock.wall()))
    body = await resp.read()
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in resp.headers
    assert json.loads(body) == answer(KEPT)
    [line] = access_lines(logs)
    assert line["status"] == 200 and line["bytes_out"] == len(body)


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_json_answer_arriving_in_many_reads_is_filtered_whole(
    chunked: bool,
    proxy_for: Callable[..., Awaitable[Client]],
    issuer: TestIssuer,
    clock: FakeClock,
) -> None:
    """2 MiB cannot come in one socket read: proxyd must read to the end before it parses."""
    many = [{**ECHO, "name": f"prog-{i}", "description": "d" * 2100} for i in range(1000)]
    body = compact(answer([ADD, *many, ECHO]))
    assert len(body) > 2 * 1024 * 1024

    async def json_answer(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 100_000):
            await resp.write(body[i : i + 100_000])
        await resp.write_eof()
        return resp

    client = await proxy_for(json_answer)
    resp = await post_list(client, issuer.token(clock.wall()))
    assert resp.status == 200
    tools = (await resp.json())["result"]["tools"]
    assert [t["name"] for t in tools] == [f"prog-{i}" for i in range(1000)] + ["echo"]


async def test_json_answer_over_the_limit_is_an_internal_error(
    proxy_for: Callable[..., Awaitable[Client]], issuer: TestIssuer, clock: FakeClock
) -> None:
    padding = b" " * (MAX_JSON_ANSWER + 1 - len(compact(answer(ALL_TOOLS))))
    body = compact(answer(ALL_TOOLS)) + padding  # valid JSON, one byte too many

    async def json_answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    client = await proxy_for(json_answer)
    resp = await post_list(client, issuer.token(clock.wall()))
    assert resp.status == 200
    internal_error(await resp.read())


async def test_sse_event_that_never_ends_is_not_held_without_bound(
    proxy_for: Callable[..., Awaitable[Client]], issuer: TestIssuer, clock: FakeClock
) -> None:
    """An event is held until its blank line; one that grows past the JSON limit without
    ending must not be held for ever (proxyd's memory, whatever the client's speed): it ends
    the stream with an internal error, as an over-long JSON answer does."""
    done = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        await resp.write(b'data: {"jsonrpc":"2.0","id":7,"result":{"tools":[')
        piece = b" " * (1 << 20)
        for _ in range(MAX_JSON_ANSWER // len(piece) + 2):
            await resp.write(piece)
        await done.wait()  # never ends the event
        return resp

    client = await proxy_for(stream)
    try:
        async with asyncio.timeout(GUARD):
            resp = await post_list(client, issuer.token(clock.wall()))
            assert resp.status == 200
            body = await resp.content.read()
    finally:
        done.set()
    events = dispatched(body)
    assert len(events) == 1
    internal_error(events[0][1].encode())


async def test_filtered_request_asks_for_identity_encoding(
    proxy_for: Callable[..., Awaitable[Client]],
    issuer: TestIssuer,
    clock: FakeClock,
    seen: list[web.Request],
) -> None:
    """proxyd must read the answer, so it asks for it uncompressed; other requests keep the
    client's Accept-Encoding."""

    async def json_answer(request: web.Request) -> web.StreamResponse:
        rpc = await request.json()
        if rpc["method"] == "tools/list":
            return web.json_response(answer(ALL_TOOLS))
        return web.json_response({"jsonrpc": "2.0", "id": rpc["id"], "result": {}})

    client = await proxy_for(json_answer)
    token = issuer.token(clock.wall())
    resp = await post_list(client, token, **{"Accept-Encoding": "gzip, deflate"})
    assert resp.status == 200
    assert (await resp.json()) == answer(KEPT)
    call = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "echo"}}
    headers = {**bearer(token), **ACCEPT, "Accept-Encoding": "gzip, deflate"}
    assert (await client.post("/mcp/apps/a", json=call, headers=headers)).status == 200
    # "identity", not absent: no Accept-Encoding would mean "any coding" (RFC 9110 §12.5.3).
    # Every answer is read under restricting roles (issue 10), the tools/call's too.
    assert [r.headers.getall("Accept-Encoding", []) for r in seen] == [
        ["identity"],
        ["identity"],
    ]


@pytest.mark.parametrize("content_type", ["application/json", SSE])
async def test_compressed_answer_is_never_passed_unfiltered(
    content_type: str,
    proxy_for: Callable[..., Awaitable[Client]],
    issuer: TestIssuer,
    clock: FakeClock,
) -> None:
    """An upstream that compresses anyway (RFC 9110 lets it, with no Accept-Encoding): proxyd
    cannot filter what it cannot read, so the client gets an error, not the compressed list."""
    data = compact(answer(ALL_TOOLS))
    plain = data if content_type != SSE else b"data: " + data + b"\n\n"
    compressed = gzip.compress(plain)

    async def gzip_answer(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=compressed, headers={"Content-Type": content_type, "Content-Encoding": "gzip"}
        )

    client = await proxy_for(gzip_answer)
    resp = await post_list(client, issuer.token(clock.wall()), **{"Accept-Encoding": "gzip"})
    raw = await resp.read()
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert compressed not in raw and plain not in raw
    internal_error(raw)


@pytest.mark.parametrize("status", [400, 401, 404, 500, 503])
async def test_non_200_answers_pass_through(
    status: int,
    proxy_for: Callable[..., Awaitable[Client]],
    issuer: TestIssuer,
    clock: FakeClock,
) -> None:
    """No JSON-RPC answer to filter: they pass as they came (a filter would make this one,
    which is no JSON, an internal error)."""
    body = b"upstream says no"

    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status, body=body, headers={"Content-Type": "text/plain", "X-Up": "1"}
        )

    client = await proxy_for(refuse)
    resp = await post_list(client, issuer.token(clock.wall()))
    assert resp.status == status
    assert await resp.read() == body
    assert resp.headers["Content-Type"] == "text/plain"
    assert resp.headers["X-Up"] == "1"


async def test_filtered_answer_carries_the_sealed_session_id(
    proxy_for: Callable[..., Awaitable[Client]], issuer: TestIssuer, clock: FakeClock
) -> None:
    """A 2025-era tools/list answer is still the session's: its Mcp-Session-Id is sealed like
    every other answer's, never the upstream's own id."""

    async def json_answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(answer(ALL_TOOLS), headers={"Mcp-Session-Id": "up-s-1"})

    client = await proxy_for(json_answer)
    resp = await post_list(client, issuer.token(clock.wall()))
    assert resp.status == 200
    assert (await resp.json()) == answer(KEPT)
    sealed = resp.headers["Mcp-Session-Id"]
    assert sealed.startswith("pxs1.") and "up-s-1" not in sealed


@pytest.mark.parametrize("roles", [None, [{**ROLES[0], "mcp": {"tools": ["*"]}, "deny": {}}]])
async def test_unrestricted_sessions_get_the_answer_byte_for_byte(
    roles: Any,
    proxy_for: Callable[..., Awaitable[Client]],
    issuer: TestIssuer,
    clock: FakeClock,
    seen: list[web.Request],
) -> None:
    """No roles, or a role allowing every tool: nothing to filter, nothing parsed."""
    body = b'{ "jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "add"}]} }'

    async def json_answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    client = await proxy_for(json_answer, roles=roles or [])
    resp = await post_list(client, issuer.token(clock.wall()), **{"Accept-Encoding": "gzip"})
    assert await resp.read() == body
    assert seen[0].headers["Accept-Encoding"] == "gzip"
