"""Sealed MCP sessions over real SDK upstreams: the rig (two official-SDK servers behind proxyd
instances built from one config) and the legacy transport by hand (aiohttp), for what the SDK
client cannot do: switch proxyd instances mid-session, present other users' ids, forge ids.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multidict import CIMultiDictProxy

from tests.conftest import FakeClock, ProxyFactory, base_config
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import LEGACY_VERSION, SeenRequest, UpstreamServer
from tests.kit.proxy import Client
from tests.kit.wait import GUARD

KEY_OLD = bytes(range(32))
ACCEPT = "application/json, text/event-stream"
SID = "Mcp-Session-Id"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class WatchedRequests(list[SeenRequest]):
    """mcpkit's request log (it only appends) plus a way to wait for an entry."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def append(self, item: SeenRequest) -> None:
        super().append(item)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(
        self, predicate: Callable[[SeenRequest], bool], start: int = 0
    ) -> SeenRequest:
        async def scan() -> SeenRequest:
            while True:
                changed = self._changed
                for seen in self[start:]:
                    if predicate(seen):
                        return seen
                await changed.wait()

        return await asyncio.wait_for(scan(), GUARD)


def watched(up: UpstreamServer) -> WatchedRequests:
    assert isinstance(up.requests, WatchedRequests)
    return up.requests


@asynccontextmanager
async def sdk_servers(
    count: int = 2, *, json_response: bool = False
) -> AsyncIterator[list[UpstreamServer]]:
    """``count`` official-SDK MCP servers (both eras, stateful) on 127.0.0.1."""
    ups = [
        UpstreamServer(name=f"up{i}", json_response=json_response, requests=WatchedRequests())
        for i in range(count)
    ]
    try:
        for up in ups:
            await up.start()
        yield ups
    finally:
        for up in ups:
            await up.close()


def marks(ups: Sequence[UpstreamServer]) -> list[int]:
    return [len(up.requests) for up in ups]


def since(ups: Sequence[UpstreamServer], mark: Sequence[int]) -> list[list[SeenRequest]]:
    return [up.requests[m:] for up, m in zip(ups, mark, strict=True)]


@dataclass
class Rig:
    ups: list[UpstreamServer]
    issuer: TestIssuer
    clock: FakeClock
    make_proxy: ProxyFactory
    tmp_path: Path

    def doc(
        self,
        keys: Iterable[bytes] | None = (KEY_OLD,),
        apps: dict[str, list[str]] | None = None,
        passive_failures: int = 3,
        **sections: Any,
    ) -> dict[str, Any]:
        servers = [up.url for up in self.ups]
        doc = base_config(self.issuer, apps or {"a": servers}, self.tmp_path, **sections)
        for app in doc["apps"]:
            # No active checker: only real traffic (passive checks) changes health here.
            app["health_check"] = {"type": "none", "passive_failures": passive_failures}
        if keys is not None:
            doc.setdefault("sessions", {})["mcp_keys"] = [b64(k) for k in keys]
        return doc

    async def proxy(self, **kwargs: Any) -> Client:
        return await self.make_proxy(self.doc(**kwargs))

    def token(self, **claims: Any) -> str:
        return self.issuer.token(self.clock.wall(), **claims)


def url_of(proxy: Client, app: str = "a") -> str:
    return str(proxy.make_url(f"/mcp/apps/{app}"))


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    @property
    def message(self) -> dict[str, Any]:
        """The JSON-RPC message of a JSON or SSE answer (the last one on an SSE stream)."""
        if self.headers.get("Content-Type", "").startswith("text/event-stream"):
            datas = [
                line[len("data:") :].strip()
                for line in self.text.splitlines()
                if line.startswith("data:") and line[len("data:") :].strip()
            ]
            assert datas, self.text
            decoded: dict[str, Any] = json.loads(datas[-1])
            return decoded
        decoded = json.loads(self.text)
        assert isinstance(decoded, dict)
        return decoded

    def refusal(self) -> str:
        """The reason of proxyd's 404 for a session it will not forward."""
        assert self.status == 404, (self.status, self.text)
        error = self.message["error"]
        assert error["code"] == -32600
        assert "initialize" in error["message"]
        reason: str = error["data"]["reason"]
        return reason


_ids = iter(range(1, 1_000_000))


async def rpc(
    proxy: Client,
    token: str,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    sid: str | None = None,
    notification: bool = False,
    app: str = "a",
) -> Answer:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if not notification:
        message["id"] = next(_ids)
    if params is not None:
        message["params"] = params
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    if sid is not None:
        headers[SID] = sid
        headers["MCP-Protocol-Version"] = LEGACY_VERSION
    resp = await proxy.post(f"/mcp/apps/{app}", json=message, headers=headers)
    return Answer(resp.status, resp.headers, await resp.text())


async def initialize(proxy: Client, token: str, app: str = "a") -> str:
    """initialize + notifications/initialized; the sealed session id proxyd handed out."""
    params = {
        "protocolVersion": LEGACY_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    }
    answer = await rpc(proxy, token, "initialize", params, app=app)
    assert answer.status == 200, answer.text
    assert answer.message["result"]["protocolVersion"] == LEGACY_VERSION
    sid = answer.headers[SID]
    done = await rpc(proxy, token, "notifications/initialized", sid=sid, notification=True, app=app)
    assert done.status == 202, done.text
    assert done.headers.get(SID, sid) == sid
    return sid


async def call(proxy: Client, token: str, sid: str, name: str, args: dict[str, Any]) -> Answer:
    return await rpc(proxy, token, "tools/call", {"name": name, "arguments": args}, sid=sid)


def text_of(answer: Answer) -> str:
    assert answer.status == 200, answer.text
    text: str = answer.message["result"]["content"][0]["text"]
    return text


def owner_index(ups: Sequence[UpstreamServer], mark: Sequence[int]) -> int:
    """The one upstream that saw requests since ``mark`` (fails if both or none did)."""
    [owner] = [i for i, seen in enumerate(since(ups, mark)) if seen]
    return owner
