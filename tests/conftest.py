"""Shared fixtures: a fake clock, a real test IdP, real upstreams, proxyd on 127.0.0.1.

Only time and randomness are faked. Every test also runs under a log guard: the JSON log
output is captured and, at teardown, must not contain any token minted during the test.
"""

from __future__ import annotations

import io
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings

from proxyd.app import create_app
from proxyd.config import Settings, parse_settings
from proxyd.handler import Clocks
from proxyd.log import configure
from proxyd.log import flush as flush_logs
from tests.kit.echo import Upstreams
from tests.kit.issuer import MINTED, TestIssuer


class FakeClock:
    """Wall time starts at the real time (tokens are minted with it); monotonic at 1000."""

    def __init__(self) -> None:
        self.wall_now = float(int(time.time()))
        self.mono_now = 1000.0

    def wall(self) -> float:
        return self.wall_now

    def monotonic(self) -> float:
        return self.mono_now

    def advance(self, seconds: float) -> None:
        self.wall_now += seconds
        self.mono_now += seconds

    def clocks(self) -> Clocks:
        return Clocks(monotonic=self.monotonic, wall=self.wall)


@dataclass
class LogCapture:
    stream: io.StringIO = field(default_factory=io.StringIO)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def text(self) -> str:
        flush_logs()  # the lines of this loop turn (proxyd.log writes them once per turn)
        return self.stream.getvalue()


@pytest.fixture(autouse=True)
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    configure("debug", "json", capture.stream)
    MINTED.clear()
    yield capture
    text = capture.text()
    for token in MINTED:
        signature = token.rsplit(".", 1)[-1]
        assert token not in text, "a token reached the logs"
        assert not signature or signature not in text, "a token signature reached the logs"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def issuer() -> AsyncIterator[TestIssuer]:
    idp = TestIssuer()
    idp.add_key("k1", "ES256")
    server = TestServer(idp.app(), host="127.0.0.1")
    await server.start_server()
    idp.url = str(server.make_url("/jwks.json"))
    try:
        yield idp
    finally:
        await server.close()


def base_config(
    issuer: TestIssuer,
    apps: dict[str, list[str]],
    state_dir: Path,
    **sections: Any,
) -> dict[str, Any]:
    """A valid proxyd config: every app labelled env=test, one auth config for them all."""
    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "state_dir": str(state_dir)},
        "apps": [
            {"name": name, "labels": {"env": "test", "app": name}, "servers": servers}
            for name, servers in apps.items()
        ],
        "app_auth_configs": [
            {
                "name": "test-idp",
                "app_labels": {"env": "test"},
                "jwt": {
                    "issuer": issuer.issuer,
                    "audience": issuer.audience,
                    "jwks_url": issuer.url,
                },
            }
        ],
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(name), dict):
            doc[name] = {**doc[name], **value}
        else:
            doc[name] = value
    return doc


ProxyFactory = Callable[[dict[str, Any]], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_proxy(clock: FakeClock) -> AsyncIterator[ProxyFactory]:
    """Start proxyd (create_app) on 127.0.0.1 from a config document; returns a client."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(doc: dict[str, Any]) -> TestClient[web.Request, web.Application]:
        settings: Settings = parse_settings(doc)
        app = create_app(settings, clocks=clock.clocks(), rng=random.Random(7))
        server = TestServer(app, host="127.0.0.1")  # handler_cancellation=True, like `serve`
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    """Real aiohttp upstreams on 127.0.0.1 (``await upstreams.start(app)``), closed at teardown."""
    ups = Upstreams()
    try:
        yield ups
    finally:
        await ups.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that refuses connections: bound, never listening (no race with other tests)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}/mcp"
    sock.close()


async def start_upstream(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


# Hypothesis profiles (the differential tests, tests/test_differential.py): "dev" keeps `make
# test` fast; CI runs ten times as many generated examples (.ci/run: `make test
# PYTEST_ARGS=--hypothesis-profile=ci`; the option, read after this file, wins).
settings.register_profile("dev", max_examples=300, deadline=None)
# CI explores the same examples on every run (derandomize): a landing never hangs on what one
# random draw found; new draws come from local runs of the "dev" profile.
settings.register_profile("ci", max_examples=3000, deadline=None, print_blob=True, derandomize=True)
settings.load_profile("dev")
