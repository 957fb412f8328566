"""Real aiohttp upstreams on 127.0.0.1: `Echo` records what reaches it, `Upstreams` owns them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy


@dataclass
class SeenRequest:
    method: str
    path: str
    raw_query: str
    headers: CIMultiDictProxy[str]
    raw_headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass
class Echo:
    """An upstream MCP server that records what reaches it and answers a small JSON body."""

    seen: list[SeenRequest] = field(default_factory=list)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.called.set()
        body = await request.read()
        self.seen.append(
            SeenRequest(
                request.method,
                request.path,
                request.raw_path.partition("?")[2],
                request.headers,
                request.raw_headers,
                body,
            )
        )
        return web.json_response(
            {"jsonrpc": "2.0", "id": 1, "result": {"n": len(self.seen)}},
            headers={"Mcp-Session-Id": "s-1"},
        )

    @property
    def last(self) -> SeenRequest:
        assert self.seen, "the upstream was never called"
        return self.seen[-1]


class Upstreams:
    """Real aiohttp servers on 127.0.0.1, closed at teardown (the ``upstreams`` fixture)."""

    def __init__(self) -> None:
        self.servers: list[TestServer] = []

    async def start(self, app: web.Application, **runner_kwargs: Any) -> str:
        server = TestServer(app, host="127.0.0.1")
        # A failing test may leave a handler parked on its gate: cut it short at teardown.
        await server.start_server(**{"shutdown_timeout": 1.0, **runner_kwargs})
        self.servers.append(server)
        return str(server.make_url("/mcp"))

    async def close(self) -> None:
        for server in self.servers:
            await server.close()
