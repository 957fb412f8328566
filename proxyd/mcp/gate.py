"""McpGate: what a request may do by MCP's rules and the roles (DESIGN.md step 5).

It reads the request's JSON-RPC message (one reading, proxyd.mcp.era), decides whether the
session may use the app and the tool it calls, answers a denied tools/call itself, and chooses
the filter every answer of a restricted session goes through (proxyd.mcp.filter).
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from proxyd.auth.session import Session
from proxyd.body import RequestBody
from proxyd.config import ServerSettings
from proxyd.errors import Forbidden, InsufficientScope, ProxydError
from proxyd.mcp.audit import AuditContext
from proxyd.mcp.era import (
    check_framing,
    check_routing_headers,
    inflated,
    is_modern,
    message_kind,
    parse_message,
)
from proxyd.mcp.exchange import Exchange
from proxyd.mcp.filter import ToolsListFilter
from proxyd.mcp.pinning import SESSION_HEADER, SessionPinning
from proxyd.mcp.policy import Access, Policy
from proxyd.mcp.toolcalls import ToolCalls
from proxyd.registry import App


class McpGate:
    def __init__(
        self,
        server: ServerSettings,
        policy: Policy,
        pinning: SessionPinning,
        tool_calls: ToolCalls | None = None,
    ) -> None:
        self.server = server
        self.policy = policy
        self.pinning = pinning
        self.tool_calls = tool_calls

    def app_access(self, app: App, session: Session) -> Access:
        access = self.policy.access(session.key, session.identity, app.name, app.labels)
        if not access.app_allowed:
            scope = access.step_up_scope(None)
            if scope is not None:
                raise InsufficientScope("this app needs a scope the token lacks", scope=scope)
            raise Forbidden("access to this app is denied by proxyd policy", reason="app_denied")
        return access

    def enforce_tools(
        self, app: App, exchange: Exchange, access: Access, audit: AuditContext
    ) -> web.Response | None:
        """A tools/call for a tool the session may not use is answered here, never forwarded."""
        if exchange.method != "tools/call":
            return None
        name = exchange.param("name")
        if access.unrestricted or (isinstance(name, str) and access.tool_allowed(name)):
            self._count(app, name, "allowed")
            return None
        assert exchange.message is not None
        if exchange.kind == "notification":
            # No id, so no answer to give (JSON-RPC §4.1): accepted, dropped, audited.
            self._count(app, name, "denied")
            audit.exchange("POST", exchange, 202, None, allowed=False)
            return web.Response(status=202)
        scope = access.step_up_scope(name) if isinstance(name, str) else None
        if scope is not None:
            # A role granting by scope would allow it: 403 insufficient_scope, so the client
            # authorizes again with that scope (MCP 2025-11-25 step-up) and retries.
            self._count(app, name, "step_up")
            audit.exchange("POST", exchange, 403, None, allowed=False)
            raise InsufficientScope(f"tool {name!r} needs a scope the token lacks", scope=scope)
        self._count(app, name, "denied")
        audit.exchange("POST", exchange, 200, None, allowed=False)
        # Teleport's answer: HTTP 200, JSON-RPC -32602 with the same id, a clear message.
        return web.json_response(
            {
                "jsonrpc": "2.0",
                "id": exchange.message.get("id"),
                "error": {
                    "code": -32602,
                    "message": f"access to tool {name!r} is denied by proxyd policy",
                },
            }
        )

    def _count(self, app: App, name: object, decision: str) -> None:
        if self.tool_calls is not None:
            self.tool_calls.count(app.name, name, decision)

    def tools_filter(
        self, exchange: Exchange, access: Access, headers: CIMultiDict[str]
    ) -> ToolsListFilter | None:
        """Under restricting roles, every answer is read for tool lists (proxyd.mcp.filter)."""
        if access.unrestricted:
            return None
        message = exchange.message
        is_request = message is not None and exchange.kind == "request"
        request_id = message.get("id") if message is not None and is_request else None
        strict = is_request and exchange.method == "tools/list"
        # An answer proxyd must read: ask for it uncompressed (RFC 9110 §12.5.3: no
        # Accept-Encoding at all would mean "any coding").
        headers["Accept-Encoding"] = "identity"
        return ToolsListFilter(access, request_id=request_id, strict=strict)

    async def exchange(
        self, request: web.Request, app: App, session: Session, audit: AuditContext
    ) -> Exchange:
        """What the request carries: its JSON-RPC message (POST), era and pinned session."""
        limit = self.server.max_request_body
        try:
            check_framing(request.method, request.headers, request.body_exists)
        except ProxydError as err:
            audit.invalid(request, err)
            raise
        modern = is_modern(request.headers)
        client_id = None if modern else request.headers.get(SESSION_HEADER)
        pin = None
        if client_id is not None:
            pin = self.pinning.open(app, session.identity, client_id)
        if request.method != "POST":
            return Exchange(modern, RequestBody.empty(), pin, client_id)
        # A POST carries one JSON-RPC message: read (bounded, 413) and parse it for the era
        # check, tool policy and audit. Batches were removed in 2025-06-18: refused explicitly.
        timeout = self.server.body_timeout
        body = await RequestBody.read_all(request, limit, timeout)
        try:
            encodings = request.headers.getall("Content-Encoding", [])
            raw = inflated(body.data or b"", encodings, limit)
            message = parse_message(raw)
            kind = message_kind(message)
            if modern:
                # 2026-07-28: stateless, any server; the routing headers must mirror the body.
                check_routing_headers(request.headers, message)
        except ProxydError as err:
            audit.invalid(request, err)
            raise
        return Exchange(modern, body, pin, client_id, message, kind)
