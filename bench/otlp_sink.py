"""A local OTLP/HTTP receiver for the bench: accepts ``POST /v1/traces``, answers 200 with an
empty ``ExportTraceServiceResponse`` (empty protobuf bytes), and counts what it got. Nothing is
decoded: it stands for a collector that keeps up, so proxyd's own cost is what is measured.

    python bench/otlp_sink.py PORT      # GET /count → {"requests": N, "bytes": M}
"""

from __future__ import annotations

import sys

from aiohttp import web

HOST = "127.0.0.1"


def make_app() -> web.Application:
    counts = {"requests": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        counts["requests"] += 1
        counts["bytes"] += len(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def count(_: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    return app


def main() -> None:
    web.run_app(make_app(), host=HOST, port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
