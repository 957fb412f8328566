from __future__ import annotations

from pathlib import Path

from aiohttp import web

from tests.conftest import FakeClock, LogCapture, ProxyFactory, base_config, start_upstream
from tests.kit.issuer import TestIssuer


async def test_post_reaches_upstream_with_identity(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path, logs: LogCapture
) -> None:
    seen: list[dict[str, str]] = []

    async def mcp(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    upstream = web.Application()
    upstream.router.add_post("/mcp", mcp)
    up = await start_upstream(upstream)
    client = await make_proxy(base_config(issuer, {"a": [str(up.make_url("/mcp"))]}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.post(
        "/mcp/apps/a",
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status == 200, await resp.text()
    assert "Authorization" not in seen[0]
    assert "X-Proxyd-Identity" in seen[0]
    (line,) = logs.events("request")
    assert line["logger_name"] == "proxyd.access"
    assert (line["app"], line["user"], line["status"]) == ("a", "alice@example.com", 200)
    await up.close()
