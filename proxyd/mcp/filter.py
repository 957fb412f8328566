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
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r)(?:\r\n|\n|\r)")
MAX_JSON_ANSWER = 16 * 1024 * 1024


class FilterError(Exception):
    pass


class ToolsListFilter:
    def __init__(self, request_id: Any, access: Access) -> None:
        self.request_id = request_id
        self.access = access
        self.removed = 0

    def _filter(self, message: Any) -> Any:
        """The message with denied tools removed, if it is our answer; else unchanged."""
        if not isinstance(message, dict) or message.get("id") != self.request_id:
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
            return json.dumps(self._filter(message), separators=(",", ":")).encode()
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

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(self._buffer):
            out.append(self._event(self._buffer[start : match.end()]))
            start = match.end()
        self._buffer = self._buffer[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return self._event(rest) if rest.strip() else rest

    def _event(self, raw: bytes) -> bytes:
        # Cheap test first: only an event that can be an answer is parsed.
        if b'"result"' not in raw and b'"error"' not in raw:
            return raw
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
        try:
            message = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):
            return raw  # not JSON: not a JSON-RPC answer, so not ours to filter
        if not isinstance(message, dict) or message.get("id") != self._parent.request_id:
            return raw
        try:
            filtered = self._parent._filter(message)
        except FilterError as exc:
            filtered = self._parent.error(str(exc))
        head = b"".join(name + b": " + value + b"\n" for name, value in fields)
        return head + b"data: " + json.dumps(filtered, separators=(",", ":")).encode() + b"\n\n"
