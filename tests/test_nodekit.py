"""The Node test kit works on its own (no proxyd): tests/kit/nodekit.py and tests/node/*.mjs.

Also pins down the readings proxyd must match or refuse: body-parser decodes a POST body in the
charset its Content-Type names (a UTF-7 body runs another tool than its UTF-8 reading names),
the SDK client strips one leading BOM from answers, and its SSE parser strips more than the
WHATWG rules say.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.kit.bodies import UTF7_DUAL_BODY
from tests.kit.nodekit import JsonReader, NodeClientError, node_upstream, run_client

TOKEN = "nodekit-test-token-4f1d"  # a test value; must never be printed
ALL_TOOLS = ["echo", "get_time", "get_secret", "delete_everything", "search_docs"]
BOM = b"\xef\xbb\xbf"


def loads_unique(text: str | bytes) -> Any:
    """json.loads that fails on a duplicate key (to show a reading has none)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        assert len(keys) == len(set(keys)), f"duplicate key in {keys}"
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs)


def tools_list_answer(request_id: object, names: list[str]) -> bytes:
    tools = [{"name": name, "inputSchema": {"type": "object"}} for name in names]
    message = {"jsonrpc": "2.0", "id": request_id, "result": {"tools": tools}}
    return json.dumps(message).encode()


@pytest.fixture(scope="module")
def reader() -> Iterator[JsonReader]:
    with JsonReader() as r:
        yield r


# --- upstream + client ---------------------------------------------------------------------


@pytest.mark.parametrize("stateless", [True, False], ids=["stateless", "stateful"])
@pytest.mark.parametrize("json_response", [True, False], ids=["json", "sse"])
async def test_the_upstream_runs_what_the_sdk_client_calls(
    stateless: bool, json_response: bool
) -> None:
    async with node_upstream(stateless=stateless, json_response=json_response) as up:
        assert up.url.startswith("http://127.0.0.1:") and up.url.endswith("/mcp")
        listed = await run_client(up.url, TOKEN, "list")
        assert listed == {"tools": ALL_TOOLS}
        called = await run_client(up.url, TOKEN, "call", "echo", json.dumps({"text": "hi"}))
        assert called == {"result": {"content": [{"type": "text", "text": "hi"}]}}
        assert await up.tools_run() == [("echo", {"text": "hi"})]

        calls = await up.calls()
        bodies = [c["body"] for c in calls if c["kind"] == "body" and c["http_method"] == "POST"]
        assert [b.get("method") for b in bodies] == [
            "initialize",
            "notifications/initialized",
            "tools/list",
            "initialize",
            "notifications/initialized",
            "tools/call",
        ]
        rpcs = [c["message"] for c in calls if c["kind"] == "rpc"]
        assert rpcs[-1]["params"] == {"name": "echo", "arguments": {"text": "hi"}}
        if not stateless:
            assert all(c["session_id"] for c in calls if c["kind"] in ("rpc", "tool"))

        await up.clear_calls()
        assert await up.calls() == []


async def test_client_sends_the_bearer_token_and_never_prints_it() -> None:
    async with node_upstream(stateless=True, json_response=True) as up:
        # The token comes back in the tool's answer: the client redacts it.
        called = await run_client(up.url, TOKEN, "call", "echo", json.dumps({"text": TOKEN}))
        assert TOKEN not in json.dumps(called)
        assert called["result"]["content"][0]["text"] == "<redacted>"
        assert await up.tools_run() == [("echo", {"text": TOKEN})]


async def test_client_reports_tool_errors_and_fails_on_connection_errors() -> None:
    async with node_upstream(stateless=True, json_response=False) as up:
        unknown = await run_client(up.url, TOKEN, "call", "no_such_tool", "{}")
        assert unknown["result"]["isError"] is True
        with pytest.raises(NodeClientError) as refused:
            await run_client(f"{up.base_url}/not-mcp", TOKEN, "list")
        assert refused.value.returncode == 2
        assert "(code 404)" in refused.value.stderr
        assert TOKEN not in refused.value.stderr


# --- the charset differential ----------------------------------------------------------------


def test_the_utf7_body_has_two_readings_without_duplicate_keys() -> None:
    as_utf8 = loads_unique(UTF7_DUAL_BODY)
    as_utf7 = loads_unique(UTF7_DUAL_BODY.decode("utf-7"))
    assert as_utf8["params"]["name"] == "echo"
    assert as_utf7["params"]["name"] == "delete_everything"
    assert UTF7_DUAL_BODY.isascii()


