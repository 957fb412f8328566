"""The official MCP SDK, as client and as upstream server, talking through proxyd.

Both protocol eras: the session-based 2025-11-25 handshake (initialize, Mcp-Session-Id, GET
stream, DELETE) and the stateless 2026-07-28 revision the v2 SDK negotiates by default.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet
from mcp import MCPError

from tests.conftest import FakeClock, ProxyFactory, base_config
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import LEGACY, MODERN, UpstreamServer, mcp_client, upstream_server

STEP_TIMEOUT = 10.0  # a failure guard only: each wait below is on a condition


@dataclass
class Rig:
    up: UpstreamServer
    proxy: TestClient[web.Request, web.Application]
    issuer: TestIssuer
    clock: FakeClock

    def url(self, app: str = "a") -> str:
        return str(self.proxy.make_url(f"/mcp/apps/{app}"))

    def token(self, **claims: Any) -> str:
        return self.issuer.token(self.clock.wall(), **claims)


@pytest.fixture(params=[False, True], ids=["sse", "json"])
async def rig(
    request: pytest.FixtureRequest,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    async with upstream_server(json_response=request.param) as up:
        proxy = await make_proxy(base_config(issuer, {"a": [up.url]}, tmp_path))
        yield Rig(up, proxy, issuer, clock)


async def test_legacy_session_through_proxyd(rig: Rig) -> None:
    async with mcp_client(rig.url(), rig.token(), mode=LEGACY) as c:
        assert c.protocol_version == "2025-11-25"
        sid = c.session_id
        assert sid, "the upstream's Mcp-Session-Id must reach the client"
        tools = {t.name for t in (await c.list_tools()).tools}
        assert {"echo", "add", "progress", "whoami"} <= tools
        echoed = await c.call_tool("echo", {"text": "héllo"})
        assert echoed.content[0].text == "héllo"  # type: ignore[union-attr]
        added = await c.call_tool("add", {"a": 2, "b": 40})
        assert added.content[0].text == "42"  # type: ignore[union-attr]
    assert [call.name for call in rig.up.calls] == ["echo", "add"]
    # The client held proxyd's sealed id; every later request reached the upstream with the
    # upstream's own id (one value, never the client's), the closing DELETE included.
    assert sid.startswith("pxs1.")
    later = [r for r in rig.up.requests if r.headers.get("mcp-session-id")]
    upstream_ids = {r.headers["mcp-session-id"] for r in later}
    assert len(upstream_ids) == 1 and sid not in upstream_ids
    assert any(r.method == "DELETE" for r in later)
    assert all("authorization" not in r.headers for r in rig.up.requests)


async def test_modern_era_through_proxyd(rig: Rig) -> None:
    async with mcp_client(rig.url(), rig.token(), mode=MODERN) as c:
        assert c.protocol_version == "2026-07-28"
        assert (await c.call_tool("add", {"a": 1, "b": 2})).content[0].text == "3"  # type: ignore[union-attr]
    call = [r for r in rig.up.requests if r.headers.get("mcp-method") == "tools/call"]
    assert call and call[0].headers["mcp-name"] == "add"
    assert call[0].headers["mcp-protocol-version"] == "2026-07-28"


async def test_default_client_negotiates_through_proxyd(rig: Rig) -> None:
    async with mcp_client(rig.url(), rig.token()) as c:
        assert c.protocol_version == "2026-07-28"
        assert (await c.call_tool("echo", {"text": "x"})).content[0].text == "x"  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_progress_arrives_one_by_one(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path, mode: str
) -> None:
    """Each progress event reaches the client while the upstream is blocked before the next.

    Any buffering in proxyd would hold event N until more bytes came, and the test would stall
    on its guard instead of passing.
    """
    async with upstream_server() as up:
        proxy = await make_proxy(base_config(issuer, {"a": [up.url]}, tmp_path))
        url = str(proxy.make_url("/mcp/apps/a"))
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            arrived.put_nowait(progress)

        async with mcp_client(url, issuer.token(clock.wall()), mode=mode) as c:
            call = asyncio.create_task(
                c.call_tool("stepped", {"steps": 3}, progress_callback=on_progress)
            )
            for step in (1, 2, 3):
                assert await asyncio.wait_for(arrived.get(), STEP_TIMEOUT) == step
                assert not call.done()
                if step < 3:
                    up.gate.release()
            result = await asyncio.wait_for(call, STEP_TIMEOUT)
            assert result.content[0].text == "done"  # type: ignore[union-attr]


async def test_upstream_sees_verifiable_identity(rig: Rig) -> None:
    async with mcp_client(rig.url(), rig.token(email="bob@example.com"), mode=LEGACY) as c:
        result = await c.call_tool("whoami", {})
    assertion = result.content[0].text  # type: ignore[union-attr]
    jwks = await (await rig.proxy.get("/.well-known/jwks.json")).json()
    token = jwt.decode(assertion, KeySet.import_key_set(jwks), algorithms=["ES256"])
    assert token.claims["username"] == "bob@example.com"
    assert token.claims["aud"] == "a"
    assert token.claims["exp"] - token.claims["iat"] <= 600


async def test_rejected_token_never_reaches_upstream(rig: Rig) -> None:
    expired = rig.token(iat=int(rig.clock.wall()) - 7200, exp=int(rig.clock.wall()) - 3600)
    with pytest.raises(BaseExceptionGroup) as failure:
        async with mcp_client(rig.url(), expired, mode=LEGACY) as c:
            await c.list_tools()
    # proxyd's JSON-RPC error body is what the SDK shows its user.
    errors = [e for e in _leaves(failure.value) if isinstance(e, MCPError)]
    assert errors and errors[0].message == "token has expired"
    assert errors[0].data == {"status": 401, "reason": "expired"}
    assert rig.up.requests == []


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def test_unauthenticated_answer_guides_sdk_to_metadata(rig: Rig) -> None:
    resp = await rig.proxy.post(
        "/mcp/apps/a",
        data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        },
    )
    assert resp.status == 401
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert "/.well-known/oauth-protected-resource/mcp/apps/a" in challenge
    meta = await (await rig.proxy.get("/.well-known/oauth-protected-resource/mcp/apps/a")).json()
    assert meta["authorization_servers"] == [rig.issuer.issuer]
    assert rig.up.requests == []
