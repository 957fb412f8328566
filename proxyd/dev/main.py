"""Runs ``proxyd dev``: the demo app on a free loopback port, then proxyd in front of it."""

from __future__ import annotations

import sys

from aiohttp import web

from proxyd.dev.demo import DemoServer
from proxyd.dev.issuer import DevIssuer, dev_settings, instructions
from proxyd.log import configure, get_logger
from proxyd.process.loop import exit_code, run_loop
from proxyd.process.single import serve

log = get_logger("proxyd")


async def run_dev(listen: str) -> None:
    demo = web.AppRunner(DemoServer().app(), access_log=None)
    await demo.setup()
    try:
        site = web.TCPSite(demo, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        issuer = DevIssuer()
        settings = dev_settings(listen, f"http://127.0.0.1:{port}/mcp", issuer)
        token = issuer.token()

        def ready() -> None:
            print(instructions(settings.server.public_url, token), file=sys.stderr, flush=True)

        await serve(settings, on_ready=ready)
    finally:
        await demo.cleanup()


def main(listen: str) -> int:
    """``proxyd dev``: the exit code."""
    configure("info", "auto")
    with exit_code(log) as code:
        run_loop(run_dev(listen))
    return code.value
