"""The benchmark's upstream: a deliberately cheap aiohttp server on 127.0.0.1.

    python bench/upstream.py PORT

- ``POST /mcp``  answers a small JSON-RPC result (application/json, Content-Length), whatever
  the request was, after reading the body;
- ``GET /sse?n=N&interval_ms=MS``  streams N Server-Sent Events, one every MS milliseconds; each
  event's data is ``{"i": <index>, "t": <time.monotonic_ns() when written>}``. CLOCK_MONOTONIC is
  one clock for the whole machine on Linux, so a client in another process computes each event's
  delay as its own ``time.monotonic_ns()`` at receipt minus ``t``;
- ``GET /big``  returns 10 MiB of ``application/octet-stream`` with Content-Length.

Responses are built once where possible so the upstream's own cost stays small and constant;
the benchmark compares the same requests sent to it directly and through proxyd.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

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


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/mcp", mcp_post)
    app.router.add_get("/sse", sse)
    app.router.add_get("/big", big)
    return app


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: upstream.py PORT", file=sys.stderr)
        return 2
    web.run_app(
        make_app(), host="127.0.0.1", port=int(argv[1]), access_log=None, print=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
