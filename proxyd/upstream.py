"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections to the app servers.

aiohttp's ClientSession was a third of the CPU of a small proxied POST (a request object, a
writer task, a StreamReader, timers and a CIMultiDict per exchange). This client does what a
reverse proxy needs and nothing else: the request head is serialised by hand and goes out with
a small body in one write; the answer is parsed by llhttp (``httptools``) in the protocol's
``data_received``, and the handler waits on one future, never on a second task.

Why httptools and not aiohttp's own C parser: aiohttp's parser is private API (its signature
changed between minor releases) and comes with its own StreamReader, flow control and header
multidict per message; httptools is llhttp with plain callbacks, a public and stable API from
the uvloop authors, so the buffering and flow control below stay ours and cost one list.

Behaviour a proxy relies on (RFC 9112 = HTTP/1.1 messages, RFC 9110 = semantics):

- bytes untouched: no auto headers beyond Host and the body framing, no decompression;
- a connection is reused only after a complete answer without ``Connection: close`` (§9.3)
  and with the whole request body sent; a stale pooled connection (the upstream closed it
  while idle) is noticed before anything is written and never used, so nothing is replayed:
  a request that may have reached the upstream is never sent twice (RFC 9112 §9.3.1 allows
  automatic retries of idempotent requests only; POSTs are tool calls);
- 1xx interim answers are skipped (RFC 9110 §15.2); 101 is an error (proxyd never asks for an
  upgrade: Upgrade is hop-by-hop and stripped);
- a body without Content-Length or chunked framing ends when the upstream closes (RFC 9112
  §6.3 item 8); any other close before the end is a truncation. Over TLS, RFC 9112 §9.8 wants
  such a body refused without a close_notify alert; asyncio's SSL layer reports a bare TCP
  close the same way as the alert, so that case passes as a clean end (as with aiohttp);
- trailers are dropped (RFC 9112 §7.1.2: a recipient that removes the chunked coding may
  discard them);
- idle connections are closed after ``keepalive_timeout`` (shorter than common upstream
  keep-alive timeouts, so the upstream rarely closes one under a request), at most
  ``max_idle`` are kept per upstream; active connections are never capped (open SSE streams
  must not queue behind each other).

HEAD is never sent (the MCP endpoint allows POST, GET and DELETE only): llhttp cannot be told
that an answer to HEAD has no body, so ``request_head`` refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from yarl import URL

from proxyd.errors import ConnectFailed, UpstreamError, UpstreamTimeout

# The whole answer head (status line and fields) must fit; nginx calls this "upstream sent
# too big header" (502). llhttp itself has no limit.
MAX_HEAD: Final = 64 * 1024
# Read-side flow control: stop reading from the upstream while this much sits unread (the
# client is slower than the upstream), resume once the reader took it.
HIGH_WATER: Final = 256 * 1024
# Bodies up to this size go out in the same write as the head; larger ones as a second write
# (no copy of a multi-megabyte body just to save a syscall).
_COALESCE: Final = 64 * 1024


class _Stop(Exception):
    """Raised in a parser callback to stop parsing (llhttp reports it as a callback error)."""