def test_body_parser_decodes_the_charset_the_content_type_names(reader: JsonReader) -> None:
    as_utf8 = reader.read_request(UTF7_DUAL_BODY)
    assert (as_utf8["ok"], as_utf8["method"], as_utf8["name"]) == (True, "tools/call", "echo")
    for content_type in (
        "application/json; charset=utf-7",
        "Application/JSON;Charset=UTF-7",
        'application/json; charset="utf-7"',
        "application/json; charset=utf-7; charset=utf-8",  # the first one wins
    ):
        as_utf7 = reader.read_request(UTF7_DUAL_BODY, content_type)
        assert (as_utf7["ok"], as_utf7["name"], as_utf7["sdk_ok"]) == (
            True,
            "delete_everything",
            True,
        ), content_type
    # A charset that does not start with "utf-" is refused; so is one iconv-lite lacks.
    latin1 = reader.read_request(UTF7_DUAL_BODY, "application/json; charset=latin1")
    assert (latin1["ok"], latin1["status"], latin1["type"]) == (False, 415, "charset.unsupported")
    unknown = reader.read_request(UTF7_DUAL_BODY, "application/json; charset=utf-9")
    assert (unknown["ok"], unknown["status"]) == (False, 415)
    # UTF-16 with its BOM: decoded, BOM dropped.
    call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_time"}}'
    utf16 = reader.read_request(call.decode().encode("utf-16"), "application/json; charset=utf-16")
    assert (utf16["ok"], utf16["name"]) == (True, "get_time")


async def test_express_runs_the_tool_of_the_utf7_reading() -> None:
    """The attack proxyd must stop: a gateway reading UTF-8 audits echo, the upstream runs
    delete_everything."""
    async with node_upstream(stateless=True, json_response=True) as up:
        async with aiohttp.ClientSession() as session:
            for content_type in ("application/json; charset=utf-7", "application/json"):
                async with session.post(
                    up.url,
                    data=UTF7_DUAL_BODY,
                    headers={
                        "Content-Type": content_type,
                        "Accept": "application/json, text/event-stream",
                    },
                ) as response:
                    assert response.status == 200
                    answer = await response.json()
                    assert "result" in answer, answer
        ran = await up.tools_run()
        assert [name for name, _ in ran] == ["delete_everything", "echo"]
        assert ran[0][1] == {"text": ""}
        bodies = [c for c in await up.calls() if c["kind"] == "body"]
        assert bodies[0]["content_type"] == "application/json; charset=utf-7"
        assert bodies[0]["body"]["params"]["name"] == "delete_everything"
        assert bodies[1]["body"]["params"]["name"] == "echo"


# --- reading requests, answers and streams ---------------------------------------------------


def test_read_request(reader: JsonReader) -> None:
    call = (
        b'{"jsonrpc":"2.0","id":7,"method":"tools/call",'
        b'"params":{"name":"echo","arguments":{"text":"x"}}}'
    )
    read = reader.read_request(call)
    assert read == {
        "ok": True,
        "method": "tools/call",
        "name": "echo",
        "id": 7,
        "has_id": True,
        "arguments": {"text": "x"},
        "batch": False,
        "messages": [{"method": "tools/call", "name": "echo", "id": 7, "has_id": True}],
        "sdk_ok": True,
    }
    # One leading BOM is stripped by iconv-lite (also split over chunks); a second one is not.
    assert reader.read_request(BOM + call) == read
    assert reader.read_request([b"\xef", b"\xbb", b"\xbf" + call[:5], call[5:]]) == read
    twice = reader.read_request(BOM + BOM + call)
    assert (twice["ok"], twice["status"], twice["type"]) == (False, 400, "entity.parse.failed")
    # Duplicate keys: the last one wins, as in Python's json.
    dup = reader.read_request(b'{"method":"tools/list","method":"tools/call","id":1}')
    assert dup["method"] == "tools/call"
    # Invalid UTF-8 is replaced, never refused.
    bad = reader.read_request(call.replace(b"echo", b"ec\xffho"))
    assert bad["name"] == "ec\ufffdho"
    # Strict mode: an empty body is {} and a non-object/array top level is a 400.
    assert reader.read_request(b"")["messages"] == [
        {"method": None, "name": None, "id": None, "has_id": False}
    ]
    assert reader.read_request(b'"tools/call"')["status"] == 400
    # Not application/json: express.json() leaves the body alone.
    assert reader.read_request(call, "text/plain")["skipped"] is True
    assert reader.read_request(call, None)["skipped"] is True
    batch = reader.read_request(b"[" + call + b"," + call + b"]")
    assert (batch["batch"], batch["name"], len(batch["messages"])) == (True, None, 2)


def test_read_answer(reader: JsonReader) -> None:
    answer = tools_list_answer(2, ["echo", "delete_everything"])
    read = reader.read_answer(answer)
    assert read["ok"] is True
    assert read["messages"] == 1
    assert read["tools"] == read["sdk_tools"] == ["echo", "delete_everything"]
    assert read["ids"] == [2]
    # response.json() strips a leading BOM. Node 20's undici strips up to TWO (its
    # utf8DecodeBytes drops one, then its TextDecoder, made without ignoreBOM, another one);
    # a third one is a JSON syntax error.
    assert reader.read_answer(BOM + answer) == read
    assert reader.read_answer(BOM * 3 + answer)["ok"] is False
    # An id of another type is kept as sent (the SDK client matches Number(id)).
    assert reader.read_answer(tools_list_answer("2", ["echo"]))["ids"] == ["2"]
    batch = reader.read_answer(b"[" + answer + b"," + tools_list_answer(3, ["get_time"]) + b"]")
    assert (batch["messages"], batch["sdk_tools"]) == (2, ["echo", "delete_everything", "get_time"])
    # A tool entry the SDK's schema refuses: the raw reading has it, Client.listTools() fails.
    broken = reader.read_answer(b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"x"}]}}')
    assert (broken["tools"], broken["sdk_tools"]) == (["x"], None)
    assert reader.read_answer(b"not json")["ok"] is False


