"""What goes up: the client's request as proxyd forwards it, and what may read the answer.

The byte path (proxyd.forward) and the MCP layer (proxyd.mcp) both use these; neither imports
the other. ``BodyFilter`` is the answer reader the forwarder is given (proxyd.mcp.filter's
``ToolsListFilter`` is one): the forwarder knows framing, the filter knows MCP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxyd.errors import PayloadTooLarge, RequestTimeout

HeaderHook = Callable[[CIMultiDict[str]], None]

# RFC 9110 §7.6.1 connection-specific fields, plus the de-facto ones.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Never forwarded from the client: its credentials are for proxyd (MCP authorization: no token
# passthrough), forwarding headers are rebuilt by proxyd, and Host is the upstream's.
_STRIP_REQUEST: Final = HOP_BY_HOP | {
    "authorization",
    "host",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
}


# Field names as istr, made once per name: a CIMultiDict keeps a str key as given, with its
# lower-cased identity beside it, and makes (and keeps) an istr of it the first time its items
# are read (request_head, aiohttp's header writer). Per request that was ~450 bytes for the
# names proxyd adds upstream and ~800 for an answer's, held for a stream's life (issue 15).
_NAMES: dict[str, istr] = {}


def field_name(name: str) -> istr:
    key = _NAMES.get(name)
    if key is None:
        if len(_NAMES) > 256:  # an app server chooses its answer's names: bounded
            _NAMES.clear()
        key = _NAMES[name] = istr(name)
    return key


def connection_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


def request_headers(
    incoming: CIMultiDictProxy[str], extra: Mapping[str, str], identity_header: str
) -> CIMultiDict[str]:
    drop = _STRIP_REQUEST | connection_tokens(incoming.get("Connection"))
    drop |= {identity_header.lower()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    out.update({field_name(name): value for name, value in extra.items()})
    return out


class RequestBody:
    """The client's body, read whole and bounded: MCP requests proxyd must look into.

    A POST carries one JSON-RPC message (read, parsed, decided on: the bytes that go up are the
    bytes proxyd read); GET and DELETE carry none (a body there is refused before this). Being
    in memory, it can be replayed to another server after a failed connect.
    """

    __slots__ = ("_exists", "data")

    def __init__(self, data: bytes, exists: bool) -> None:
        self.data = data
        self._exists = exists

    @classmethod
    def empty(cls) -> RequestBody:
        return cls(b"", False)

    @classmethod
    async def read_all(cls, request: web.Request, limit: int, silence: float) -> RequestBody:
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(too_large(limit))
        if not request.body_exists:
            return cls(b"", declared is not None)
        chunks: list[bytes] = []
        total = 0
        content = request.content
        while True:
            # What has arrived already needs no timer: a small POST usually comes whole with
            # its head, and a timer per read was a measurable share of a request's cost.
            chunk = content.read_nowait()
            if not chunk:
                if content.at_eof():
                    break
                try:
                    # Silence, not total time: a large body on a slow link keeps going while
                    # bytes arrive; a client that stops sending is cut (slow-body attacks).
                    async with asyncio.timeout(silence):
                        chunk = await content.readany()
                except TimeoutError:
                    raise RequestTimeout(
                        f"no request body bytes for {silence:g}s", reason="body_timeout"
                    ) from None
                if not chunk:
                    break
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(too_large(limit))
            chunks.append(chunk)
        return cls(chunks[0] if len(chunks) == 1 else b"".join(chunks), True)

    @property
    def sent(self) -> int:
        return len(self.data)

    def framing(self, method: str) -> str:
        """The framing field of the upstream request (the body always goes in one piece)."""
        if self.data or self._exists:
            return f"Content-Length: {len(self.data)}\r\n"
        # No body. RFC 9110 §8.6: Content-Length: 0 where the method gives content a meaning
        # (what aiohttp's client sent, so upstreams see the same requests as before).
        return "" if method == "GET" else "Content-Length: 0\r\n"


def too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


class EventFilter(Protocol):
    """An SSE answer read event by event: bytes in, the bytes to send now out."""

    @property
    def overflowed(self) -> bool: ...

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class BodyFilter(Protocol):
    """Reads an answer before the client does (proxyd.mcp.filter.ToolsListFilter)."""

    max_answer: int  # a whole (non-SSE) answer larger than this is replaced by error_bytes

    def answer_status(self, status: int) -> None: ...

    def json_body(self, body: bytes) -> bytes: ...

    def error_bytes(self, why: str) -> bytes: ...

    def sse(self) -> EventFilter: ...
