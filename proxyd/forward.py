"""The streaming forwarder: request body up, response down, each chunk flushed as it arrives.

The upstream side is proxyd's own HTTP/1.1 client (proxyd/upstream/), which raises proxyd
errors only. Bytes pass untouched (no decompression, no re-encoding); Content-Length is kept
when the upstream gives one, chunked otherwise. A client that goes away cancels the handler
(aiohttp ``handler_cancellation``), which closes the upstream connection at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from multidict import CIMultiDict

from proxyd.body import (
    HOP_BY_HOP,
    BodyFilter,
    EventFilter,
    HeaderHook,
    RequestBody,
    connection_tokens,
    field_name,
)
from proxyd.config import UpstreamSettings
from proxyd.errors import (
    ConnectFailed,
    UpstreamError,
    UpstreamTimeout,
)
from proxyd.metrics import Children, Metrics
from proxyd.upstream import Connection, UpstreamClient, request_head

__all__ = ["ConnectFailed", "Forwarder", "Outcome"]

_STRIP_RESPONSE: Final = HOP_BY_HOP | {"content-length"}
_ACCEL: Final = field_name("X-Accel-Buffering")


@dataclass(slots=True)
class Outcome:
    """What happened upstream, for the access log."""

    upstream: str
    app: str = ""
    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    broken: str | None = None
    upstream_seconds: float = 0.0  # the exchange with the app server, when it answered


# Bodies up to this size with a known length are moved in one piece (see Forwarder.forward).
SMALL_BODY: Final = 64 * 1024


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
            tokens |= connection_tokens(value)
    drop = _STRIP_RESPONSE | tokens if tokens else _STRIP_RESPONSE
    out: CIMultiDict[str] = CIMultiDict()
    length: int | None = None
    chunked = sse = False
    for name, value in fields:
        lower = name.lower()
        if lower.startswith("access-control-"):
            continue  # proxyd's CORS policy is the only one (proxyd/cors.py)
        if lower not in drop:
            out.add(field_name(name), value)  # issue 15: a name shared, not kept per answer
            if lower == "content-type":
                sse = value.startswith("text/event-stream")
        elif lower == "content-length":
            length = int(value)  # llhttp refused anything but one valid number
        elif lower == "transfer-encoding":
            chunked = chunked or "chunked" in value.lower()
    return AnswerHead(out, length, chunked, sse)


def answer_form(content_types: list[str]) -> tuple[str, str | None]:
    """How a client reads an answer: "sse" or "json", and why it cannot be filtered, if so.

    Clients do not parse media types: the TypeScript SDK tests ``includes("text/event-stream")``
    (case-sensitive) before ``includes("application/json")``, Python's lower-cases and tests
    prefixes. So a type that mentions both is ambiguous, one that mentions the event stream
    anywhere is read as events, anything else as JSON; and a charset other than UTF-8 may be
    honoured by one client and not another (issue 10).
    """
    if len(content_types) > 1:
        return "json", "answer has more than one Content-Type"
    value = content_types[0].lower() if content_types else ""
    sse = "text/event-stream" in value
    if sse and "json" in value:
        return "sse", "answer Content-Type is ambiguous"
    for param in value.split(";")[1:]:
        name, _, charset = param.partition("=")
        if name.strip(" \t") == "charset" and charset.strip(' \t"') != "utf-8":
            return "json", "answer charset is not UTF-8"
    return ("sse" if sse else "json"), None


class Forwarder:
    def __init__(
        self,
        client: UpstreamClient,
        settings: UpstreamSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        # The gauge's child per app, looked up once: ~7 % of opening an idle stream (issue 15).
        self._streams = Children(metrics.open_streams) if metrics is not None else None
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
        tools_filter: BodyFilter | None = None,
    ) -> web.StreamResponse:
        """Send the request to ``target`` and relay the answer.

        Raises ConnectFailed when no connection could be made (the caller may try another
        server), other UpstreamErrors when it failed later.
        """
        client = self._client
        origin = client.origin(target)
        # The raw query, never the decoded one: decoding and re-encoding changes bytes (and
        # meaning: %20 came back as "+"), and an upstream may sign or compare them.
        head = request_head(
            request.method,
            origin,
            request.rel_url.raw_query_string,
            headers.items(),
            body.framing(request.method),
        )
        conn = client.pooled(origin) or await client.connect(origin, self._connect_timeout)
        try:
            conn.send(head, body.data or None, self._idle_timeout)
            del head  # on the wire: not held by this frame for a stream's life (issue 15)
            await conn.head()
            outcome.status = conn.status
            outcome.bytes_up = body.sent
            if tools_filter is not None:
                # Every answer, whatever its status (issue 10: a 201 or 203 tools/list answer
                # skipped the filter; clients read the body of any status).
                return await self._filtered(request, conn, outcome, tools_filter, on_response)
            return await self._relay(request, conn, outcome, on_response)
        finally:
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
            out.headers[_ACCEL] = "no"
        # The fields live on in ``out`` alone, not in a second copy held by this frame for a
        # stream's life (issue 15: memory per idle SSE stream).
        del answer
        return await self._stream(request, upstream, out, outcome)

    async def _stream(
        self,
        request: web.Request,
        upstream: Connection,
        out: web.StreamResponse,
        outcome: Outcome,
        events: EventFilter | None = None,
    ) -> web.StreamResponse:
        """Relay the body chunk by chunk (through ``events`` when filtering), each flushed."""
        # Relayed in ``out``: the upstream's own copy of its fields is not kept for as long as
        # the body streams (issue 15: ~1 KiB per idle SSE stream).
        upstream.drop_fields()
        gauge = self._streams.get(outcome.app) if self._streams is not None else None
        if gauge is not None:
            gauge.inc()
        try:
            await out.prepare(request)
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
            # Inside the try: a client gone right after the last event made write_eof raise
            # ClientConnectionResetError, logged by aiohttp as unhandled and recorded as a 500
            # while the upstream had answered 200 (issue 10).
            await out.write_eof()
        except ConnectionResetError:
            # The client went away while we wrote; the caller closes the upstream connection.
            outcome.broken = "client_disconnected"
        except UpstreamError as exc:
            # Headers are gone already: the only honest signal left is to cut the connection,
            # so the client sees a truncated response, never a clean end.
            timed_out = isinstance(exc, UpstreamTimeout)
            outcome.broken = "upstream_idle_timeout" if timed_out else "upstream_reset"
            if request.transport is not None:
                request.transport.abort()
        finally:
            if gauge is not None:
                gauge.dec()
        return out

    async def _filtered(
        self,
        request: web.Request,
        upstream: Connection,
        outcome: Outcome,
        tools_filter: BodyFilter,
        on_response: HeaderHook | None = None,
    ) -> web.StreamResponse:
        """An answer read for tool lists, with the tools the session may not call taken out."""
        answer = response_headers(upstream.headers)
        headers = answer.headers
        if on_response is not None:
            # A filtered answer is the session's too: its Mcp-Session-Id is sealed like any
            # other (it reached the client as the upstream's own id, unsealed).
            on_response(headers)
        codings = {
            c.strip().lower() for v in headers.popall("Content-Encoding", []) for c in v.split(",")
        } - {"", "identity"}

        def whole(body: bytes, rewritten: bool) -> web.Response:
            if rewritten:
                headers.popall("Content-Type", None)
                headers["Content-Type"] = "application/json"
            outcome.bytes_down = len(body)
            return web.Response(status=upstream.status, headers=headers, body=body)

        tools_filter.answer_status(upstream.status)
        form, unreadable = answer_form(headers.getall("Content-Type", []))
        if codings:
            # Compressed although proxyd sent no Accept-Encoding (RFC 9110 §12.5.3 allows it):
            # unreadable, so unfilterable. An SSE answer used to pass with the header dropped,
            # every tool inside, a gunzip away: fail closed.
            unreadable = "answer is compressed"
        if unreadable is not None:
            # The rest of the answer is never read: finish() then closes the connection.
            return whole(tools_filter.error_bytes(unreadable), True)
        if form == "json":
            # JSON (or anything a client might parse as such): read whole, bounded. Every chunk
            # to the end: one read() returned only what had arrived so far, so a large answer
            # became an error, and one over the limit passed on its first chunk.
            raw = await upstream.read_whole(tools_filter.max_answer)
            if raw is None:
                return whole(tools_filter.error_bytes("answer too large"), True)
            body = tools_filter.json_body(raw)
            return whole(body, body is not raw)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        out.headers.extend(headers)
        out.headers[_ACCEL] = "no"
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
