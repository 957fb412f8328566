"""The benchmark's upstream: a deliberately cheap aiohttp server on 127.0.0.1.

    python bench/upstream.py PORT                       # 127.0.0.1:PORT
    python bench/upstream.py --listen 127.0.0.2:PORT ... # any number of addresses
    python bench/upstream.py --reuse-port PORT          # several processes share one port

- ``POST /mcp``  answers a small JSON-RPC result (application/json, Content-Length), whatever
  the request was, after reading the body;
- ``GET /sse?n=N&interval_ms=MS``  streams N Server-Sent Events, one every MS milliseconds; each
  event's data is ``{"i": <index>, "t": <time.monotonic_ns() when written>}``. CLOCK_MONOTONIC is
  one clock for the whole machine on Linux, so a client in another process computes each event's
  delay as its own ``time.monotonic_ns()`` at receipt minus ``t``;
- ``GET /big``  returns 10 MiB of ``application/octet-stream`` with Content-Length;
- ``POST /idle``  a 2025-era ``initialize`` answer with an ``Mcp-Session-Id`` naming the address
  that answered (``idle-<host>-<port>``), so a proxy pins the session to it;
- ``GET /idle?heartbeat_s=S``  an MCP GET stream that sends one event at once (so the client
  knows the whole path is up) and then only an SSE comment every S seconds (default 30; 0 =
  never), until the client goes away. The benchmark holds 10,000 of these through one proxy.

Responses are built once where possible so the upstream's own cost stays small and constant;
the benchmark compares the same requests sent to it directly and through proxyd.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

BIG_SIZE = 10 * 1024 * 1024
_BIG_BODY = bytes(BIG_SIZE)
_RESULT = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"content": [{"type": "text", "text": "pong"}], "isError": False},
    },
    separators=(",", ":"),
).encode()
_MAX_EVENTS = 100_000
_OPENED = (
    b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message",'
    b'"params":{"level":"info","data":"stream open"}}\n\n'
)


async def mcp_post(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_RESULT, content_type="application/json")


def _int_param(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if not 0 <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be in 0..{high}")
    return value


async def sse(request: web.Request) -> web.StreamResponse:
    count = _int_param(request, "n", 10, _MAX_EVENTS)
    interval = _int_param(request, "interval_ms", 10, 60_000) / 1000.0
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for index in range(count):
        if index and interval:
            await asyncio.sleep(interval)
        stamp = time.monotonic_ns()
        await response.write(f'id: {index}\ndata: {{"i":{index},"t":{stamp}}}\n\n'.encode())
    await response.write_eof()
    return response


async def big(_: web.Request) -> web.Response:
    return web.Response(body=_BIG_BODY, content_type="application/octet-stream")


def _local_name(request: web.Request) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return f"{sockname[0]}-{sockname[1]}" if sockname else "unknown"


async def idle_initialize(request: web.Request) -> web.Response:
    message = await request.json()
    answer = {
        "jsonrpc": "2.0",
        "id": message.get("id") if isinstance(message, dict) else None,
        "result": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            # The client cannot read the (sealed) session id: the name tells it which address.
            "serverInfo": {"name": f"bench-idle {_local_name(request)}", "version": "1"},
        },
    }
    return web.json_response(answer, headers={"Mcp-Session-Id": f"idle-{_local_name(request)}"})


async def idle_stream(request: web.Request) -> web.StreamResponse:
    heartbeat = _int_param(request, "heartbeat_s", 30, 3600)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    await response.write(_OPENED)
    while True:  # until the client leaves (the handler is cancelled) or a write fails
        await asyncio.sleep(heartbeat or 3600)
        if heartbeat:
            await response.write(b": heartbeat\n\n")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/mcp", mcp_post)
    app.router.add_get("/sse", sse)
    app.router.add_get("/big", big)
    app.router.add_post("/idle", idle_initialize)
    app.router.add_get("/idle", idle_stream)
    return app


async def serve(listen: list[tuple[str, int]], reuse_port: bool, backlog: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # handler_cancellation: a client that leaves ends its idle stream at once.
    runner = web.AppRunner(
        make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    for host, port in listen:
        await web.TCPSite(
            runner, host, port, backlog=backlog, reuse_port=reuse_port or None
        ).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the benchmark's upstream")
    parser.add_argument("port", nargs="*", type=int, help="listen on 127.0.0.1:PORT")
    parser.add_argument(
        "--listen",
        action="append",
        type=_address,
        default=[],
        metavar="HOST:PORT",
        help="listen here too (repeatable)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="SO_REUSEPORT: several upstream processes share the port(s)",
    )
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv[1:])
    listen = [("127.0.0.1", p) for p in args.port] + list(args.listen)
    if not listen:
        parser.error("give at least one PORT or --listen HOST:PORT")
    _run(serve(listen, bool(args.reuse_port), int(args.backlog)))
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        uvloop: Any = importlib.import_module("uvloop")  # as proxyd: uvloop when installed
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
