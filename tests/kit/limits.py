"""Rate-limit checks over HTTP: one request and its expected outcome, and floods of requests
that do not ride an established session."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.conftest import FakeClock
from tests.kit.issuer import MINTED, TestIssuer
from tests.kit.proxy import RPC, Client, bearer, rpc_error

RETRY_AFTER_RE = re.compile(r"[1-9][0-9]*")


async def post(client: Client, headers: Any = None) -> aiohttp.ClientResponse:
    resp = await client.post("/mcp/apps/a", json=RPC, headers=headers)
    await resp.read()
    return resp


async def assert_ok(client: Client, headers: Any) -> None:
    resp = await post(client, headers)
    assert resp.status == 200, await resp.text()


async def assert_401(client: Client, headers: Any) -> None:
    resp = await post(client, headers)
    await rpc_error(resp, 401)


async def assert_429(resp: aiohttp.ClientResponse, retry: int | None = None) -> dict[str, Any]:
    """429 with a whole-seconds Retry-After >= 1 and a JSON-RPC error body (rate_limited)."""
    body = await rpc_error(resp, 429)
    assert body["error"]["code"] == -32600
    assert body["error"]["data"] == {"status": 429, "reason": "rate_limited"}
    value = resp.headers["Retry-After"]
    assert RETRY_AFTER_RE.fullmatch(value), value
    if retry is not None:
        assert int(value) == retry
    assert "WWW-Authenticate" not in resp.headers
    return body


async def limited(client: Client, headers: Any, retry: int | None = None) -> dict[str, Any]:
    return await assert_429(await post(client, headers), retry)


@dataclass
class Flood:
    """Requests that do not ride an established session, of one kind (or all kinds mixed)."""

    issuer: TestIssuer
    clock: FakeClock
    kind: str
    rng: random.Random = field(default_factory=lambda: random.Random(3))
    count: int = 0

    KINDS = ("forged", "garbage", "no_token", "malformed")

    def headers(self) -> dict[str, str]:
        i = self.count
        self.count += 1
        kind = self.KINDS[i % 4] if self.kind == "mixed" else self.kind
        if kind == "no_token":
            return {}
        if kind == "malformed":
            value = ("Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer a b", "Token abc")[i % 4]
            return {"Authorization": value}
        if kind == "garbage":
            token = f"{self.rng.getrandbits(128):032x}"  # a guess: not even a JWT
        else:  # forged: a real token's signature over other claims
            real = self.issuer.token(self.clock.wall(), jti=f"flood-{i}")
            token = self.issuer.tampered(real, email="mallory@example.com")
        MINTED.add(token)  # the log guard must watch it too
        return bearer(token)
