"""The streaming forwarder: request body up, response down, each chunk flushed as it arrives.

The upstream side is proxyd's own HTTP/1.1 client (proxyd/upstream.py), which raises proxyd
errors only. Bytes pass untouched (no decompression, no re-encoding); Content-Length is kept
when the upstream gives one, chunked otherwise. A client that goes away cancels the handler
(aiohttp ``handler_cancellation``), which closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxyd.config import UpstreamSettings
from proxyd.errors import ConnectFailed, PayloadTooLarge, UpstreamError, UpstreamTimeout
from proxyd.mcp.filter import MAX_JSON_ANSWER, SseFilter, ToolsListFilter
from proxyd.metrics import Metrics
from proxyd.upstream import Connection, UpstreamClient, request_head

__all__ = ["ConnectFailed", "Forwarder", "Outcome", "RequestBody", "request_headers"]

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
_STRIP_RESPONSE: Final = HOP_BY_HOP | {"content-length"}


@dataclass(slots=True)
class Outcome:
    """What happened upstream, for the access log."""

    upstream: str
    app: str = ""
    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    broken: str | None = None


# Bodies up to this size with a known length are moved in one piece (see Forwarder.forward).
SMALL_BODY: Final = 64 * 1024


def _connection_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


def request_headers(
    incoming: CIMultiDictProxy[str], extra: Mapping[str, str], identity_header: str
) -> CIMultiDict[str]:
    drop = _STRIP_REQUEST | _connection_tokens(incoming.get("Connection"))
    drop |= {identity_header.lower()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    out.update(extra)
    return out


@dataclass(slots=True)
class AnswerHead:
    """The upstream's fields as they go to the client, and the framing facts taken from them."""

    headers: CIMultiDict[str]
    length: int | None
    chunked: bool
    sse: bool


def response_headers(upstream: Iterable[tuple[str, str]]) -> AnswerHead:
    fields = list(upstream)
    tokens: set[str] = set()
    for name, value in fields:
        if name.lower() == "connection":
            tokens |= _connection_tokens(value)
    drop = _STRIP_RESPONSE | tokens if tokens else _STRIP_RESPONSE
    out: CIMultiDict[str] = CIMultiDict()
    length: int | None = None
    chunked = sse = False
    for name, value in fields:
        lower = name.lower()
        if lower not in drop:
            out.add(name, value)
            if lower == "content-type":
                sse = value.startswith("text/event-stream")
        elif lower == "content-length":
            length = int(value)  # llhttp refused anything but one valid number
        elif lower == "transfer-encoding":
            chunked = chunked or "chunked" in value.lower()
    return AnswerHead(out, length, chunked, sse)


