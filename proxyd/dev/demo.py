"""A small MCP server (streamable HTTP, 2025-11-25 era) embedded for ``proxyd dev``.

Tools: ``echo``, ``add`` and ``countdown`` (streams one progress notification per step over
SSE). It mints ``Mcp-Session-Id`` on initialize and answers an unknown session with 404, as
the spec asks; requests without a session id are served too, so a single curl can try it.
It also echoes the identity assertion proxyd sends (``whoami``), to show what apps receive.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from aiohttp import web

PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
TOOLS: list[dict[str, Any]] = [
    {
        "name": "echo",
        "description": "Return the text you send.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
    {
        "name": "add",
        "description": "Add two integers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
    {
        "name": "countdown",
        "description": "Count down, sending one progress notification per step.",
        "inputSchema": {
            "type": "object",
            "properties": {"steps": {"type": "integer"}, "interval": {"type": "number"}},
        },
    },
    {
        "name": "whoami",
        "description": "Show the identity proxyd asserted for this request.",
        "inputSchema": {"type": "object", "properties": {}},
    },
]


def _result(msg_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def _error(msg_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


class DemoServer:
    def __init__(self, identity_header: str = "X-Proxyd-Identity") -> None:
        self.sessions: set[str] = set()
        self._identity_header = identity_header

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self.post)
        app.router.add_delete("/mcp", self.delete)
        app.router.add_get("/mcp", self.get)
        return app

    async def get(self, request: web.Request) -> web.StreamResponse:
        # 2025-11-25 §Listening: a server without a standalone stream answers 405.
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    async def delete(self, request: web.Request) -> web.StreamResponse:
        sid = request.headers.get("Mcp-Session-Id")
        if sid is None or sid not in self.sessions:
            return web.json_response(_error(None, -32600, "session not found"), status=404)
        self.sessions.discard(sid)
        return web.Response(status=200)

    async def post(self, request: web.Request) -> web.StreamResponse:
        sid = request.headers.get("Mcp-Session-Id")
        if sid is not None and sid not in self.sessions:
            return web.json_response(_error(None, -32600, "session not found"), status=404)
        try:
            msg = json.loads(await request.read())
        except ValueError:
            return web.json_response(_error(None, -32700, "parse error"), status=400)
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or "method" not in msg:
            return web.json_response(_error(None, -32600, "invalid request"), status=400)
        if "id" not in msg:
            return web.Response(status=202)  # a notification
        method, msg_id = msg["method"], msg["id"]
        params = msg.get("params") or {}
        if method == "initialize":
            return self._initialize(msg_id, params)
        if method == "ping":
            return web.json_response(_result(msg_id, {}))
        if method == "tools/list":
            return web.json_response(_result(msg_id, {"tools": TOOLS}))
        if method == "tools/call":
            return await self._call(request, msg_id, params)
        return web.json_response(_error(msg_id, -32601, f"method not found: {method}"))

    def _initialize(self, msg_id: Any, params: dict[str, Any]) -> web.Response:
        asked = params.get("protocolVersion")
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
        sid = secrets.token_hex(16)
        self.sessions.add(sid)
        result = {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "proxyd-demo", "version": "1"},
        }
        return web.json_response(_result(msg_id, result), headers={"Mcp-Session-Id": sid})

    async def _call(
        self, request: web.Request, msg_id: Any, params: dict[str, Any]
    ) -> web.StreamResponse:
        name, args = params.get("name"), params.get("arguments") or {}
        if name == "echo":
            return web.json_response(_result(msg_id, _text(str(args.get("text", "")))))
        if name == "add":
            try:
                total = int(args["a"]) + int(args["b"])
            except (KeyError, TypeError, ValueError):
                return web.json_response(_error(msg_id, -32602, "add needs integers a and b"))
            return web.json_response(_result(msg_id, _text(str(total))))
        if name == "whoami":
            assertion = request.headers.get(self._identity_header, "")
            return web.json_response(_result(msg_id, _text(_claims_of(assertion))))
        if name == "countdown":
            return await self._countdown(request, msg_id, params)
        return web.json_response(_error(msg_id, -32602, f"unknown tool: {name}"))

    async def _countdown(
        self, request: web.Request, msg_id: Any, params: dict[str, Any]
    ) -> web.StreamResponse:
        args = params.get("arguments") or {}
        steps = max(1, min(int(args.get("steps", 5)), 100))
        interval = max(0.0, min(float(args.get("interval", 0.5)), 5.0))
        token = (params.get("_meta") or {}).get("progressToken", f"countdown-{msg_id}")
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for step in range(1, steps + 1):
            note = {
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {
                    "progressToken": token,
                    "progress": step,
                    "total": steps,
                    "message": f"{steps - step} to go",
                },
            }
            await resp.write(f"event: message\ndata: {json.dumps(note)}\n\n".encode())
            await asyncio.sleep(interval)
        final = _result(msg_id, _text("liftoff"))
        await resp.write(f"event: message\ndata: {json.dumps(final)}\n\n".encode())
        await resp.write_eof()
        return resp


def _claims_of(assertion: str) -> str:
    import base64

    try:
        payload = assertion.split(".")[1]
        return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    except (IndexError, ValueError):
        return "no identity assertion received"
