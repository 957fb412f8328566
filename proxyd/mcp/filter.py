"""Filtering a ``tools/list`` answer down to the tools a session may call.

Both answer forms of streamable HTTP: ``application/json`` (read whole, bounded) and
``text/event-stream`` (parsed incrementally across chunk boundaries; events other than the
answer — progress notifications, server requests — pass through byte for byte the moment they
are complete). An answer that cannot be parsed becomes a JSON-RPC internal error with the
request's id: never passed unfiltered (Kong 3.13.0.1 fixed exactly that leak).
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxyd.mcp.policy import Access

INTERNAL_ERROR = -32603
# SSE events end with a blank line; any of CRLF, LF or CR ends a line (WHATWG SSE §9.2.5).
# A CR before an LF is never a line ending of its own: else "id: 1\r\ndata: …" read as CR + LF
# (an empty line) and cut every CRLF event after its first line, so a multi-line answer
# escaped the filter in two unparseable halves.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
MAX_JSON_ANSWER = 16 * 1024 * 1024


class FilterError(Exception):
    pass


class ToolsListFilter:
    def __init__(self, request_id: Any, access: Access, *, any_id: bool = False) -> None:
        self.request_id = request_id
        self.access = access
        # A GET stream may replay a tools/list answer of an earlier POST (Last-Event-ID
        # resumption): there every answer with a tools array is filtered, whatever its id.
        self.any_id = any_id
        self.removed = 0

    def _filter(self, message: Any) -> Any:
        """The message with denied tools removed, if it is our answer; else unchanged (the
        same object, so callers can pass the original bytes)."""
        if isinstance(message, list):
            # A batch (2025-03-26 streams may carry them): our answer in it is still filtered.
            out = [self._filter(m) if isinstance(m, dict) else m for m in message]
            return message if all(a is b for a, b in zip(out, message, strict=True)) else out
        if not isinstance(message, dict):
            return message
        if self.any_id:
            result = message.get("result")
            if "id" not in message or not (
                isinstance(result, dict) and isinstance(result.get("tools"), list)
            ):
                return message
        elif message.get("id") != self.request_id:
            return message
        if "error" in message and "result" not in message:
            return message  # errors pass through unchanged
        result = message.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            raise FilterError("tools/list answer has no tools array")
        tools: list[Any] = result["tools"]
        kept = [
            t
            for t in tools
            if isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and self.access.tool_allowed(t["name"])
        ]
        self.removed += len(tools) - len(kept)
        return {**message, "result": {**result, "tools": kept}}

    def error(self, why: str) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "id": self.request_id,
            "error": {
                "code": INTERNAL_ERROR,
                "message": f"proxyd could not filter tools/list: {why}",
            },
        }

    def json_body(self, body: bytes) -> bytes:
        try:
            message = json.loads(body)
            filtered = self._filter(message)
            if filtered is message:
                return body  # not ours to change (an error, another id): the bytes as they came
            return json.dumps(filtered, separators=(",", ":")).encode()
        except (ValueError, RecursionError, FilterError) as exc:
            return json.dumps(self.error(_why(exc)), separators=(",", ":")).encode()

    def sse(self) -> SseFilter:
        return SseFilter(self)


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FilterError) else "answer is not valid JSON"


class SseFilter:
    """Feed raw SSE bytes, get the bytes to send now; events split across chunks are held."""

    def __init__(self, parent: ToolsListFilter) -> None:
        self._parent = parent
        self._buffer = b""
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
            error = self._parent.error("answer too large")
            out.append(b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n")
        return b"".join(out)

    def finish(self) -> bytes:
        self._cr_pending = False
        self._scanned = 0
        rest, self._buffer = self._buffer, b""
        return self._event(rest)[0] if rest.strip() else rest

    def _event(self, raw: bytes) -> tuple[bytes, bool]:
        """The bytes to send for one event, and whether they were rewritten."""
        # Cheap test first: only an event that can be an answer is parsed. A key may be
        # written with \u escapes ("\u0072esult" is "result"): such events are parsed too.
        if b'"result"' not in raw and b'"error"' not in raw and b"\\u" not in raw:
            return raw, False
        fields: list[tuple[bytes, bytes]] = []
        data: list[bytes] = []
        for line in re.split(rb"\r\n|\n|\r", raw):
            if not line or line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(value)
            else:
                fields.append((name, value))
        if not data:
            return raw, False  # nothing a client would dispatch
        try:
            message = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):
            # It mentions a result or an error and is no JSON: maybe our answer, cut short or
            # garbled. Never pass it (it may list denied tools): fail closed.
            filtered: Any = self._parent.error("answer is not valid JSON")
        else:
            try:
                filtered = self._parent._filter(message)
            except FilterError as exc:
                filtered = self._parent.error(str(exc))
            if filtered is message:
                return raw, False  # not ours (another id, an error answer): byte for byte
        head = b"".join(name + b": " + value + b"\n" for name, value in fields)
        data_line = b"data: " + json.dumps(filtered, separators=(",", ":")).encode()
        return head + data_line + b"\n\n", True
