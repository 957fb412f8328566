"""The listeners' connection hygiene (issue 10): a head timeout, a connection cap, 431s.

aiohttp reads a request head with no deadline of its own: its keep-alive timer runs from the
connection's start (3630 s by default), so 400 clients trickling header bytes at 1 byte/s held
400 descriptors for an hour. ``GuardedHandler`` adds what nginx has
(client_header_timeout, worker_connections):

- ``server.header_timeout``: the head must be complete within it, counted from the
  connection's start and, on a keep-alive connection, from the first byte of each next request.
  Bytes that keep arriving do not extend it. A request being handled (a body being read, an
  SSE answer being relayed) is never timed by it.
- ``server.max_connections``: above it a new connection is closed as soon as it is accepted —
  not queued, not served — so the descriptors go to the connections already open.
- 431 with proxyd's JSON-RPC error body for heads over aiohttp's own parser ceilings (more
  header lines than ``max_headers``, a line longer than the field limit), which aiohttp
  answered with a plain-text 400; and as soon as a head in progress is longer than any valid
  one, which aiohttp would have buffered (up to 8 MiB) before anything could answer.
- ``server.keepalive_timeout`` for idle keep-alive connections (aiohttp's own timer).

The values in force are read for each new connection and each new head, so a reload applies
them to what comes next; the connections and heads already timed keep theirs.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import Counter

from proxyd.config import ServerSettings
from proxyd.errors import BadRequest, HeadersTooLarge, error_body, error_response
from proxyd.log import get_logger
from proxyd.metrics import Metrics

log = get_logger("proxyd.listener")

# Both aiohttp parsers (llhttp and pure Python) raise a plain BadHttpMessage with this text
# when a head has more than max_headers lines; there is no subclass to test for.
_TOO_MANY_HEADERS = "Too many headers received"
# Under a flood the metric counts every refusal; the log says so once a minute.
_REFUSED_LOG_INTERVAL = 60.0
CLOSE_REASONS = ("header_timeout", "headers_too_large")
# At a drain, how long a new connection that has sent nothing yet may take to send a request.
_DRAIN_SILENT_WAIT = 1.0
_ACCEPT_TURNS = 2

# GuardedHandler reads two private attributes of aiohttp's RequestHandler: ``_waiter``, the
# future start() awaits for the next message (aiohttp's _process_keepalive tests it the same
# way to know a connection is idle), and ``_request_count``, incremented for each message its
# parser produces; and drops a third, ``_keepalive_handle``, while a request is handled (see
# _drop_keepalive_timer). An aiohttp that renames them must fail here, at import, not run on
# without a head timeout.
if not {"_waiter", "_request_count", "_keepalive_handle"} <= set(RequestHandler.__slots__):
    raise ImportError("aiohttp's RequestHandler changed: review proxyd.listener.GuardedHandler")


class Listener:
    """What the connections of one listener share: how many are open, the settings in force
    and the metrics.

    ``capped=False`` (the admin listener): no max_connections, so a flood of MCP clients never
    locks an operator out of /metrics and /readyz. Without ``metrics`` nothing is counted.
    """

    def __init__(
        self,
        settings: Callable[[], ServerSettings],
        metrics: Metrics | None = None,
        *,
        capped: bool = True,
    ) -> None:
        self.settings = settings
        self.capped = capped
        self.open = 0
        self._refused: Counter | None = None
        self._closed: dict[str, Counter] = {}
        self._unlogged_refusals = 0
        self._refusal_logged_at = -math.inf
        if metrics is not None:
            self._refused = metrics.connections_refused
            # Children made now: every reason is scraped, at 0 until it happens.
            self._closed = {r: metrics.connections_closed.labels(r) for r in CLOSE_REASONS}
            metrics.open_connections.set_function(lambda: float(self.open))

    def admit(self) -> bool:
        """Count a new connection in, or refuse it (False) when the cap is reached."""
        limit = self.settings().max_connections
        if not self.capped or self.open < limit:
            self.open += 1
            return True
        if self._refused is not None:
            self._refused.inc()
        self._unlogged_refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= _REFUSED_LOG_INTERVAL:
            log.warning(
                "connections_refused",
                max_connections=limit,
                refused=self._unlogged_refusals,
                detail="server.max_connections are open: new connections are closed at once",
            )
            self._refusal_logged_at, self._unlogged_refusals = now, 0
        return False

    def release(self) -> None:
        self.open -= 1

    def closed(self, reason: str) -> None:
        child = self._closed.get(reason)
        if child is not None:
            child.inc()

    def protocol_factory(self, server: web.Server) -> Callable[[], GuardedHandler]:
        """What the event loop calls for each accepted connection, in place of ``server``."""
        loop = asyncio.get_running_loop()
        # aiohttp's own factory (Server.__call__) builds a RequestHandler from Server._kwargs
        # (private): the runner's arguments and the app's handler_args. The same arguments
        # here, with the keep-alive timeout in force when the connection is accepted.
        kwargs: dict[str, Any] = server._kwargs

        def factory() -> GuardedHandler:
            keepalive = self.settings().keepalive_timeout
            return GuardedHandler(
                server, loop=loop, listener=self, **{**kwargs, "keepalive_timeout": keepalive}
            )

        return factory


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol with the head timeout, the cap and 431s (module doc)."""

    __slots__ = (
        "_admitted",
        "_discarding",
        "_drain_first",
        "_first_head",
        "_head_bytes",
        "_head_timer",
        "_listener",
    )

    def __init__(self, manager: web.Server, *, listener: Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # of the head in progress, in the reads that did not complete it
        self._discarding = False  # answered 431 mid-head: the rest is read and dropped
        # A drain began before this connection's first request arrived (see close()).
        self._drain_first = False
        self._first_head: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._listener.admit():
            # Before aiohttp sees it: no task, no timer, not among the server's connections
            # (which a drain waits for). Closing at once, not leaving it in the accept queue,
            # tells the client now instead of after its own connect timeout.
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._listener.release()
        self._cancel_head_timer()
        self._first_head_settled()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            # A head in progress, timed since the connection's start or its first byte.
            if self._discarding:
                return
            produced = self._request_count
            super().data_received(data)
            if self._request_count != produced:
                # A whole head was parsed (or failed to parse, which answers and closes):
                # the request is being handled, only the body and upstream timeouts apply.
                self._cancel_head_timer()
                self._drop_keepalive_timer()
                if self._drain_first:
                    super().close()  # this request is answered, then the connection closes
                    self._first_head_settled()
                return
            self._head_bytes += len(data)
            if self._head_bytes > self._head_limit():
                self._refuse_head()
            return
        if not self._admitted:
            return
        # Bytes while no request is being handled start a next head; anything else (a body,
        # a request pipelined behind the one being handled) is not a head to time.
        next_head = bool(data) and self._idle()
        produced = self._request_count
        super().data_received(data)
        if self._request_count != produced:
            self._drop_keepalive_timer()
        elif next_head:
            # Only part of it came: timed from now, its first byte. (Arming only here spares
            # the usual case, a head in one write, a timer per request.)
            self._arm_head_timer()
            self._head_bytes = len(data)

    def close(self) -> None:
        # A drain (aiohttp's Server.pre_shutdown) closes every connection waiting for a
        # message. One still waiting for its first request was accepted moments ago: its
        # client has sent, or is sending, a request it expects answered, and a close now reads
        # to it as a reset it cannot safely retry (a POST). Across a restart with an inherited
        # socket (issue 13) that was the only request ever lost. So such a connection is kept
        # until its first head (bounded in shutdown()), answered, and then closed.
        if self._admitted and self._request_count == 0 and not self._discarding:
            self._drain_first = True
            return
        super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        if self._drain_first and self._request_count == 0 and self.transport is not None:
            await self._await_first_request(timeout)
        await super().shutdown(timeout)

    async def _await_first_request(self, limit: float | None) -> None:
        """Wait for the first head (the head timer bounds it: a connection that sends nothing
        is closed after server.header_timeout as always, and one silent for longer than
        _DRAIN_SILENT_WAIT is a preconnect, not a request in flight), then for its answer."""
        loop = asyncio.get_running_loop()
        self._first_head = loop.create_future()
        silent = None
        if self._head_bytes == 0:
            silent = loop.call_later(_DRAIN_SILENT_WAIT, self._silent_at_drain)
        started = loop.time()
        try:
            await asyncio.wait_for(self._first_head, limit)
        except TimeoutError:
            return
        finally:
            if silent is not None:
                silent.cancel()
            self._first_head = None
        task = self._task_handler
        if self._request_count == 0 or task is None or task.done():
            return
        # super().shutdown() waits only for a request it sees in progress, and the handler
        # task may not have picked this one up yet: wait for the task itself (close() above
        # makes it end after this one request).
        left = None if limit is None else max(0.0, limit - (loop.time() - started))
        await asyncio.wait({task}, timeout=left)

    def _silent_at_drain(self) -> None:
        if self._request_count == 0 and self._head_bytes == 0:
            self._first_head_settled()

    def _first_head_settled(self) -> None:
        waiter = self._first_head
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        problem = self._over_head_limit(exc) if status == 400 else None
        if problem is None:
            if status == 400 and isinstance(exc, BadHttpMessage):
                return self._malformed(request, exc)
            return super().handle_error(request, status, exc, message)
        # Not aiohttp's path: it logs a traceback per bad head, a log flood for any client.
        self._listener.closed("headers_too_large")
        log.info(
            "request_rejected",
            status=431,
            reason="headers_too_large",
            client=request.remote,
            detail=problem,
        )
        response = error_response(HeadersTooLarge(problem))
        # The parser stopped mid-head: nothing after it on this connection can be read.
        response.force_close()
        return response

    def _malformed(self, request: BaseRequest, exc: BadHttpMessage) -> web.StreamResponse:
        """A request aiohttp's parser refused (a repeated Content-Type, a bad character...):
        400 with a JSON-RPC body and one info line, not aiohttp's traceback at error level,
        which any client could make it write. The parser's text may quote the request (a
        token included), so neither the line nor the answer carries it."""
        kind = type(exc).__name__
        log.info(
            "request_rejected",
            status=400,
            reason="malformed_request",
            client=request.remote,
            error=kind,
        )
        response = error_response(
            BadRequest(f"malformed HTTP request ({kind})", reason="malformed_request")
        )
        response.force_close()  # the parser's state after a bad head is not to be trusted
        return response

    def _over_head_limit(self, exc: BaseException | None) -> str | None:
        if isinstance(exc, LineTooLong):
            # Also a request line over the limit: aiohttp raises the same error with the same
            # limit for it, and a head that long is over the head's budget either way.
            return f"a request header line exceeds the limit of {exc.args[1]} bytes"
        if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
            return f"more than {self.max_headers} request header lines"
        return None

    def _head_limit(self) -> int:
        # No valid head is longer: a request line within aiohttp's line ceiling, then headers
        # within server.max_header_size (app.py keeps the field ceiling above it). aiohttp's
        # parser alone buffered up to max_headers lines of the field ceiling each (128 x 64 KiB
        # = 8 MiB per connection) before handler.check_header_size could answer 431.
        budget = max(self.max_field_size, self._listener.settings().max_header_size)
        return self.max_line_size + budget

    def _refuse_head(self) -> None:
        transport = self.transport
        if transport is None or self._discarding:
            return
        self._discarding = True
        err = HeadersTooLarge(f"the request head exceeds {self._head_limit()} bytes")
        self._listener.closed("headers_too_large")
        log.info(
            "request_rejected",
            status=431,
            reason=err.reason,
            client=_peer(self.peername),
            detail=err.message,
        )
        # Written here, not through aiohttp's error path: that needs a parsed (or failed)
        # message, and the parser would first buffer the rest of this head.
        body = error_body(err.jsonrpc_code, err.message, err.status, err.reason)
        head = (
            f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        if transport.can_write_eof():
            # A lingering close: closing with the rest of the head unread would reset the
            # connection and could destroy the answer before the client reads it. The client
            # closes once it has read it; the head timer still armed bounds the wait.
            transport.write_eof()
        else:
            self.force_close()

    def _idle(self) -> bool:
        waiter = self._waiter  # private, read only (see the import-time check above)
        return waiter is not None and not waiter.done()

    def _arm_head_timer(self) -> None:
        timeout = self._listener.settings().header_timeout
        self._head_timer = asyncio.get_running_loop().call_later(timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _drop_keepalive_timer(self) -> None:
        # A head was parsed: aiohttp's keep-alive timer, armed at the connection's start and
        # at each response's end, stays pending while the request is handled, where its firing
        # does nothing (it closes only a connection waiting for a message), and aiohttp arms a
        # new one when the response ends if none is pending. So it is dropped for the request:
        # a pending timer per open SSE stream was ~0.5 KiB of the memory per idle stream
        # (issue 15), and 10,000 of them weighed on the loop's timer heap for nothing.
        handle = self._keepalive_handle
        if handle is not None:
            handle.cancel()
            self._keepalive_handle = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._first_head_settled()
        if self.transport is None:
            return
        if not self._discarding:  # (a 431 is counted as such)
            self._listener.closed("header_timeout")
            log.debug("connection_closed", reason="header_timeout", client=_peer(self.peername))
        # No 408: a client that stalls mid-head reads nothing, and a slowloris is owed
        # nothing (nginx closes silently too). force_close cancels the idle start() task.
        self.force_close()


_PLAIN_HTTP_BODY = error_body(
    -32600,
    "this port speaks TLS: use https://",
    400,
    "plain_http_on_tls_port",
)
_PLAIN_HTTP_ANSWER = (
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: application/json\r\n"
    f"Content-Length: {len(_PLAIN_HTTP_BODY)}\r\n"
    "Connection: close\r\n\r\n"
).encode() + _PLAIN_HTTP_BODY
_TLS_HANDSHAKE_RECORD = 0x16  # the first byte of every TLS ClientHello


class TLSFront(asyncio.Protocol):
    """A TLS listener's connection until its first bytes: a TLS ClientHello goes on to TLS
    (asyncio's SSLProtocol, then the GuardedHandler inside it); anything else is a client
    speaking plain HTTP to the TLS port, answered with a clear 400 instead of a handshake
    failure that the client sees as a reset or a hang. A connection that sends nothing is
    closed after server.header_timeout, as a head would be."""

    def __init__(
        self,
        context: ssl.SSLContext,
        app_protocol: Callable[[], asyncio.BaseProtocol],
        timeout: float,
    ) -> None:
        self._context = context
        self._app_protocol = app_protocol
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or not data:
            return
        self._cancel()
        if data[0] != _TLS_HANDSHAKE_RECORD:
            log.info(
                "request_rejected",
                status=400,
                reason="plain_http_on_tls_port",
                client=_peer(transport.get_extra_info("peername")),
            )
            transport.write(_PLAIN_HTTP_ANSWER)
            transport.close()
            self._transport = None
            return
        self._transport = None
        loop = asyncio.get_running_loop()
        handshake = loop.create_future()
        # A failed handshake (no client certificate under mTLS...) is the client's problem:
        # retrieved here, not reported as a future exception nobody read.
        handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        tls = sslproto.SSLProtocol(
            loop,
            self._app_protocol(),
            self._context,
            handshake,
            server_side=True,
            ssl_handshake_timeout=max(1, math.ceil(self._timeout)),
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        view = memoryview(data)
        while view:
            buffer = tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(peername: Any) -> str | None:
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername) if peername else None


class ListenerSite(web.BaseSite):
    """A listening socket whose connections are GuardedHandlers of ``listener``: bound to
    ``host``/``port``, to a unix socket ``path``, or an already bound ``sock`` (inherited, as
    with systemd socket activation)."""

    __slots__ = ("_host", "_listener", "_path", "_port", "_reuse_port", "_sock", "_tls")

    def __init__(
        self,
        runner: web.BaseRunner,
        listener: Listener,
        *,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        # TLS is TLSFront's (a plain-HTTP request gets a 400), not the event loop's.
        super().__init__(runner, backlog=backlog)
        self._tls = ssl_context
        if [port is not None, path is not None, sock is not None].count(True) != 1:
            raise ValueError("a listener takes exactly one of port, path or sock")
        self._listener = listener
        self._host, self._port, self._path, self._sock = host, port, path, sock
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if self._tls else "http"
        if self._path is not None:
            return f"{scheme}://unix:{self._path}:"
        if self._sock is not None:
            address = self._sock.getsockname()
            if isinstance(address, str):  # AF_UNIX
                return f"{scheme}://unix:{address}:"
            return f"{scheme}://{_netloc(address[0], address[1])}"
        return f"{scheme}://{_netloc(self._host or '0.0.0.0', self._port or 0)}"  # noqa: S104

    async def stop(self) -> None:
        await super().stop()
        # A connection the loop accepted before the close reaches connection_made a turn or
        # two later (asyncio: the accept task, then the transport's call_soon; uvloop: one
        # call_soon). aiohttp's cleanup yields one turn before its drain looks at the
        # connections; without these, one accepted just before would be missed by the drain
        # and answered by nobody when the process exits.
        for _ in range(_ACCEPT_TURNS):
            await asyncio.sleep(0)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        # _runner, _ssl_context, _backlog and _server are BaseSite's, kept for its subclasses
        # (aiohttp's own sites use them the same way; stop() closes _server).
        server = self._runner.server
        assert server is not None  # BaseSite refuses a runner that was not set up
        guarded = self._listener.protocol_factory(server)
        factory: Callable[[], asyncio.BaseProtocol] = guarded
        if self._tls is not None:
            context, listener = self._tls, self._listener

            def factory() -> asyncio.BaseProtocol:
                return TLSFront(context, guarded, listener.settings().header_timeout)

        if self._path is not None:
            self._server = await loop.create_unix_server(
                factory, self._path, ssl=self._ssl_context, backlog=self._backlog
            )
        elif self._sock is not None:
            self._server = await loop.create_server(
                factory, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
            )
        else:
            assert self._port is not None  # __init__ takes exactly one of port, path, sock
            self._server = await loop.create_server(
                factory,
                self._host,
                self._port,
                ssl=self._ssl_context,
                backlog=self._backlog,
                reuse_address=True,
                reuse_port=self._reuse_port,
            )
