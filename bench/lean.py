"""The bench's "lean" reference: the least a relay built from proxyd's own parts can cost.

    python bench/lean.py PORT UPSTREAM_PORT

aiohttp's low-level server (``web.Server``: no application, router, middleware or signals) on
uvloop, access log off, no auth, no logging, and one handler that relays every request to
``http://127.0.0.1:UPSTREAM_PORT`` + the request's path with proxyd's own pooled httptools
client (``proxyd.upstream``), called exactly as ``proxyd.forward.Forwarder.forward`` and
``_whole`` call it for a small answer with a Content-Length: one write of head and body up,
the answer read whole, one ``web.Response`` down. Nothing else of proxyd runs: no session,
MCP gate, limiter, metrics, audit or access record; the client's fields go up as they came,
minus the hop-by-hop ones, Host and the framing, which ``request_head`` writes.

It stands for "a lean aiohttp server with an httptools client" (issue 15): the floor of
proxyd's stack on the machine the bench runs on. Only answers whose body fits in 64 KiB
(proxyd's SMALL_BODY) are relayed; the bench sends it the small POST only.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from aiohttp import web

from proxyd.body import HOP_BY_HOP
from proxyd.forward import SMALL_BODY
from proxyd.upstream.pool import UpstreamClient
from proxyd.upstream.wire import request_head

HOST = "127.0.0.1"
# proxyd's defaults: [upstream] connect_timeout and idle_timeout, keepalive_timeout and
# max_idle_connections (SMALL_BODY: proxyd's own bound on an answer read whole).
CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 300.0
KEEPALIVE_TIMEOUT = 4.0
MAX_IDLE = 64
# Not forwarded: the hop-by-hop fields (proxyd's own set), Host (request_head writes the
# upstream's) and the framing (written from the body read here).
_DROP = HOP_BY_HOP | {"host", "content-length"}


def make_server(client: UpstreamClient, base: str) -> web.Server:
    async def relay(request: web.BaseRequest) -> web.Response:
        origin = client.origin(base + request.rel_url.raw_path)
        body = await request.read()
        method = request.method
        if body or request.body_exists:
            framing = f"Content-Length: {len(body)}\r\n"
        else:  # as proxyd's RequestBody.framing: Content-Length: 0 except for GET
            framing = "" if method == "GET" else "Content-Length: 0\r\n"
        head = request_head(
            method,
            origin,
            request.rel_url.raw_query_string,
            [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP],
            framing,
        )
        conn = client.pooled(origin) or await client.connect(origin, CONNECT_TIMEOUT)
        try:
            conn.send(head, body or None, IDLE_TIMEOUT)
            await conn.head()
            answer = await conn.read_whole(SMALL_BODY)
            if answer is None:
                raise web.HTTPBadGateway(text="lean relay: answer over 64 KiB")
            content_type = next(
                (v for k, v in conn.headers if k.lower() == "content-type"),
                "application/octet-stream",
            )
            return web.Response(
                status=conn.status, body=answer, headers={"Content-Type": content_type}
            )
        finally:
            conn.finish()

    return web.Server(relay, access_log=None)


async def serve(port: int, upstream_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client = UpstreamClient(keepalive_timeout=KEEPALIVE_TIMEOUT, max_idle=MAX_IDLE)
    try:
        runner = web.ServerRunner(
            make_server(client, f"http://{HOST}:{upstream_port}"), shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, HOST, port, backlog=4096).start()
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        await client.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].isdigit() or not argv[2].isdigit():
        print("usage: lean.py PORT UPSTREAM_PORT", file=sys.stderr)
        return 2
    uvloop.run(serve(int(argv[1]), int(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