def test_read_sse(reader: JsonReader) -> None:
    answer = tools_list_answer(2, ["echo", "delete_everything"])
    stream = b"event: message\nid: e1\ndata: " + answer + b"\n\n"
    read = reader.read_sse(stream)
    assert read == {
        "ok": True,
        "events": [
            {
                "event": "message",
                "id": "e1",
                "jsonrpc_id": 2,
                "tools": ["echo", "delete_everything"],
                "sdk_reads": True,
                "sdk_tools": ["echo", "delete_everything"],
            }
        ],
        "unparsed": 0,
        "dispatched": 1,
        "sdk_tools": ["echo", "delete_everything"],
    }
    # CR, LF, CRLF line ends; data lines joined with LF; comments ignored; any chunking.
    cut = answer.index(b",") + 1  # data lines are joined with "\n": cut between JSON tokens
    framed = b": hi\r\nevent: message\rid: e1\r\ndata: " + answer[:cut] + b"\ndata:" + answer[cut:]
    framed += b"\r\n\r\n"
    assert reader.read_sse(framed)["sdk_tools"] == ["echo", "delete_everything"]
    assert reader.read_sse([framed[i : i + 1] for i in range(len(framed))]) == reader.read_sse(
        framed
    )
    # Other event types are parsed but not read by the SDK; undispatched tails are dropped.
    other = reader.read_sse(b"event: other\ndata: " + answer + b"\n\ndata: " + answer)
    assert [e["sdk_reads"] for e in other["events"]] == [False]
    assert other["sdk_tools"] is None
    assert reader.read_sse(b"data: {nope\n\n")["unparsed"] == 1


def test_read_sse_strips_a_leading_bom(reader: JsonReader) -> None:
    """The SDK client's TextDecoderStream strips one leading U+FEFF (as the WHATWG rules say),
    so `data:` after a UTF-8 BOM is read: the event proxyd must see too."""
    answer = tools_list_answer(2, ["echo", "delete_everything"])
    plain = reader.read_sse(b"data: " + answer + b"\n\n")
    assert plain["sdk_tools"] == ["echo", "delete_everything"]
    assert reader.read_sse(BOM + b"data: " + answer + b"\n\n") == plain
    assert reader.read_sse([b"\xef\xbb", b"\xbf", b"data: " + answer + b"\n\n"]) == plain
    # A second BOM stays: the field is "\ufeffdata", unknown, nothing is dispatched.
    twice = reader.read_sse(BOM + BOM + b"data: " + answer + b"\n\n")
    assert (twice["dispatched"], twice["sdk_tools"]) == (0, None)
    # A BOM anywhere but at the very start is not stripped either.
    later = reader.read_sse(b"\n" + BOM + b"data: " + answer + b"\n\n")
    assert later["sdk_tools"] is None


def test_read_sse_also_strips_the_bom_read_as_latin1(reader: JsonReader) -> None:
    """Beyond the WHATWG rules: eventsource-parser drops the three characters U+00EF U+00BB
    U+00BF (a UTF-8 BOM misread as Latin-1; UTF-8 bytes C3 AF C2 BB C2 BF) at the start of its
    first chunk. A WHATWG parser reads the field name "ï»¿data" (unknown, ignored); the SDK
    client reads the event."""
    answer = tools_list_answer(2, ["echo", "delete_everything"])
    read = reader.read_sse("ï»¿".encode() + b"data: " + answer + b"\n\n")
    assert read["sdk_tools"] == ["echo", "delete_everything"]
    # Only at the start of the stream's first decoded chunk.
    later = reader.read_sse(b"\n" + "ï»¿".encode() + b"data: " + answer + b"\n\n")
    assert later["sdk_tools"] is None


def test_read_http_answer(reader: JsonReader) -> None:
    answer = tools_list_answer(2, ["echo", "delete_everything"])
    sse = b"data: " + answer + b"\n\n"
    for status in (200, 201, 203, 206, 299):
        read = reader.read_http_answer(status, "text/event-stream", sse)
        assert (read["outcome"], read["sdk_tools"]) == ("sse", ["echo", "delete_everything"])
    # The media type is parsed and lowercased, parameters ignored (charset too).
    read = reader.read_http_answer(200, "Application/JSON; charset=utf-16", answer)
    assert (read["outcome"], read["media_type"], read["sdk_tools"]) == (
        "json",
        "application/json",
        ["echo", "delete_everything"],
    )
    assert reader.read_http_answer(202, "application/json", answer)["outcome"] == "accepted"
    for status in (199, 300, 400, 404, 500):
        assert reader.read_http_answer(status, "application/json", answer)["outcome"] == (
            "http_error"
        )
    for content_type in (None, "text/plain", "application/json, text/event-stream"):
        read = reader.read_http_answer(200, content_type, answer)
        assert read["outcome"] == "unexpected_content_type", content_type
