"""The streaming forwarder: request body up, response down, each chunk flushed as it arrives.

This is the only module that translates aiohttp client errors into proxyd errors. Bytes pass
untouched (no decompression, no re-encoding); Content-Length is kept when the upstream gives
one, chunked otherwise. A client that goes away cancels the handler (aiohttp
``handler_cancellation``), which closes the upstream request at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxyd.config import UpstreamSettings
from proxyd.errors import PayloadTooLarge, UpstreamError, UpstreamTimeout
from proxyd.mcp.filter import MAX_JSON_ANSWER, SseFilter, ToolsListFilter
from proxyd.metrics import Metrics

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
# aiohttp would add these by itself; a proxy must send exactly what the client asked for
# (an added Accept-Encoding would make the upstream compress for a client that cannot inflate).
_SKIP_AUTO: Final = ("Accept-Encoding", "User-Agent", "Accept", "Content-Type")


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


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("Connection")
    return {t.strip().lower() for t in value.split(",")} if value else set()


def request_headers(
    incoming: CIMultiDictProxy[str], extra: Mapping[str, str], identity_header: str
) -> CIMultiDict[str]:
    drop = _STRIP_REQUEST | _connection_tokens(incoming) | {identity_header.lower()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    out.update(extra)
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = _STRIP_RESPONSE | _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


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


class ConnectFailed(UpstreamError):
    """No connection to the upstream was made: nothing of the request reached it."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message, reason="upstream_connect_timeout" if timed_out else None)
        if timed_out:
            self.status = 504


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
            # send plain bytes; aiohttp's streaming-body machinery costs a write task and was
            # a third of the CPU of a small proxied POST (bench/README.md).
            return cls(request, limit, await request.read())
        return cls(request, limit)

    @classmethod
    async def read_all(cls, request: web.Request, limit: int) -> RequestBody:
        """The whole body in memory, bounded: for requests proxyd must look into."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(_too_large(limit))
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(_too_large(limit))
            chunks.append(chunk)
        return cls(request, limit, b"".join(chunks))

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

    def payload(self, headers: CIMultiDict[str]) -> bytes | AsyncIterator[bytes] | None:
        if self._bytes is not None:
            return self._bytes if (self._bytes or self._request.body_exists) else None
        if not self._request.body_exists:
            return None
        if self.declared is not None:
            headers["Content-Length"] = str(self.declared)
        return self._counter.stream(self._request.content)


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


class Forwarder:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        settings: UpstreamSettings,
        max_body: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._http = http
        self._streams = metrics.open_streams if metrics is not None else None
        self._max_body = max_body
        self._timeout = aiohttp.ClientTimeout(
            total=None,  # streams live as long as they need
            connect=settings.connect_timeout,
            sock_connect=settings.connect_timeout,
            sock_read=settings.idle_timeout,
        )

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
        data = body.payload(headers)
        # The raw query, never the decoded one: decoding and re-encoding changes bytes (and
        # meaning: %20 came back as "+"), and an upstream may sign or compare them.
        raw_query = request.rel_url.raw_query_string
        url = URL(target) if not raw_query else URL(f"{URL(target)}?{raw_query}", encoded=True)
        try:
            async with self._http.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO,
                timeout=self._timeout,
            ) as upstream:
                outcome.status = upstream.status
                outcome.bytes_up = body.sent
                if tools_filter is not None and upstream.status == 200:
                    return await self._filtered(
                        request, upstream, outcome, tools_filter, on_response
                    )
                return await self._relay(request, upstream, outcome, on_response)
        except PayloadTooLarge:
            raise
        except aiohttp.ClientError as exc:
            if body.too_large:
                raise PayloadTooLarge(_too_large(self._max_body)) from None
            raise _translate(exc, target) from None
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {_host(target)} timed out") from None

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        outcome: Outcome,
        on_response: HeaderHook | None,
    ) -> web.StreamResponse:
        headers = response_headers(upstream.headers)
        if on_response is not None:
            on_response(headers)
        chunked = "chunked" in upstream.headers.get("Transfer-Encoding", "").lower()
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and not chunked and not sse:
            return await self._whole(upstream, outcome, headers)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        out.headers.extend(headers)
        if length is not None and not chunked:
            out.content_length = length
        if sse:
            # Tell any buffering proxy in front of us (nginx) to pass events through at once.
            out.headers["X-Accel-Buffering"] = "no"
        return await self._stream(request, upstream, out, outcome)

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
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
            async for chunk in upstream.content.iter_any():
                ready = chunk if events is None else events.feed(chunk)
                if ready:
                    await out.write(ready)  # aiohttp writes straight to the transport: a flush
                    outcome.bytes_down += len(ready)
            rest = events.finish() if events is not None else b""
            if rest:
                await out.write(rest)
                outcome.bytes_down += len(rest)
        except ConnectionResetError:
            # The client went away while we wrote; leaving the `async with` closes upstream.
            outcome.broken = "client_disconnected"
            return out
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is to cut the connection,
            # so the client sees a truncated response, never a clean end.
            outcome.broken = _broken_reason(exc)
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
        upstream: aiohttp.ClientResponse,
        outcome: Outcome,
        tools_filter: ToolsListFilter,
        on_response: HeaderHook | None = None,
    ) -> web.StreamResponse:
        """A tools/list answer, with the tools the session may not call taken out."""
        headers = response_headers(upstream.headers)
        if on_response is not None:
            # A filtered answer is the session's too: its Mcp-Session-Id is sealed like any
            # other (it reached the client as the upstream's own id, unsealed).
            on_response(headers)
        codings = {
            c.strip().lower() for v in headers.popall("Content-Encoding", []) for c in v.split(",")
        } - {"", "identity"}
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")

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
        if not sse:
            # JSON (or anything else, which the filter turns into an error): read whole, bounded.
            # Every chunk to the end: one read() returned only what had arrived so far, so a
            # large answer became an error, and one over the limit passed on its first chunk.
            chunks: list[bytes] = []
            size = 0
            async for chunk in upstream.content.iter_any():
                size += len(chunk)
                if size > MAX_JSON_ANSWER:
                    break
                chunks.append(chunk)
            if size > MAX_JSON_ANSWER:
                body = json.dumps(tools_filter.error("answer too large")).encode()
            else:
                body = tools_filter.json_body(b"".join(chunks))
            return whole(body)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        out.headers.extend(headers)
        out.headers["X-Accel-Buffering"] = "no"
        return await self._stream(request, upstream, out, outcome, tools_filter.sse())

    @staticmethod
    async def _whole(
        upstream: aiohttp.ClientResponse, outcome: Outcome, headers: CIMultiDict[str]
    ) -> web.Response:
        """A small answer with a Content-Length: one write of headers and body together.

        Nothing has been sent to the client yet, so an upstream failure here is still a 502/504.
        """
        body = await upstream.read()
        outcome.bytes_down = len(body)
        return web.Response(
            status=upstream.status,
            reason=upstream.reason,
            headers=headers,
            body=body,
        )


def _broken_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "upstream_idle_timeout"
    return "upstream_reset"


def _host(target: str) -> str:
    return target.split("/")[2] if "://" in target else target


def _translate(exc: aiohttp.ClientError, target: str) -> UpstreamError:
    host = _host(target)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectFailed(f"upstream {host} timed out", timed_out=True)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"upstream {host} timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed(f"upstream {host} is unreachable")
    return UpstreamError(f"upstream {host} failed: {type(exc).__name__}")
