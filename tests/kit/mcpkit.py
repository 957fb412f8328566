"""Test kit: a real MCP upstream server and a real MCP client, both from the official SDK.

Targets ``mcp`` 2.3.0 (SDK v2). Everything runs inside the *current* asyncio event loop (no
threads, no subprocesses), so it composes with pytest-asyncio tests and an in-process proxy.

    from tests.kit.mcpkit import LEGACY, MODERN, mcp_client, upstream_server

    async with upstream_server(json_response=False, stateless=False, name="up") as up:
        up.url            # http://127.0.0.1:PORT/mcp
        async with mcp_client(up.url, "token", {"x-proxyd-identity": "alice"}, mode=LEGACY) as c:
            await c.list_tools(); await c.call_tool("add", {"a": 1, "b": 2})
            result, events = await c.call_tool_with_progress("progress", {"steps": 3,
                                                                         "delay": 0.2})
        up.calls, up.rpcs, up.requests, up.headers_seen
        await up.stop(); await up.start()   # abrupt kill / restart on the same port

Upstream server (``upstream_server``)
    ``mcp.server.mcpserver.MCPServer`` (v1's FastMCP) -> ``MCPServer.streamable_http_app(
    streamable_http_path="/mcp", json_response=..., stateless_http=..., transport_security=...)``
    served by a ``uvicorn.Server`` task on 127.0.0.1 (port 0 first, then the same port on
    restart; readiness = an Event set after ``uvicorn.Server.startup``). Tools: ``echo(text)``,
    ``add(a, b)``, ``progress(steps, delay)`` (``ctx.report_progress`` per step, ``delay`` s
    apart, returns "done"), ``whoami()`` (returns the ``x-proxyd-identity`` request header via
    ``Context.headers``, "" if absent). Tool calls / JSON-RPC methods are recorded by a
    ``MCPServer.middleware`` hook; HTTP requests (method, path, lowercase headers) by an ASGI
    wrapper.

Client (``mcp_client``)
    ``mcp.Client(transport, mode=..., cache=None)`` with ``transport = mcp.client.
    streamable_http.streamable_http_client(url, http_client=httpx2.AsyncClient(...),
    terminate_on_close=True)``. The ``httpx2.AsyncClient`` carries ``Authorization: Bearer
    <token>`` and the extra headers as defaults, plus ``event_hooks`` recording every HTTP
    request sent / response received. Progress: ``Client.call_tool(...,
    progress_callback=cb)`` with ``cb(progress, total, message)`` (``mcp.shared.dispatcher.
    ProgressFnT``). The v2 transport yields only ``(read, write)`` - there is no
    ``get_session_id`` callback any more - so the session id is read from the
    ``mcp-session-id`` response header. On exit the transport sends ``DELETE`` with
    ``Mcp-Session-Id`` (only if it holds one; non-200 is just logged). ``cache=None`` disables
    the v2 client response cache, which could otherwise answer tools/list without the wire.

Protocol eras (read from the SDK source, verified by tests/test_mcpkit.py)
    * Handshake era: 2024-11-05, 2025-03-26, 2025-06-18, 2025-11-25
      (``mcp_types.version.HANDSHAKE_PROTOCOL_VERSIONS``); modern/stateless era: 2026-07-28
      (``MODERN_PROTOCOL_VERSIONS``).
    * Client default ``mode="auto"``: first POSTs ``server/discover`` with
      ``MCP-Protocol-Version: 2026-07-28`` and ``Mcp-Method: server/discover``. A v2 server
      answers it, so **by default the v2 client negotiates 2026-07-28** against a v2 server.
      Any JSON-RPC error or bare HTTP 4xx falls back to ``initialize`` offering 2025-11-25
      (except -32022 whose ``supported`` list has only modern versions: raised). Network
      errors propagate.
    * Client side: ``mode="legacy"`` (``LEGACY``) forces initialize/2025-11-25 with sessions;
      ``mode="2026-07-28"`` (``MODERN``) adopts the modern era blindly - nothing is sent on
      connect, no probe, a DiscoverResult is synthesised. Anything else raises ValueError.
    * Server side: the v2 SDK has NO knob to disable an era. ``StreamableHTTPSessionManager``
      routes each request purely on its ``MCP-Protocol-Version`` header: absent or a handshake
      version -> legacy transport (stateful, or ``stateless_http=True``); anything else ->
      the modern single-exchange handler, whatever ``stateless_http`` says (so a stateless
      server and a stateful one both speak 2026-07-28). ``upstream_server(era=...)`` emulates
      single-era servers with an ASGI filter: ``"legacy"`` answers modern-header POSTs with
      HTTP 400 + JSON-RPC -32022 ``{"supported": [handshake versions]}`` (an auto client then
      falls back to initialize); ``"modern"`` answers POSTs without a modern header with 400 +
      -32022 ``{"supported": ["2026-07-28"]}`` and GET/DELETE with 405. (SDK-only alternative
      for legacy: override the ``server/discover`` handler to advertise no modern version.)
    * Headers the v2 client sends. Always: ``Accept: application/json, text/event-stream``,
      ``Content-Type: application/json`` (also on GET/DELETE; the GET adds ``Cache-Control:
      no-store``), and the httpx client defaults.
      - legacy: the ``initialize`` POST has NO ``MCP-Protocol-Version`` and no session id;
        every later request (``notifications/initialized`` POST -> 202, the standalone GET
        SSE stream opened right after it, later POSTs, DELETE) carries
        ``MCP-Protocol-Version: 2025-11-25`` and ``Mcp-Session-Id``. No ``Mcp-Method`` /
        ``Mcp-Name``.
      - modern: every POST carries ``MCP-Protocol-Version: 2026-07-28``, ``Mcp-Method:
        <method>``, and for tools/call, prompts/get, resources/read ``Mcp-Name: <name|uri>``
        (plus ``Mcp-Param-*`` for x-mcp-header annotated arguments). ``params._meta`` carries
        protocolVersion/clientInfo/clientCapabilities. No session id, no
        notifications/initialized, no GET stream, no DELETE. The server checks header == body
        (mismatch -> HTTP 400, JSON-RPC -32020 HEADER_MISMATCH).

SDK quirks relevant to a proxy
    * DNS-rebinding protection is auto-enabled when ``transport_security`` is None and host is
      127.0.0.1/localhost/::1 (Host must be ``127.0.0.1:*``/``localhost:*``/``[::1]:*``, else
      421; Origin ``http://127.0.0.1:*`` etc., else 403). ``upstream_server`` passes
      ``TransportSecuritySettings(enable_dns_rebinding_protection=False)``, so any forwarded
      Host/Origin is accepted. POST Content-Type must still be application/json.
    * Progress only flows in SSE mode; with ``json_response=True`` it is silently dropped in
      both eras. Modern SSE mode commits to ``text/event-stream`` only once the handler emits
      its first notification (else after 15 s, then ``: ping`` keepalives); a silent handler
      gets a plain ``application/json`` 200 even in SSE mode.
    * After the first ``call_tool`` of a tool it has not listed, the client sends its own
      ``tools/list`` (output-schema validation) - expect it on the wire.
    * Legacy ``stateless_http=True``: no ``Mcp-Session-Id``, hence no GET stream, no DELETE.
    * Unknown/expired session id -> 404 with body ``{"jsonrpc":"2.0","id":null,"error":
      {"code":-32600,"message":"Session not found"}}``. The client surfaces a JSON-RPC error
      body as is (``MCPError``); a 404 without one becomes -32600 "Session terminated" (with
      a session id) or -32601 "Not Found" (without); other bare >=400 -> -32603; 202 to a
      request -> -32600. The client never re-initializes: the session stays dead.
    * Connection-level failures are NOT MCPErrors: a refused connect / disconnect before the
      response headers on a request POST escapes as ``httpx2.ConnectError`` /
      ``RemoteProtocolError`` inside an ExceptionGroup from ``async with Client`` (the call is
      cancelled). A failed *notification* POST kills the transport quietly; later calls fail
      with -32000 "Connection closed". A stream cut after the SSE headers gives
      ``MCPError(-32000, "SSE stream ended without a response")`` and the client survives.
    * Errors raised inside ``async with Client`` often arrive wrapped in (nested)
      ExceptionGroups (anyio task groups).
    * ``MCPServer()`` calls ``logging.basicConfig(level=...)``; we pass ``log_level="WARNING"``.
    * Stateful sessions idle out after 30 min (``session_idle_timeout``); max 10 000 sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
import uvicorn
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import UNSUPPORTED_PROTOCOL_VERSION, CallToolResult, ListToolsResult
from mcp_types.version import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    LATEST_HANDSHAKE_VERSION,
    MODERN_PROTOCOL_VERSIONS,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "AUTO",
    "LEGACY",
    "LEGACY_VERSION",
    "MODERN",
    "MODERN_VERSION",
    "Era",
    "McpClient",
    "ProgressEvent",
    "ReceivedResponse",
    "RpcSeen",
    "SeenRequest",
    "SentRequest",
    "ToolCall",
    "UpstreamServer",
    "mcp_client",
    "upstream_server",
]

LEGACY = "legacy"
"""``mcp_client(mode=LEGACY)``: initialize handshake, session-based era (negotiates 2025-11-25)."""
MODERN_VERSION: str = MODERN_PROTOCOL_VERSIONS[-1]
"""The stateless per-request era version ("2026-07-28")."""
MODERN = MODERN_VERSION
"""``mcp_client(mode=MODERN)``: adopt 2026-07-28 directly, no probe."""
AUTO = "auto"
"""``mcp_client(mode=AUTO)``: the SDK default: probe server/discover, fall back to initialize."""
LEGACY_VERSION: str = LATEST_HANDSHAKE_VERSION
"""The version a legacy-mode v2 client offers and a v2 server accepts ("2025-11-25")."""

Era = Literal["both", "legacy", "modern"]

MCP_PATH = "/mcp"
IDENTITY_HEADER = "x-proxyd-identity"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A ``tools/call`` that reached the upstream MCP layer (after HTTP + JSON-RPC parsing)."""

    name: str
    arguments: dict[str, Any]
    protocol_version: str