def _host_header(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:  # an IPv6 literal, bracketed as in the URI (RFC 9110 §7.2, RFC 3986 §3.2.2)
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


@dataclass(frozen=True, slots=True)
class Origin:
    """One app server URL, parsed once."""

    key: str  # scheme://host:port: the pool it belongs to
    host: str
    port: int
    tls: bool
    host_header: str
    path: str  # the raw path of the target URL, never re-encoded
    query: str  # the target URL's own raw query ("" if none), e.g. a tenant parameter
    label: str  # host[:port] for messages

    @classmethod
    def parse(cls, target: str) -> Origin:
        url = URL(target)
        if url.scheme not in ("http", "https") or not url.raw_host or url.port is None:
            raise ValueError(f"not an http(s) URL: {target!r}")
        host_header = _host_header(url)
        return cls(
            key=f"{url.scheme}://{host_header}",
            host=url.raw_host,
            port=url.port,
            tls=url.scheme == "https",
            host_header=host_header,
            path=url.raw_path or "/",
            query=url.raw_query_string,
            label=target.split("/")[2],
        )


def request_head(
    method: str,
    origin: Origin,
    raw_query: str,
    headers: Iterable[tuple[str, str]],
    framing: str,
) -> bytes:
    """The request line and fields (RFC 9112 §3, §5); ``framing`` is the body's own field.

    A CR or LF in a field would split it into two (request smuggling): refused, as aiohttp's
    writer refused it before.
    """
    if method in ("HEAD", "CONNECT"):
        # llhttp cannot be told that an answer to HEAD has no body; CONNECT is no proxy's job.
        raise ValueError(f"{method} is not forwarded")
    # The configured URL's own query first, then the client's (RFC 3986 §3.4 leaves the
    # joining to the application; "&" is what form-style queries, the common case, expect).
    query = "&".join(q for q in (origin.query, raw_query) if q)
    target = f"{origin.path}?{query}" if query else origin.path
    fields = [f"{name}: {value}\r\n" for name, value in headers]
    block = "".join(fields)
    # Exactly one CRLF per field: anything more came from a name or a value. (The target is
    # the configured path and the client's raw query, which aiohttp's parser already bounded.)
    if block.count("\n") != len(fields) or block.count("\r") != len(fields):
        raise UpstreamError("request header contains a line break", reason="bad_request_header")
    head = f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n{block}{framing}\r\n"
    return head.encode("utf-8", "surrogateescape")


class Connection(asyncio.Protocol):
    """One keep-alive connection and the exchange in progress on it (one at a time)."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self._client = client
        self.origin = origin
        self._loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._last_read = 0.0
        self._reset()

    def _reset(self) -> None:
        self.active = False
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.keep_alive = False
        self.head_done = False
        self.complete = False
        self.until_eof = False
        self.body_sent = True
        self._reason = b""
        self._head_size = 0
        self._fields_size = 0
        self._gap = 0
        self._interim = False
        self._stray = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.error: UpstreamError | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small heads and bodies go out at once, not after a delayed ACK (Nagle); a socket
            # that is not TCP has nothing to tune.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # An idle connection has nothing to say (RFC 9112 §9.3: no answer without a
            # request): whatever this is, the connection cannot be trusted any more.
            self._close()
            return
        self._last_read = self._loop.time()
        parser = self._parser
        assert parser is not None
        if not self.head_done:
            self._head_size += len(data)
        else:
            # Bytes since the last body byte: chunk lines and the trailer section. Trailer
            # fields are fields (RFC 9112 §7.1.2) that httptools buffers whole until their end,
            # so they get the head's limit; on_body resets the count.
            self._gap += len(data)
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail(UpstreamError(f"upstream {self.origin.label} switched protocols"))
        except HttpParserError:
            # (_Stop, raised in a callback, arrives here wrapped: its error is already set.)
            if self.complete:
                self._stray = True  # junk after a complete answer: not reusable
            else:
                self._fail(UpstreamError(f"upstream {self.origin.label} sent a malformed answer"))
        if not self.head_done and self._head_size > MAX_HEAD and not self.complete:
            # A head still unfinished past the limit (llhttp would buffer a field forever).
            self._fail(self._too_big())
        elif self._gap > MAX_HEAD and not self.complete:
            # Likewise a trailer that never ends: still arriving, it also keeps the idle
            # timeout from firing.
            self._fail(self._too_big())

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client.forget(self)
        if self.active and not self.complete and self.error is None:
            if self.head_done and self.until_eof and exc is None:
                self.complete = True  # the close is this body's end (RFC 9112 §6.3)
            else:
                self.error = UpstreamError(f"upstream {self.origin.label} closed the connection")
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._cancel_timer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request: never reuse this connection, and stop parsing
            # here. Parsed on, its status, reason and body were taken as the first answer's
            # (response splitting: RFC 9112 §9.3 pairs answers with requests in order).
            self._stray = True
            raise _Stop

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer field: dropped
        self._fields_size += len(name) + len(value) + 4
        if self._fields_size > MAX_HEAD:
            # A head that arrived whole in one read, past the limit.
            self._fail(self._too_big())
            raise _Stop
        self.headers.append(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            # llhttp takes any three digits; RFC 9110 §15 makes the rest invalid (a recipient
            # treats them as 5xx): relayed, "HTTP/1.1 0" would reach the client. A 502.
            self._fail(UpstreamError(f"upstream {self.origin.label} sent a malformed answer"))
            raise _Stop
        if 100 <= status < 200:
            if status not in (100, 102, 103):
                # 101 switches protocols (proxyd never asked: Upgrade is stripped); llhttp
                # would read any other 1xx as a body up to the close. Both end the exchange.
                self._fail(UpstreamError(f"upstream {self.origin.label} answered {status}"))
                raise _Stop
            # An interim answer (100 Continue, 103 Early Hints): skipped, the final one follows.
            self._interim = True
            self.headers = []
            self._reason = b""
            return
        self.status = status
        self.reason = self._reason.decode("latin-1").strip()
        self.keep_alive = parser.should_keep_alive()
        # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (a 1.0 hop
        # may have passed chunked on unknowingly): close after it. llhttp keeps it alive.
        if parser.get_http_version() == "1.0" and any(
            name.lower() == "transfer-encoding" for name, _ in self.headers
        ):
            self.keep_alive = False
        self.head_done = True
        self.until_eof = self._ends_at_eof(status)
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._gap = 0
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.head_done:
            self.complete = True
            self._cancel_timer()
            self._wake()

    # -- the exchange, for the forwarder

    def _ends_at_eof(self, status: int) -> bool:
        if status in (204, 304):
            return False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                return False
            if lower == "transfer-encoding" and value.rsplit(",", 1)[-1].strip().lower() == (
                "chunked"
            ):
                return False
        return True

    def send(self, head: bytes, body: bytes | None, timeout: float) -> None:
        """Start an exchange: the head, and a body given whole, written now."""
        assert self.transport is not None and not self.active
        self._reset()
        self.active = True
        self._parser = HttpResponseParser(self)  # a fresh parser: no state from the last one
        self._timeout = timeout
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._last_read + timeout, self._on_timer)
        if body and len(body) > _COALESCE:
            self.transport.write(head)
            self.transport.write(body)
        else:
            self.transport.write(head + body if body else head)

    async def head(self) -> None:
        """Wait for the final answer's status and fields."""
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read(self) -> bytes:
        """The body as it arrives: what is buffered now, or b"" at its end."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                if self._read_paused and self.transport is not None:
                    self._read_paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_whole(self, limit: int) -> bytes | None:
        """The whole body, or None as soon as it exceeds ``limit``."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read():
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self) -> None:
        """The exchange is over: back to the pool when reusable, else closed."""
        self._cancel_timer()
        reusable = (
            self.complete
            and self.keep_alive
            and self.body_sent
            and not self._stray
            and not self.closed
            and not self._read_paused
        )
        self.active = False
        self._parser = None
        self._chunks = []
        if reusable:
            self._client.release(self)
        else:
            self._abort()

    # -- internals

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self._abort()
        self._wake()

    def _too_big(self) -> UpstreamError:
        return UpstreamError(f"upstream {self.origin.label} sent too big a header")

    def _on_timer(self) -> None:
        # One timer per exchange, re-armed from the last read instead of reset on every read
        # (a timer handle per chunk costs more than a clock read per chunk).
        self._timer = None
        if not self.active or self.complete:
            return
        now = self._loop.time()
        if self._read_paused:
            # Not reading because the client is slow: the upstream is not the one silent.
            self._timer = self._loop.call_at(now + self._timeout, self._on_timer)
            return
        deadline = self._last_read + self._timeout
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._fail(UpstreamTimeout(f"upstream {self.origin.label} timed out"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class UpstreamClient:
    """Keep-alive pools per upstream origin; owned by app.py's cleanup context."""

    def __init__(
        self,
        *,
        keepalive_timeout: float = 4.0,
        max_idle: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.keepalive_timeout = keepalive_timeout
        self.max_idle = max_idle
        self._ssl = ssl_context
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, list[Connection]] = {}
        self._all: set[Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closing = False
        self._drained: asyncio.Future[None] | None = None

    def origin(self, target: str) -> Origin:
        origin = self._origins.get(target)
        if origin is None:
            if len(self._origins) > 4096:  # targets come from the config: a reload may change
                self._origins.clear()  # them, so keep the cache bounded
            origin = self._origins[target] = Origin.parse(target)
        return origin

    def pooled(self, origin: Origin) -> Connection | None:
        """An idle connection to ``origin`` that is still open, or None.

        A connection the upstream closed while idle was dropped when its close arrived; one
        found closing here is skipped before anything was written to it.
        """
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        oldest = self.loop.time() - self.keepalive_timeout
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                continue
            if conn.idle_since < oldest:
                conn._close()
                continue
            return conn
        return None

    async def connect(self, origin: Origin, connect_timeout: float) -> Connection:
        """A new connection; ConnectFailed when none could be made (nothing was sent)."""
        if self._closing:
            raise ConnectFailed(f"upstream {origin.label} is unreachable: shutting down")
        tls = self._tls() if origin.tls else None
        try:
            async with asyncio.timeout(connect_timeout) as deadline:
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except TimeoutError:
            if deadline.expired():
                raise ConnectFailed(f"upstream {origin.label} timed out", timed_out=True) from None
            raise ConnectFailed(f"upstream {origin.label} is unreachable") from None
        except OSError:  # refused, unreachable, DNS (gaierror), TLS verification (SSLError)
            raise ConnectFailed(f"upstream {origin.label} is unreachable") from None
        if conn.closed:
            raise ConnectFailed(f"upstream {origin.label} closed the connection at once")
        self._all.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.origin.key, [])
        if self._closing or len(idle) >= self.max_idle:
            conn._close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive_timeout, self._expire)

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin.key)
        if idle and conn in idle:
            idle.remove(conn)
        if self._drained is not None and not self._all and not self._drained.done():
            self._drained.set_result(None)

    def _expire(self) -> None:
        # Idle connections past keepalive_timeout are closed in one sweep; the sweep runs
        # again while any are left, at the time the oldest of them expires.
        self._sweep = None
        now = self.loop.time()
        oldest = now - self.keepalive_timeout
        next_due: float | None = None
        for idle in self._idle.values():
            keep = [c for c in idle if c.idle_since >= oldest and not c.closed]
            for conn in idle:
                if conn not in keep:
                    conn._close()
            idle[:] = keep
            if keep:
                due = keep[0].idle_since + self.keepalive_timeout
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep = self.loop.call_at(next_due, self._expire)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            # aiohttp's default verification: the system's CAs and hostname checks.
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl

    @property
    def open_connections(self) -> int:
        return len(self._all)

    def idle_connections(self, origin: Origin) -> int:
        return len(self._idle.get(origin.key, ()))

    async def close(self) -> None:
        """Close every connection, idle or not, and wait until each is gone."""
        self._closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle.clear()
        if not self._all:
            return
        self._drained = self.loop.create_future()
        for conn in list(self._all):
            conn._abort()
        # Each abort reports its connection_lost on the next loop turns; bounded all the same,
        # so that a transport that never reports cannot hold up a shutdown.
        await asyncio.wait({self._drained}, timeout=5.0)
