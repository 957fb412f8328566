"""One keep-alive connection to an app server: the transport, llhttp's callbacks, its ``State``.

The connection keeps what outlives an exchange (transport, flow control, idle time, state);
the exchange in progress is an ``_Answer`` made fresh by ``send()``, which the callbacks write
into. Whether the connection may be reused is read off the state, as httpcore does with its
``HTTPConnectionState`` (``_response_closed``): DONE, kept alive, and not paused.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Final, Protocol, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from proxyd.errors import UpstreamError, UpstreamTimeout
from proxyd.upstream.answer import MAX_HEAD, _Answer
from proxyd.upstream.deadlines import Deadlines
from proxyd.upstream.flow import HIGH_WATER, FlowControl
from proxyd.upstream.wire import Origin


class Pool(Protocol):
    """What a connection tells the pool that made it (proxyd.upstream.pool.UpstreamClient)."""

    loop: asyncio.AbstractEventLoop
    deadlines: Deadlines

    def release(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


# Bodies up to this size go out in the same write as the head; larger ones as a second write
# (no copy of a multi-megabyte body just to save a syscall).
_COALESCE: Final = 64 * 1024


class State(enum.Enum):
    """Where a connection is. One exchange at a time (RFC 9112 §9.3: answers come in order).

    ::

        IDLE ──send()──▶ READING ──final answer complete──▶ DONE
        DONE ──finish(): keep-alive, not paused──▶ IDLE (back to the pool)
        READING, DONE ──error, timeout, close, bytes after the answer──▶ BROKEN
        READING, DONE, BROKEN ──finish(), not reusable──▶ CLOSED
        IDLE ──idle too long, over max_idle, closed by the upstream, bytes unasked──▶ CLOSED

    There is no SENDING: a request goes to the transport whole inside ``send()``, so no one can
    see one half sent. BROKEN and DONE are exchange states: ``finish()`` ends them.
    """

    IDLE = "idle"  # open, no exchange: pooled, or just connected
    READING = "reading"  # the request is out, the final answer not yet read whole
    DONE = "done"  # the answer was read whole and nothing followed it
    BROKEN = "broken"  # the exchange failed or left the connection untrustworthy
    CLOSED = "closed"  # closed (by either side), no exchange


# The states as module constants: on Python 3.11 ``State.IDLE`` is a class attribute lookup
# through the enum's metaclass (~90 ns each, and a send/finish cycle makes ten of them); a
# global is ~5 ns.
IDLE: Final = State.IDLE
READING: Final = State.READING
DONE: Final = State.DONE
BROKEN: Final = State.BROKEN
CLOSED: Final = State.CLOSED


class _Stop(Exception):
    """Raised in a parser callback to stop parsing (llhttp reports it as a callback error)."""


class Connection(asyncio.Protocol):
    """One keep-alive connection and the exchange in progress on it (one at a time)."""

    __slots__ = (
        "_answer",
        "_client",
        "_deadlines",
        "_due",
        "_flow",
        "_loop",
        "_parser",
        "_waiter",
        "idle_since",
        "origin",
        "state",
        "transport",
    )

    _flow: FlowControl  # from connection_made on

    def __init__(self, client: Pool, origin: Origin) -> None:
        self._client = client
        self.origin = origin
        self._loop = client.loop
        self._deadlines = client.deadlines
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.idle_since = 0.0
        # The current exchange's answer, kept readable after finish() until the next send();
        # before the first, an empty one (status 0, no fields).
        self._answer = _Answer(0.0, 0.0)
        self._parser: HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._due: float | None = None  # the idle timeout's slot (deadlines.py), if armed

    # -- the answer, for the forwarder

    @property
    def status(self) -> int:
        return self._answer.status

    @property
    def reason(self) -> str:
        return self._answer.reason

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._answer.headers

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    @property
    def _read_paused(self) -> bool:  # for tests/upstream/test_upstream.py
        return self._flow.read_paused

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._flow = FlowControl(self.transport)
        # Small heads and bodies go out at once, not after a delayed ACK: both loops set
        # TCP_NODELAY on every TCP transport (uvloop's TCPTransport.new, asyncio's socket
        # transport since 3.6), so it is not set again here. Setting it went through uvloop's
        # PseudoSocket (a socket object made and detached per call): ~3 % of the loop's time
        # while idle streams were being opened (issue 15). test_upstream asserts it is set.

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is IDLE or state is CLOSED:
            # An idle connection has nothing to say (RFC 9112 §9.3: no answer without a
            # request): whatever this is, the connection cannot be trusted any more.
            self.close()
            return
        answer = self._answer
        answer.last_read = self._loop.time()
        parser = self._parser
        assert parser is not None
        if not answer.head_done:
            answer.head_size += len(data)
        else:
            # Bytes since the last body byte: chunk lines and the trailer section. Trailer
            # fields are fields (RFC 9112 §7.1.2) that httptools buffers whole until their end,
            # so they get the head's limit; on_body resets the count.
            answer.gap += len(data)
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail(UpstreamError(f"upstream {self.origin.label} switched protocols"))
        except HttpParserError:
            # (_Stop, raised in a callback, arrives here wrapped: its error is already set.)
            if answer.complete:
                self.state = BROKEN  # junk after a complete answer: not reusable
            else:
                self._fail(UpstreamError(f"upstream {self.origin.label} sent a malformed answer"))
        if not answer.head_done and answer.head_size > MAX_HEAD and not answer.complete:
            # A head still unfinished past the limit (llhttp would buffer a field forever).
            self._fail(self._too_big())
        elif answer.gap > MAX_HEAD and not answer.complete:
            # Likewise a trailer that never ends: still arriving, it also keeps the idle
            # timeout from firing.
            self._fail(self._too_big())

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.forget(self)
        state = self.state
        if state is IDLE or state is CLOSED:
            self.state = CLOSED
        else:
            # An exchange in progress: BROKEN until its finish().
            self.state = BROKEN
            answer = self._answer
            if not answer.complete and answer.error is None:
                if answer.head_done and answer.until_eof and exc is None:
                    answer.complete = True  # the close is this body's end (RFC 9112 §6.3)
                else:
                    answer.error = UpstreamError(
                        f"upstream {self.origin.label} closed the connection"
                    )
        self._wake()
        self._flow.connection_lost()
        self._cancel_timer()

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._answer.complete:
            # A second answer to one request: never reuse this connection, and stop parsing
            # here. Parsed on, its status, reason and body were taken as the first answer's
            # (response splitting: RFC 9112 §9.3 pairs answers with requests in order).
            self.state = BROKEN
            raise _Stop

    def on_status(self, status: bytes) -> None:
        self._answer.raw_reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self._answer
        if answer.head_done:
            return  # a trailer field: dropped
        answer.fields_size += len(name) + len(value) + 4
        if answer.fields_size > MAX_HEAD:
            # A head that arrived whole in one read, past the limit.
            self._fail(self._too_big())
            raise _Stop
        answer.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        answer = self._answer
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
            answer.interim = True
            answer.headers = []
            answer.raw_reason = b""
            return
        answer.head_in(status, parser)
        self._wake()

    def on_body(self, body: bytes) -> None:
        answer = self._answer
        answer.gap = 0
        answer.chunks.append(body)
        answer.buffered += len(body)
        if answer.buffered > HIGH_WATER:
            self._flow.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        answer = self._answer
        if answer.interim:
            answer.interim = False
            return
        if answer.head_done:
            answer.complete = True
            if self.state is READING:
                self.state = DONE
            self._cancel_timer()
            self._wake()

    # -- the exchange, for the forwarder

    def send(self, head: bytes, body: bytes | None, timeout: float) -> None:
        """Start an exchange: the head, and a body given whole, written now."""
        transport = self.transport
        assert transport is not None and self.state is IDLE
        now = self._loop.time()
        self._answer = _Answer(timeout, now)
        self.state = READING
        self._parser = HttpResponseParser(self)  # a fresh parser: no state from the last one
        self._due = self._deadlines.add(now + timeout, timeout, self)
        if body and len(body) > _COALESCE:
            transport.write(head)
            transport.write(body)
        else:
            transport.write(head + body if body else head)

    async def head(self) -> None:
        """Wait for the final answer's status and fields."""
        answer = self._answer
        while not answer.head_done:
            if answer.error is not None:
                raise answer.error
            await self._wait()

    def drop_fields(self) -> None:
        """The answer's fields were taken: ``headers`` is empty from now on. The framing they
        decided is kept (``_Answer.head_in``); trailers are dropped anyway."""
        self._answer.headers.clear()

    async def read(self) -> bytes:
        """The body as it arrives: what is buffered now, or b"" at its end."""
        answer = self._answer
        while True:
            chunks = answer.chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                answer.buffered = 0
                flow = self._flow
                if flow.read_paused:
                    flow.resume_reading()
                return data
            if answer.complete:
                return b""
            if answer.error is not None:
                raise answer.error
            # _wait() inline: an idle stream sits here, and a coroutine frame less is ~200
            # bytes less per stream (issue 15).
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

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
        self._parser = None
        answer = self._answer
        answer.chunks.clear()  # what the reader left is never read
        # Reusable only after a whole answer with nothing after it (DONE), without
        # Connection: close (RFC 9112 §9.3), and with every byte of it taken: a paused read
        # means the reader stopped early.
        if self.state is DONE and answer.keep_alive and not self._flow.read_paused:
            self.state = IDLE
            self._client.release(self)
        else:
            self.abort()
            self.state = CLOSED

    # -- closing, for the pool

    def close(self) -> None:
        """Close an idle connection: nothing in flight, so the upstream sees a clean FIN."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._closed_by_us()

    def abort(self) -> None:
        """Cut the connection now, whatever is in flight."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
        self._closed_by_us()

    # -- internals

    def _closed_by_us(self) -> None:
        state = self.state
        if state is IDLE or state is CLOSED:
            self.state = CLOSED
        else:
            self.state = BROKEN  # an exchange in progress: its finish() ends it

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
        answer = self._answer
        if answer.error is None and not answer.complete:
            answer.error = error
        self.abort()
        self._wake()

    def _too_big(self) -> UpstreamError:
        return UpstreamError(f"upstream {self.origin.label} sent too big a header")

    def on_deadline(self) -> None:
        # Armed once per exchange, re-armed from the last read instead of reset on every read
        # (a timer per chunk costs more than a clock read per chunk).
        self._due = None
        if self.state is not READING:
            return  # read whole, failed or finished: nothing to time out
        now = self._loop.time()
        answer = self._answer
        if self._flow.read_paused:
            # Not reading because the client is slow: the upstream is not the one silent.
            self._due = self._deadlines.add(now + answer.timeout, answer.timeout, self)
            return
        deadline = answer.last_read + answer.timeout
        if now < deadline:
            self._due = self._deadlines.add(deadline, answer.timeout, self)
            return
        self._fail(UpstreamTimeout(f"upstream {self.origin.label} timed out"))

    def _cancel_timer(self) -> None:
        if self._due is not None:
            self._deadlines.remove(self._due, self)
            self._due = None
