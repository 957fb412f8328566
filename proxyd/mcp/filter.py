"""Tools a session may not call taken out of every answer that lists tools.

Under restricting roles every answer proxyd relays passes here, whatever the request, the
status or the id (issue 10): a client matches a response to its request by id on any stream
(a tools/list sent twice with one id had its answer routed to the other request's stream), and
reads the body of a 201 or 404 as readily as a 200's. So any JSON-RPC response whose ``result``
holds ``tools`` is filtered, and on the answer to a tools/list request every response must be
such a list or an error. Both answer forms of streamable HTTP: ``application/json`` (read
whole, bounded) and ``text/event-stream`` (parsed incrementally by the WHATWG rules; events
that cannot hold a tool list pass through byte for byte the moment they are complete).

What cannot be read exactly as a client would (not UTF-8, a charset other than UTF-8, a
compressed or ambiguous body, duplicate members) becomes a JSON-RPC internal error, never an
unfiltered list (Kong 3.13.0.1 fixed exactly that leak).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from proxyd.mcp import strictjson
from proxyd.mcp.policy import Access

INTERNAL_ERROR = -32603
# SSE events end with a blank line; any of CRLF, LF or CR ends a line (WHATWG SSE §9.2.5).
# A CR before an LF is never a line ending of its own: else "id: 1\r\ndata: …" read as CR + LF
# (an empty line) and cut every CRLF event after its first line, so a multi-line answer
# escaped the filter in two unparseable halves.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_LINE_END = re.compile(rb"\r\n|\n|\r")
# Bytes that may spell a member named "tools" in some reading: the letters in any case (a
# case-insensitive reader takes "TOOLS" or "tool\u017f"), a \u escape, or a NUL (UTF-16/32 text,
# which json.loads(bytes) decodes). Text without any of them cannot list a tool.
_MAY_LIST_TOOLS: Final = re.compile(rb"(?i:tool)|\\u|\x00")
# On a tools/list answer, also any event that may be a response (its result must list tools).
_MAY_ANSWER: Final = re.compile(rb"(?i:tool|result)|\\u|\x00")
_BOM: Final = b"\xef\xbb\xbf"
# The TypeScript SDK's SSE parser (eventsource-parser 3) also drops "\u00ef\u00bb\u00bf" (a BOM
# read as Latin-1, then UTF-8 encoded) at the start of its input, after TextDecoderStream
# dropped a real one: after those six bytes "data:" is a data line to it, an unknown field to
# a WHATWG parser. The filter reads what the most lenient client reads.
_LATIN1_BOM: Final = _BOM.decode("latin-1").encode()
MAX_JSON_ANSWER = 16 * 1024 * 1024


class FilterError(Exception):
    pass


def may_list_tools(data: bytes) -> bool:
    return _MAY_LIST_TOOLS.search(data) is not None


class ToolsListFilter:
    """The filter of one answer. ``request_id``: the id of the request it answers (None for a
    GET stream or a notification), given to the error that replaces an unreadable answer;
    ``strict``: the request was a tools/list, so every response must be a tool list or an
    error."""

    max_answer = MAX_JSON_ANSWER

    def __init__(self, access: Access, *, request_id: Any = None, strict: bool = False) -> None:
        self.access = access
        self.request_id = request_id
        self.strict = strict
        self.removed = 0

    def answer_status(self, status: int) -> None:
        if not 200 <= status < 300:
            # Not the list itself (an error page, a 404 for a stale session): read only for
            # the tools it could carry, passed as it came when it can carry none.
            self.strict = False

    def _filter(self, message: Any) -> Any:
        """The message with denied tools removed; the same object when nothing changed, so
        callers pass the original bytes."""
        if isinstance(message, list):
            # A batch (2025-03-26 streams may carry them): each response in it is filtered.
            out = [self._filter(m) if isinstance(m, dict) else m for m in message]
            return message if all(a is b for a, b in zip(out, message, strict=True)) else out
        if not isinstance(message, dict):
            if self.strict:
                raise FilterError("tools/list answer is not a JSON-RPC response")
            return message
        result_key = strictjson.key_of(message, "result")
        if result_key is None:
            answered = strictjson.key_of(message, "error") is not None
            if self.strict and not answered and strictjson.key_of(message, "method") is None:
                raise FilterError("tools/list answer has neither result nor error")
            return message  # a request, a notification or an error: nothing listed
        result = message[result_key]
        tools_key = strictjson.key_of(result, "tools") if isinstance(result, dict) else None
        if tools_key is None:
            if self.strict:
                raise FilterError("tools/list answer has no tools array")
            return message
        tools = result[tools_key]
        if not isinstance(tools, list):
            raise FilterError("answer has a tools member that is not an array")
        kept = [t for t in tools if self._allowed(t)]
        if len(kept) == len(tools):
            return message
        self.removed += len(tools) - len(kept)
        return {**message, result_key: {**result, tools_key: kept}}

    def _allowed(self, tool: Any) -> bool:
        if not isinstance(tool, dict):
            return False
        name = strictjson.member(tool, "name")
        return isinstance(name, str) and self.access.tool_allowed(name)

    def error(self, why: str, message_id: Any = None) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "id": message_id if message_id is not None else self.request_id,
            "error": {
                "code": INTERNAL_ERROR,
                "message": f"proxyd could not filter the tools of this answer: {why}",
            },
        }

    def error_bytes(self, why: str) -> bytes:
        return _dumps(self.error(why))

    def json_body(self, body: bytes) -> bytes:
        """A whole (non-SSE) answer as the client may receive it."""
        if not self.strict and (not body or not may_list_tools(body)):
            return body  # cannot list a tool (a tools/list answer is always read)
        try:
            message = strictjson.loads(body)
            filtered = self._filter(message)
        except (strictjson.AmbiguousJson, FilterError) as exc:
            return self.error_bytes(_why(exc))
        return body if filtered is message else _dumps(filtered)

    def sse(self) -> SseFilter:
        return SseFilter(self)


def _unmarked(line: bytes) -> bytes:
    """The line without the byte order marks at its start that some client drops.

    WHATWG drops one at the start of the stream only; @microsoft/fetch-event-source decodes
    each field name on its own and so drops one from every line; a client decoding each
    network chunk without ``stream: true`` drops one per chunk. The filter reads a field as
    "data" when any of them does (issue 10, found by the differential tests)."""
    while line.startswith((_BOM, _LATIN1_BOM)):
        line = line[len(_BOM) if line.startswith(_BOM) else len(_LATIN1_BOM) :]
    return line


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _why(exc: BaseException) -> str:
    if isinstance(exc, strictjson.AmbiguousJson):
        why = str(exc)
        return "answer is not valid JSON" + ("" if why == "not valid JSON" else f": {why}")
    return str(exc)


class SseFilter:
    """Feed raw SSE bytes, get the bytes to send now; events split across chunks are held."""

    def __init__(self, parent: ToolsListFilter) -> None:
        self._parent = parent
        self._buffer = b""
        # WHATWG SSE §9.2.5: the stream is UTF-8 decoded, which drops one leading BOM; a
        # client then reads "\ufeffdata:" as "data:" (and see _LATIN1_BOM). Until the first
        # bytes show whether one is there (it may arrive split over chunks), nothing is parsed.
        self._started = False
        # The last event ended on a CR at the end of a chunk: an LF starting the next chunk is
        # the rest of that CRLF. It goes out as it came after a passed-through event, and is
        # dropped after a rewritten one (which ended with its own blank line): the output is
        # then the same however the stream was cut.
        self._cr_pending = False
        self._rewrote = False
        self._scanned = 0  # the buffer before this offset holds no event end (minus overlap)
        self.overflowed = False  # an event outgrew MAX_JSON_ANSWER: the stream must end

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._buffer += chunk
            if len(self._buffer) < len(_BOM + _LATIN1_BOM) and any(
                p.startswith(self._buffer) for p in (_BOM + _LATIN1_BOM, _LATIN1_BOM)
            ):
                return b""
            self._started = True
            chunk, self._buffer = self._buffer, b""
            skip = len(_BOM) if chunk.startswith(_BOM) else 0
            if chunk.startswith(_LATIN1_BOM, skip):
                skip += len(_LATIN1_BOM)
            # Passed on as they came: the client drops them as we do.
            out.append(chunk[:skip])
            chunk = chunk[skip:]
        if self._cr_pending and chunk:
            self._cr_pending = False
            if chunk.startswith(b"\n"):
                if not self._rewrote:
                    out.append(b"\n")
                chunk = chunk[1:]
        self._buffer += chunk
        start = 0
        # Resume the search where the last one stopped (an event end is at most 4 bytes, so 3
        # bytes of overlap): rescanning a long event from its start on every chunk was the
        # main cost of filtering a large SSE answer.
        for match in _EVENT_END.finditer(self._buffer, max(0, self._scanned - 3)):
            emitted, self._rewrote = self._event(self._buffer[start : match.end()])
            out.append(emitted)
            start = match.end()
        if start:
            self._cr_pending = start == len(self._buffer) and self._buffer.endswith(b"\r")
            self._buffer = self._buffer[start:]
        self._scanned = len(self._buffer)
        if len(self._buffer) > MAX_JSON_ANSWER:
            # An event is held until its end, and one that never ends was held without bound
            # (the reader keeps reading while nothing goes to the client). Past the JSON
            # answer's limit it could not be filtered anyway: fail closed with the same error,
            # and the forwarder ends the stream (the rest of that event must not follow).
            self.overflowed = True
            self._buffer = b""
            self._scanned = 0
            out.append(self._error_event("answer too large"))
        return b"".join(out)

    def finish(self) -> bytes:
        self._cr_pending = False
        self._scanned = 0
        rest, self._buffer = self._buffer, b""
        if not self._started:
            return rest  # nothing but (part of) a BOM: no event
        # An unfinished last event is never dispatched by a client (WHATWG: discarded at EOF),
        # but it still goes through the same test: it is passed only if it cannot list a tool.
        return self._event(rest)[0] if rest.strip() else rest

    def _error_event(self, why: str, message_id: Any = None) -> bytes:
        return b"data: " + _dumps(self._parent.error(why, message_id)) + b"\n\n"

    def _event(self, raw: bytes) -> tuple[bytes, bool]:
        """The bytes to send for one event, and whether they were rewritten."""
        pattern = _MAY_ANSWER if self._parent.strict else _MAY_LIST_TOOLS
        if pattern.search(raw) is None:
            return raw, False  # cheap test first: only an event that can list tools is parsed
        fields: list[tuple[bytes, bytes]] = []
        data: list[bytes] = []
        for line in _LINE_END.split(raw):
            if not line or line.startswith(b":"):
                continue
            name, _, value = _unmarked(line).partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(value)
            elif name in (b"event", b"id", b"retry"):
                fields.append((name, value))
        if not data:
            return raw, False  # nothing a client would dispatch
        try:
            message = strictjson.loads(b"\n".join(data))
            filtered = self._parent._filter(message)
        except (strictjson.AmbiguousJson, FilterError) as exc:
            # It may be our answer, cut short, garbled or ambiguous. Never pass it (it may list
            # denied tools): fail closed, keeping the event's id for resumption.
            filtered = self._parent.error(_why(exc))
        else:
            if filtered is message:
                return raw, False  # nothing removed: byte for byte
        head = b"".join(name + b": " + value + b"\n" for name, value in fields)
        return head + b"data: " + _dumps(filtered) + b"\n\n", True