@dataclass(frozen=True)
class RpcSeen:
    """Any JSON-RPC request/notification that reached the upstream MCP layer."""

    method: str
    protocol_version: str
    is_notification: bool


@dataclass(frozen=True)
class SeenRequest:
    """An HTTP request as received by the upstream (before any MCP processing)."""

    method: str
    path: str
    headers: dict[str, str]  # lowercase names; a repeated header keeps its last value


@dataclass(frozen=True)
class SentRequest:
    """An HTTP request as sent by the SDK client (recorded via an httpx2 request hook)."""

    method: str
    url: str
    headers: dict[str, str]  # lowercase names
    rpc_method: str | None
    """JSON-RPC "method" of a POST body (None for GET/DELETE and posted responses)."""


@dataclass(frozen=True)
class ReceivedResponse:
    """An HTTP response the SDK client received (status line + headers only)."""

    method: str
    status: int
    headers: dict[str, str]  # lowercase names


@dataclass(frozen=True)
class ProgressEvent:
    """One ``notifications/progress`` delivered to the client, with its arrival time."""

    progress: float
    total: float | None
    message: str | None
    at: float  # time.monotonic() at delivery


# --------------------------------------------------------------------------------------------
# Upstream server
# --------------------------------------------------------------------------------------------


def _build_mcp(
    name: str, calls: list[ToolCall], rpcs: list[RpcSeen], gate: asyncio.Semaphore
) -> MCPServer[Any]:
    # log_level: MCPServer() calls logging.basicConfig(level=...) on construction.
    mcp: MCPServer[Any] = MCPServer(name, log_level="WARNING")

    async def record(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        rpcs.append(RpcSeen(ctx.method, ctx.protocol_version, ctx.request_id is None))
        if ctx.method == "tools/call" and ctx.params is not None:
            raw_args = ctx.params.get("arguments")
            args: dict[str, Any] = dict(raw_args) if isinstance(raw_args, dict) else {}
            calls.append(ToolCall(str(ctx.params.get("name")), args, ctx.protocol_version))
        return await call_next(ctx)

    mcp.middleware.append(record)

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    async def progress(steps: int, delay: float, ctx: Context[Any, Any]) -> str:
        """Send `steps` progress notifications, `delay` seconds apart, then return "done"."""
        for i in range(steps):
            if i:
                await asyncio.sleep(delay)
            await ctx.report_progress(i + 1, steps, f"step {i + 1}/{steps}")
        return "done"

    @mcp.tool()
    async def stepped(steps: int, ctx: Context[Any, Any]) -> str:
        """One progress notification per step; each next step waits for the test's release.

        A test can thereby prove that step N reached the client before step N+1 existed.
        """
        for i in range(steps):
            await ctx.report_progress(i + 1, steps, f"step {i + 1}/{steps}")
            if i + 1 < steps:
                await gate.acquire()
        return "done"

    @mcp.tool()
    def whoami(ctx: Context[Any, Any]) -> str:
        """Return the x-proxyd-identity request header ("" when absent)."""
        headers = ctx.headers
        return (headers.get(IDENTITY_HEADER) if headers is not None else None) or ""

    return mcp


def _era_rejection(era: Era, scope: Scope) -> tuple[int, list[str]] | None:
    """Decide whether the single-era emulation rejects this request: (status, supported) or None."""
    if era == "both":
        return None
    pv: str | None = None
    for k, v in scope["headers"]:
        if k == b"mcp-protocol-version":
            pv = v.decode("latin-1")
    modern = pv is not None and pv not in HANDSHAKE_PROTOCOL_VERSIONS
    if era == "legacy" and modern:
        return 400, list(HANDSHAKE_PROTOCOL_VERSIONS)
    if era == "modern" and not modern:
        return (400 if scope["method"] == "POST" else 405), list(MODERN_PROTOCOL_VERSIONS)
    return None


class _Recorder:
    """ASGI wrapper: records every HTTP request; optionally emulates a single-era server."""

    def __init__(self, app: ASGIApp, seen: list[SeenRequest], era: Era) -> None:
        self.app = app
        self.seen = seen
        self.era = era

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append(SeenRequest(scope["method"], scope["path"], headers))
        rejection = _era_rejection(self.era, scope)
        if rejection is None:
            await self.app(scope, receive, send)
            return
        status, supported = rejection
        if status == 405:
            await send(
                {
                    "type": "http.response.start",
                    "status": 405,
                    "headers": [(b"allow", b"POST")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        body = bytearray()
        while True:
            msg: Message = await receive()
            if msg["type"] != "http.request":
                break
            body.extend(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        request_id: Any = None
        requested = headers.get("mcp-protocol-version")
        with contextlib.suppress(ValueError):
            decoded = json.loads(body)
            if isinstance(decoded, dict):
                request_id = decoded.get("id")
                params = decoded.get("params")
                if requested is None and isinstance(params, dict):
                    requested = params.get("protocolVersion")
        data: dict[str, Any] = {"supported": supported}
        if isinstance(requested, str):
            data["requested"] = requested
        payload = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {
                    "code": UNSUPPORTED_PROTOCOL_VERSION,
                    "message": f"Unsupported protocol version (server speaks only {supported})",
                    "data": data,
                },
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class _UvicornServer(uvicorn.Server):
    """uvicorn.Server signalling readiness via an asyncio.Event; leaves signal handlers alone."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(server: _UvicornServer) -> None:
    # uvicorn sys.exit()s on startup failure (e.g. port taken); a SystemExit escaping a task
    # would tear down the whole event loop, so turn it into an ordinary exception.
    try:
        await server.serve()
    except SystemExit as exc:
        raise RuntimeError(f"uvicorn exited with status {exc.code}") from exc


@dataclass
class UpstreamServer:
    """A running (or stopped) SDK MCP server. Create with ``upstream_server()``."""

    name: str = "up"
    json_response: bool = False
    stateless: bool = False
    era: Era = "both"
    host: str = "127.0.0.1"
    port: int = 0
    calls: list[ToolCall] = field(default_factory=list)
    """Every tools/call that reached the MCP layer, in arrival order."""
    rpcs: list[RpcSeen] = field(default_factory=list)
    """Every JSON-RPC request/notification that reached the MCP layer."""
    requests: list[SeenRequest] = field(default_factory=list)
    """Every HTTP request that reached the server (method, path, lowercase headers)."""
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    """Released by a test to let the ``stepped`` tool produce its next step."""
    _mcp: MCPServer[Any] | None = field(default=None, repr=False)
    _server: _UvicornServer | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{MCP_PATH}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers_seen(self) -> list[dict[str, str]]:
        """Headers (lowercase names) of every HTTP request that reached the server."""
        return [r.headers for r in self.requests]

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def mcp(self) -> MCPServer[Any]:
        if self._mcp is None:
            self._mcp = _build_mcp(self.name, self.calls, self.rpcs, self.gate)
        return self._mcp

    def tool_names(self) -> list[str]:
        return ["echo", "add", "progress", "stepped", "whoami"]

    async def start(self) -> None:
        """Start serving: first on a free port, afterwards on the same port. Fresh MCP state."""
        if self.running:
            raise RuntimeError("upstream server already running")
        # A new Starlette app each start: the SDK's session manager can only run() once.
        app = self.mcp.streamable_http_app(
            streamable_http_path=MCP_PATH,
            json_response=self.json_response,
            stateless_http=self.stateless,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            host=self.host,
        )
        config = uvicorn.Config(
            _Recorder(app, self.requests, self.era),
            host=self.host,
            port=self.port,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="on",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        server = _UvicornServer(config)
        task = asyncio.get_running_loop().create_task(
            _serve(server), name=f"mcpkit-upstream-{self.name}"
        )
        ready = asyncio.ensure_future(server.ready.wait())
        try:
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not server.ready.is_set():
            exc = task.exception() if task.done() and not task.cancelled() else None
            raise RuntimeError(
                f"upstream server failed to start on {self.host}:{self.port}: {exc!r}"
            )
        sockets = server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])
        self._server, self._task = server, task

    async def stop(self) -> None:
        """Kill the server abruptly: stop listening, reset every open connection, then shut down.

        In-flight requests/SSE streams are cut (the client sees a dropped connection), new
        connections are refused. All MCP sessions are lost; ``start()`` brings up a fresh server
        on the same port.
        """
        server, task = self._server, self._task
        if server is None or task is None:
            return
        for listener in server.servers:
            listener.close()
        for conn in list(server.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        await self._finish(server, task)

    async def close(self) -> None:
        """Graceful shutdown (open streams get ``timeout_graceful_shutdown`` = 1 s)."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        await self._finish(server, task)

    async def _finish(self, server: _UvicornServer, task: asyncio.Task[None]) -> None:
        server.should_exit = True
        try:
            # RuntimeError: uvicorn exited abnormally; nothing left to clean up.
            with contextlib.suppress(RuntimeError):
                await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            self._server, self._task = None, None


@contextlib.asynccontextmanager
async def upstream_server(
    *,
    json_response: bool = False,
    stateless: bool = False,
    name: str = "up",
    era: Era = "both",
) -> AsyncIterator[UpstreamServer]:
    """Run an SDK ``MCPServer`` (tools echo/add/progress/whoami) on 127.0.0.1 at ``/mcp``.

    Args:
        json_response: answer POSTs with ``application/json`` instead of SSE (drops progress).
        stateless: legacy-era stateless mode (``stateless_http=True``): no Mcp-Session-Id.
        name: server name (``serverInfo.name``).
        era: "both" (SDK behaviour), or emulate a "legacy"-only / "modern"-only server.
    """
    up = UpstreamServer(name=name, json_response=json_response, stateless=stateless, era=era)
    await up.start()
    try:
        yield up
    finally:
        await up.close()


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


@dataclass
class McpClient:
    """An initialized SDK client plus the HTTP-level records of what it sent and received."""

    client: Client
    http: httpx2.AsyncClient
    url: str
    sent: list[SentRequest]
    received: list[ReceivedResponse]

    @property
    def session(self) -> ClientSession:
        """The underlying v2 ``ClientSession``."""
        return self.client.session

    @property
    def protocol_version(self) -> str:
        """Negotiated protocol version ("2025-11-25" legacy era, "2026-07-28" modern era)."""
        return self.client.protocol_version

    @property
    def session_id(self) -> str | None:
        """The ``Mcp-Session-Id`` the server issued (legacy stateful era only), else None."""
        for resp in self.received:
            sid = resp.headers.get("mcp-session-id")
            if sid:
                return sid
        return None

    async def list_tools(self) -> ListToolsResult:
        return await self.client.list_tools()

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        read_timeout_seconds: float | None = None,
        progress_callback: ProgressFnT | None = None,
    ) -> CallToolResult:
        return await self.client.call_tool(
            name,
            arguments,
            read_timeout_seconds=read_timeout_seconds,
            progress_callback=progress_callback,
        )

    async def call_tool_with_progress(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        read_timeout_seconds: float | None = None,
    ) -> tuple[CallToolResult, list[ProgressEvent]]:
        """Call a tool, collecting its progress notifications (with monotonic arrival times)."""
        events: list[ProgressEvent] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            events.append(ProgressEvent(progress, total, message, time.monotonic()))

        result = await self.call_tool(
            name,
            arguments,
            read_timeout_seconds=read_timeout_seconds,
            progress_callback=on_progress,
        )
        return result, events

    async def delete_session(self) -> int | None:
        """DELETE ``url`` with the current Mcp-Session-Id; return the status (None: no session).

        The SDK transport also sends its own DELETE when the ``mcp_client`` context exits.
        """
        sid = self.session_id
        if sid is None:
            return None
        headers = {"mcp-session-id": sid, "mcp-protocol-version": self.protocol_version}
        response = await self.http.delete(self.url, headers=headers)
        return response.status_code

    def sent_for(self, rpc_method: str) -> list[SentRequest]:
        """HTTP requests whose JSON-RPC body had ``method == rpc_method``."""
        return [r for r in self.sent if r.rpc_method == rpc_method]


@contextlib.asynccontextmanager
async def mcp_client(
    url: str,
    token: str | None,
    extra_headers: dict[str, str] | None = None,
    *,
    mode: str = AUTO,
    read_timeout_seconds: float | None = 30.0,
    http_timeout: float = 30.0,
) -> AsyncIterator[McpClient]:
    """An initialized SDK client talking streamable HTTP to ``url``.

    Args:
        url: the MCP endpoint (``.../mcp``).
        token: sent as ``Authorization: Bearer <token>`` on every HTTP request (None: no header).
        extra_headers: more default headers for every request.
        mode: ``AUTO`` (SDK default; server/discover probe, fallback to initialize),
            ``LEGACY`` (initialize handshake, 2025-11-25, sessions) or ``MODERN`` ("2026-07-28").
        read_timeout_seconds: per-request JSON-RPC read timeout of the SDK session.
        http_timeout: httpx2 connect/write/pool timeout (read timeout is 300 s for SSE streams).

    SDK functions used: ``httpx2.AsyncClient(headers=..., timeout=..., event_hooks=...)``,
    ``mcp.client.streamable_http.streamable_http_client(url, http_client=...,
    terminate_on_close=True)``,
    ``mcp.Client(transport, mode=..., cache=None, read_timeout_seconds=...)`` (its ``__aenter__``
    runs ``negotiate_auto`` / ``ClientSession.initialize`` / ``ClientSession.adopt``),
    ``Client.list_tools``, ``Client.call_tool(progress_callback=...)``.
    """
    headers: dict[str, str] = dict(extra_headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    sent: list[SentRequest] = []
    received: list[ReceivedResponse] = []

    async def on_request(request: httpx2.Request) -> None:
        rpc_method: str | None = None
        if request.method == "POST":
            with contextlib.suppress(Exception):
                body = json.loads(request.content)
                if isinstance(body, dict) and isinstance(body.get("method"), str):
                    rpc_method = body["method"]
        hdrs = {k.lower(): v for k, v in request.headers.items()}
        sent.append(SentRequest(request.method, str(request.url), hdrs, rpc_method))

    async def on_response(response: httpx2.Response) -> None:
        hdrs = {k.lower(): v for k, v in response.headers.items()}
        received.append(ReceivedResponse(response.request.method, response.status_code, hdrs))

    http = httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(http_timeout, read=300.0),
        event_hooks={"request": [on_request], "response": [on_response]},
    )
    async with http:
        transport = streamable_http_client(url, http_client=http, terminate_on_close=True)
        client = Client(transport, mode=mode, cache=None, read_timeout_seconds=read_timeout_seconds)
        async with client:
            yield McpClient(client=client, http=http, url=url, sent=sent, received=received)