class _BodyCounter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.too_large = False

    async def stream(self, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        async for chunk in content.iter_any():
            self.total += len(chunk)
            if self.total > self.limit:
                self.too_large = True
                raise PayloadTooLarge(_too_large(self.limit))
            yield chunk


class RequestBody:
    """The client's body for one or more upstream attempts.

    Small bodies with a known length are read whole (and so can be replayed after a failed
    connect); others stream once, and only a body not yet started may go to another server.
    """

    def __init__(self, request: web.Request, limit: int, preread: bytes | None = None) -> None:
        self._request = request
        self._counter = _BodyCounter(limit)
        self._bytes = preread
        self.declared = request.content_length
        if preread is not None:
            self._counter.total = len(preread)

    @classmethod
    async def of(cls, request: web.Request, limit: int) -> RequestBody:
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(_too_large(limit))
        if request.body_exists and declared is not None and declared <= SMALL_BODY:
            # A typical JSON-RPC message: read it whole (bounded by its Content-Length) and
            # send it with the head in one write.
            return cls(request, limit, await request.read())
        return cls(request, limit)

    @classmethod
    async def read_all(cls, request: web.Request, limit: int) -> RequestBody:
        """The whole body in memory, bounded: for requests proxyd must look into."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(_too_large(limit))
        if declared is not None and not request.body_exists:
            return cls(request, limit, b"")
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(_too_large(limit))
            chunks.append(chunk)
        return cls(request, limit, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    @property
    def data(self) -> bytes | None:
        return self._bytes

    @property
    def sent(self) -> int:
        return self._counter.total

    @property
    def too_large(self) -> bool:
        return self._counter.too_large

    @property
    def replayable(self) -> bool:
        return self._bytes is not None or self._counter.total == 0

    def upstream(self, method: str) -> tuple[bytes | None, AsyncIterator[bytes] | None, str]:
        """What goes upstream: the whole body or a stream of it, and its framing field."""
        body = self._bytes
        if body is not None and (body or self._request.body_exists):
            return body, None, f"Content-Length: {len(body)}\r\n"
        if body is None and self._request.body_exists:
            stream = self._counter.stream(self._request.content)
            if self.declared is not None:
                return None, stream, f"Content-Length: {self.declared}\r\n"
            # Length unknown (a chunked client body): chunked upstream too (RFC 9112 §7.1).
            return None, stream, "Transfer-Encoding: chunked\r\n"
        # No body. RFC 9110 §8.6: Content-Length: 0 where the method gives content a meaning
        # (what aiohttp's client sent, so upstreams see the same requests as before).
        return None, None, "" if method == "GET" else "Content-Length: 0\r\n"


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


def _body_done(conn: Connection, task: asyncio.Task[None]) -> None:
    """A streamed request body stopped: if it failed, so did the exchange."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        label = conn.origin.label
        conn.fail_request(UpstreamError(f"upstream {label} failed: request body broke off"))


class Forwarder:
    def __init__(
        self,
        client: UpstreamClient,
        settings: UpstreamSettings,
        max_body: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self._streams = metrics.open_streams if metrics is not None else None
        self._max_body = max_body
        self._connect_timeout = settings.connect_timeout
        self._idle_timeout = settings.idle_timeout  # between reads, never a total timeout

    async def forward(
        self,
        request: web.Request,
        target: str,
        headers: CIMultiDict[str],
        outcome: Outcome,
        body: RequestBody,
        on_response: HeaderHook | None = None,
        tools_filter: ToolsListFilter | None = None,
    ) -> web.StreamResponse:
        """Send the request to ``target`` and relay the answer.

        Raises ConnectFailed when no connection could be made (the caller may try another
        server if ``body.replayable``), other UpstreamErrors when it failed later.
        """
        client = self._client
        origin = client.origin(target)
        data, stream, framing = body.upstream(request.method)
        # The raw query, never the decoded one: decoding and re-encoding changes bytes (and
        # meaning: %20 came back as "+"), and an upstream may sign or compare them.
        head = request_head(
            request.method, origin, request.rel_url.raw_query_string, headers.items(), framing
        )
        conn = client.pooled(origin) or await client.connect(origin, self._connect_timeout)
        sender: asyncio.Task[None] | None = None
        try:
            conn.send(head, data, self._idle_timeout)
            if stream is not None:
                # The body goes up while the answer is awaited: an upstream may answer (and
                # stop reading) before the body's end.
                sender = asyncio.ensure_future(conn.send_stream(stream, "chunked" in framing))
                sender.add_done_callback(partial(_body_done, conn))
            await conn.head()
            outcome.status = conn.status
            outcome.bytes_up = body.sent
            if tools_filter is not None and conn.status == 200:
                return await self._filtered(request, conn, outcome, tools_filter, on_response)
            return await self._relay(request, conn, outcome, on_response)
        except UpstreamError:
            if body.too_large:
                raise PayloadTooLarge(_too_large(self._max_body)) from None
            raise
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            conn.finish()

    async def _relay(
        self,
        request: web.Request,
        upstream: Connection,
        outcome: Outcome,
        on_response: HeaderHook | None,
    ) -> web.StreamResponse:
        answer = response_headers(upstream.headers)
        if on_response is not None:
            on_response(answer.headers)
        length = answer.length
        if length is not None and length <= SMALL_BODY and not answer.chunked and not answer.sse:
            return await self._whole(upstream, outcome, answer.headers)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        out.headers.extend(answer.headers)
        if length is not None and not answer.chunked:
            out.content_length = length
        if answer.sse:
            # Tell any buffering proxy in front of us (nginx) to pass events through at once.
            out.headers["X-Accel-Buffering"] = "no"
        return await self._stream(request, upstream, out, outcome)

    async def _stream(
        self,
        request: web.Request,
        upstream: Connection,
        out: web.StreamResponse,
        outcome: Outcome,
        events: SseFilter | None = None,
    ) -> web.StreamResponse:
        """Relay the body chunk by chunk (through ``events`` when filtering), each flushed."""
        await out.prepare(request)
        gauge = self._streams.labels(outcome.app) if self._streams is not None else None
        if gauge is not None:
            gauge.inc()
        try:
            while chunk := await upstream.read():
                ready = chunk if events is None else events.feed(chunk)
                if ready:
                    await out.write(ready)  # aiohttp writes straight to the transport: a flush
                    outcome.bytes_down += len(ready)
                if events is not None and events.overflowed:
                    # An event past the limit was replaced by an error: end here, the upstream
                    # connection (its answer unfinished) is closed by the caller.
                    outcome.broken = "answer_too_large"
                    break
            rest = events.finish() if events is not None else b""
            if rest:
                await out.write(rest)
                outcome.bytes_down += len(rest)
        except ConnectionResetError:
            # The client went away while we wrote; the caller closes the upstream connection.
            outcome.broken = "client_disconnected"
            return out
        except UpstreamError as exc:
            # Headers are gone already: the only honest signal left is to cut the connection,
            # so the client sees a truncated response, never a clean end.
            timed_out = isinstance(exc, UpstreamTimeout)
            outcome.broken = "upstream_idle_timeout" if timed_out else "upstream_reset"
            if request.transport is not None:
                request.transport.abort()
            return out
        finally:
            if gauge is not None:
                gauge.dec()
        await out.write_eof()
        return out

    async def _filtered(
        self,
        request: web.Request,
        upstream: Connection,
        outcome: Outcome,
        tools_filter: ToolsListFilter,
        on_response: HeaderHook | None = None,
    ) -> web.StreamResponse:
        """A tools/list answer, with the tools the session may not call taken out."""
        answer = response_headers(upstream.headers)
        headers = answer.headers
        if on_response is not None:
            # A filtered answer is the session's too: its Mcp-Session-Id is sealed like any
            # other (it reached the client as the upstream's own id, unsealed).
            on_response(headers)
        codings = {
            c.strip().lower() for v in headers.popall("Content-Encoding", []) for c in v.split(",")
        } - {"", "identity"}

        def whole(body: bytes) -> web.Response:
            headers["Content-Type"] = "application/json"
            outcome.bytes_down = len(body)
            return web.Response(status=upstream.status, headers=headers, body=body)

        if codings:
            # Compressed although proxyd sent no Accept-Encoding (RFC 9110 §12.5.3 allows it):
            # unreadable, so unfilterable. An SSE answer used to pass with the header dropped,
            # every tool inside, a gunzip away: fail closed.
            body = json.dumps(tools_filter.error("answer is compressed")).encode()
            return whole(body)
        if not answer.sse:
            # JSON (or anything else, which the filter turns into an error): read whole, bounded.
            # Every chunk to the end: one read() returned only what had arrived so far, so a
            # large answer became an error, and one over the limit passed on its first chunk.
            raw = await upstream.read_whole(MAX_JSON_ANSWER)
            if raw is None:
                body = json.dumps(tools_filter.error("answer too large")).encode()
            else:
                body = tools_filter.json_body(raw)
            return whole(body)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        out.headers.extend(headers)
        out.headers["X-Accel-Buffering"] = "no"
        return await self._stream(request, upstream, out, outcome, tools_filter.sse())

    @staticmethod
    async def _whole(
        upstream: Connection, outcome: Outcome, headers: CIMultiDict[str]
    ) -> web.Response:
        """A small answer with a Content-Length: one write of headers and body together.

        Nothing has been sent to the client yet, so an upstream failure here is still a 502/504.
        """
        body = await upstream.read_whole(SMALL_BODY)
        assert body is not None  # llhttp stops at the Content-Length, which is at most this
        outcome.bytes_down = len(body)
        return web.Response(
            status=upstream.status,
            reason=upstream.reason or None,
            headers=headers,
            body=body,
        )
