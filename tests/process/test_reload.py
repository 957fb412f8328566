"""SIGHUP reload of the main file (issue 4 §2) and the admin listener (§5), in-process.

proxyd runs from a config document (make_proxy) that is also written to a real TOML file;
``Runtime.reload`` is what the SIGHUP handler calls, invoked directly. The admin app runs
on its own aiohttp test server over the same Runtime. Real upstreams, a real IdP and real
tokens; only time (FakeClock) and randomness are faked.
"""

from __future__ import annotations

import asyncio
import copy
import random
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxyd.app import AUTH_STORE, HEALTH, RUNTIME, WATCHER, create_app
from proxyd.config import parse_settings
from proxyd.process.notify import Notifier
from proxyd.process.single import admin_app_of
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import RPC, Client, bearer, config, rpc_error
from tests.kit.tomltext import to_toml
from tests.kit.wait import GUARD

# --------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Proxy:
    """proxyd started from a document that is also its config file on disk."""

    client: Client
    path: Path

    @property
    def app(self) -> web.Application:
        return self.client.app

    async def reload(self, doc: dict[str, Any] | str) -> bool:
        self.path.write_text(doc if isinstance(doc, str) else to_toml(doc))
        return await self.app[RUNTIME].reload(str(self.path), Notifier(None))

    async def post(self, token: str | None, app: str = "a") -> aiohttp.ClientResponse:
        headers = bearer(token) if token is not None else None
        resp = await self.client.post(f"/mcp/apps/{app}", json=RPC, headers=headers)
        await resp.read()
        return resp


async def start(make_proxy: ProxyFactory, tmp_path: Path, doc: dict[str, Any]) -> Proxy:
    path = tmp_path / "proxyd.toml"
    path.write_text(to_toml(doc))
    # The file says what the document says: a reload compares against the same settings.
    assert parse_settings(tomllib.loads(to_toml(doc))) == parse_settings(doc)
    return Proxy(await make_proxy(doc), path)


async def echo_at(upstreams: Upstreams) -> tuple[Echo, str]:
    echo = Echo()
    return echo, await upstreams.start(echo.app())


def reason(body: dict[str, Any]) -> str:
    value: str = body["error"]["data"]["reason"]
    return value


@dataclass
class Gate:
    """An upstream that holds each request until released."""

    called: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.called.set()
        await self.release.wait()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"gate": True}})


def failing_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "broken"}, status=500)

    app = web.Application()
    app.router.add_post("/mcp", handle)
    return app


# --------------------------------------------------------------------------------------------
# Reload


async def test_a_valid_reload_swaps_apps_servers_limits_and_log_level(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    (echo1, url1), (echo2, url2), (echo3, url3) = [await echo_at(upstreams) for _ in range(3)]
    proxy = await start(make_proxy, tmp_path, config(issuer, {"a": url1, "b": url2}, tmp_path))
    token = issuer.token(clock.wall())
    assert (await proxy.post(token, "a")).status == 200
    assert (await proxy.post(token, "b")).status == 200
    for _ in range(3):  # the default limit (burst 40) lets unauthenticated requests through
        await rpc_error(await proxy.post(None), 401)
    logged = len(logs.events("request"))

    new = config(
        issuer,
        {"a": url3, "c": url2},
        tmp_path,
        limits={"unauthenticated": {"average": 1, "period": "1h", "burst": 1}},
        log={"level": "warning"},
    )
    assert await proxy.reload(new) is True
    runtime = proxy.app[RUNTIME]
    assert [a.name for a in runtime.settings.apps] == ["a", "c"]

    # a: its new server; b: gone; c: new (its new session spends the one unauthenticated token).
    assert (await proxy.post(token, "a")).status == 200
    assert (len(echo1.seen), len(echo3.seen)) == (1, 1)
    body = await rpc_error(await proxy.post(token, "b"), 404)
    assert reason(body) == "unknown_app"
    assert (await proxy.post(token, "c")).status == 200
    assert len(echo2.seen) == 2
    resp = await proxy.post(None)
    await rpc_error(resp, 429)
    assert int(resp.headers["Retry-After"]) > 0
    # Level warning: no more access lines (info).
    assert len(logs.events("request")) == logged
    assert logs.events("config_change_needs_restart") == []

    # Back to info: they appear again.
    assert await proxy.reload({**new, "log": {"level": "info"}}) is True
    assert (await proxy.post(token, "a")).status == 200
    lines = logs.events("request")
    assert len(lines) == logged + 1 and lines[-1]["status"] == 200
    reloaded = logs.events("config_reloaded")
    assert [line["apps"] for line in reloaded] == [["a", "c"]]


async def test_limiter_buckets_survive_a_reload_that_keeps_the_limit(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
) -> None:
    _, url = await echo_at(upstreams)
    limits = {"unauthenticated": {"average": 1, "period": "1h", "burst": 1}}
    doc = config(issuer, {"a": url}, tmp_path, limits=limits)
    proxy = await start(make_proxy, tmp_path, doc)
    await rpc_error(await proxy.post(None), 401)
    await rpc_error(await proxy.post(None), 429)

    # Another app, same limit: a reload is no way around it.
    assert await proxy.reload(config(issuer, {"a": url, "b": url}, tmp_path, limits=limits))
    await rpc_error(await proxy.post(None), 429)
    await rpc_error(await proxy.post(None, "b"), 429)

    # A different limit starts afresh (the proof that the check above can fail).
    more = {"unauthenticated": {"average": 1, "period": "1h", "burst": 2}}
    assert await proxy.reload(config(issuer, {"a": url}, tmp_path, limits=more))
    await rpc_error(await proxy.post(None), 401)
    await rpc_error(await proxy.post(None), 401)
    await rpc_error(await proxy.post(None), 429)


async def test_a_broken_file_changes_nothing_and_logs_every_problem(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo, url = await echo_at(upstreams)
    doc = config(issuer, {"a": url}, tmp_path)
    proxy = await start(make_proxy, tmp_path, doc)
    token = issuer.token(clock.wall())
    assert (await proxy.post(token)).status == 200
    runtime = proxy.app[RUNTIME]
    settings, handler = runtime.settings, runtime.handler
    generation = proxy.app[AUTH_STORE].snapshot.generation

    broken = config(
        issuer,
        {"a": "ftp://127.0.0.1/mcp", "b": url},
        tmp_path,
        log={"level": "loud"},
        limits={"unauthenticated": {"burst": 0}},
        bogus=1,
    )
    broken["app_auth_configs"] = []  # would end every session, if it applied
    assert await proxy.reload(broken) is False
    [failed] = logs.events("config_reload_failed")
    assert failed["level"] == "error"
    assert failed["path"] == str(proxy.path)
    assert set(failed["problems"]) == {
        "apps[0].servers[0]: not an http(s) URL",
        "log.level: one of debug, info, warning, error",
        "limits.unauthenticated.burst: expected a positive integer",
        "bogus: unknown key",
    }

    # Not TOML at all; not there at all.
    assert await proxy.reload('[server\nlisten = "x"\n') is False
    assert logs.events("config_reload_failed")[-1]["problems"][0].startswith(f"{proxy.path}: ")
    proxy.path.unlink()
    assert await proxy.app[RUNTIME].reload(str(proxy.path), Notifier(None)) is False
    assert "cannot read" in logs.events("config_reload_failed")[-1]["problems"][0]

    # Nothing changed: same configuration objects, app b unknown, the session and the log
    # level (info: access lines) as they were, no new app auth config generation.
    assert runtime.settings is settings and runtime.handler is handler
    assert proxy.app[AUTH_STORE].snapshot.generation == generation
    lines = len(logs.events("request"))
    assert (await proxy.post(token)).status == 200
    assert len(echo.seen) == 2
    await rpc_error(await proxy.post(token, "b"), 404)
    assert len(logs.events("request")) == lines + 2
    assert logs.events("config_reloaded") == []
    metrics = runtime.core.metrics.registry
    assert (
        metrics.get_sample_value(
            "proxyd_config_reloads_total", {"source": "sighup", "result": "failed"}
        )
        == 3
    )


async def test_restart_only_settings_are_named(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    _, url = await echo_at(upstreams)
    doc = config(issuer, {"a": url}, tmp_path, admin={"listen": "127.0.0.1:9090"})
    proxy = await start(make_proxy, tmp_path, doc)
    changed = config(
        issuer,
        {"a": url, "b": url},
        tmp_path,
        server={"listen": "127.0.0.1:8443", "state_dir": str(tmp_path / "elsewhere")},
        admin={"listen": "127.0.0.1:9999"},
        jwks={"default_ttl": "10m"},
    )
    assert await proxy.reload(changed) is True
    [warning] = logs.events("config_change_needs_restart")
    assert warning["level"] == "warning"
    assert sorted(warning["keys"]) == ["admin", "jwks", "server.listen", "server.state_dir"]
    # The rest applied.
    token = issuer.token(clock.wall())
    assert (await proxy.post(token, "b")).status == 200
    # Still pending on the next reload (nothing restarted): named again, against what runs.
    assert await proxy.reload(
        config(
            issuer,
            {"a": url},
            tmp_path,
            admin=changed["admin"],
            server=changed["server"],
            jwks=changed["jwks"],
        )
    )
    assert len(logs.events("config_change_needs_restart")) == 2
    # Back to the values in force: nothing to name.
    assert await proxy.reload(doc)
    assert len(logs.events("config_change_needs_restart")) == 2


async def test_health_of_unchanged_servers_survives_a_reload(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    bad = await upstreams.start(failing_app())
    echo, good = await echo_at(upstreams)
    health = {"type": "none", "passive_failures": 1, "ejection": "1m"}

    def doc(servers: list[str], *more: str) -> dict[str, Any]:
        d = config(issuer, {"a": servers, **{name: good for name in more}}, tmp_path)
        for app in d["apps"]:
            app["health_check"] = health
        return d

    proxy = await start(make_proxy, tmp_path, doc([bad]))
    book = proxy.app[HEALTH]
    token = issuer.token(clock.wall())
    await proxy.post(token)  # 500: one failure ejects (passive_failures = 1)
    body = await rpc_error(await proxy.post(token), 503)
    assert reason(body) == "no_healthy_upstream"

    assert await proxy.reload(doc([bad], "b")) is True
    state = book.get("a", bad)
    assert state is not None and state.label(clock.monotonic()) == "ejected"
    await rpc_error(await proxy.post(token), 503)

    # A new server for a starts healthy and takes the work; the ejected one stays out.
    assert await proxy.reload(doc([bad, good])) is True
    for _ in range(3):
        assert (await proxy.post(token)).status == 200
    assert len(echo.seen) == 3
    assert book.get("a", bad) is state and state.label(clock.monotonic()) == "ejected"
    assert book.get("b", good) is None  # b is gone, and its health with it

    # The cool-down still runs on the clock it started with.
    clock.advance(61)
    assert state.label(clock.monotonic()) == "healthy"


async def test_a_request_in_flight_finishes_across_a_reload(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    gate = Gate()
    held = await upstreams.start(gate.app())
    _, other = await echo_at(upstreams)
    proxy = await start(make_proxy, tmp_path, config(issuer, {"a": held}, tmp_path))
    token = issuer.token(clock.wall())
    request = asyncio.create_task(proxy.post(token))
    await asyncio.wait_for(gate.called.wait(), GUARD)

    assert await proxy.reload(config(issuer, {"b": other}, tmp_path)) is True
    await rpc_error(await proxy.post(token), 404)  # new requests: a is gone

    gate.release.set()
    resp = await asyncio.wait_for(request, GUARD)
    assert resp.status == 200
    assert (await resp.json())["result"] == {"gate": True}


async def test_reloaded_main_app_auth_configs_apply_and_sessions_follow(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo, url = await echo_at(upstreams)
    doc = config(issuer, {"a": url}, tmp_path)
    proxy = await start(make_proxy, tmp_path, doc)
    token = issuer.token(clock.wall())
    assert (await proxy.post(token)).status == 200

    # Same settings under another name: the old config is removed, its session ends.
    renamed = copy.deepcopy(doc)
    renamed["app_auth_configs"][0]["name"] = "corp-idp"
    assert await proxy.reload(renamed) is True
    changes = [
        (line["event"], line["config"])
        for line in logs.lines()
        if str(line.get("event", "")).startswith("app_auth_config_")
    ]
    assert changes == [
        ("app_auth_config_removed", "test-idp"),
        ("app_auth_config_added", "corp-idp"),
    ]
    body = await rpc_error(await proxy.post(token), 401)
    assert reason(body) == "config_removed"
    assert len(echo.seen) == 1
    # A new session comes from the new config.
    assert (await proxy.post(token)).status == 200
    assert logs.events("session_created")[-1]["config"] == "corp-idp"

    # Its audience changes: the session's token fails the new version.
    renamed["app_auth_configs"][0]["jwt"]["audience"] = "someone-else"
    assert await proxy.reload(renamed) is True
    body = await rpc_error(await proxy.post(token), 401)
    assert reason(body) == "wrong_audience"
    assert len(echo.seen) == 2


async def test_a_relabelled_app_no_config_selects_ends_its_sessions(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo, url = await echo_at(upstreams)
    doc = config(issuer, {"a": url}, tmp_path)
    proxy = await start(make_proxy, tmp_path, doc)
    token = issuer.token(clock.wall())
    assert (await proxy.post(token)).status == 200
    # The config is unchanged (same version) but no longer selects app "a": the token is
    # refused for it, and so is the session it had.
    relabelled = copy.deepcopy(doc)
    relabelled["apps"][0]["labels"]["env"] = "prod"
    assert await proxy.reload(relabelled) is True
    body = await rpc_error(await proxy.post(token), 401)
    assert reason(body) == "no_matching_config"
    assert len(echo.seen) == 1


# --------------------------------------------------------------------------------------------
# The admin listener: /healthz, /readyz, /metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def admin_for() -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(
        app: web.Application, draining: Callable[[], bool] = lambda: False
    ) -> TestClient[web.Request, web.Application]:
        admin = TestClient(TestServer(admin_app_of(app[RUNTIME], draining), host="127.0.0.1"))
        await admin.start_server()
        clients.append(admin)
        return admin

    yield factory
    for admin in clients:
        await admin.close()


async def scrape(admin: TestClient[web.Request, web.Application]) -> Samples:
    resp = await admin.get("/metrics")
    text = await resp.text()
    assert resp.status == 200, text
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_metrics_parse_and_move(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    admin_for: Callable[..., Any],
) -> None:
    _, url = await echo_at(upstreams)
    auth_dir = tmp_path / "app_auth.d"
    auth_dir.mkdir()
    doc = config(
        issuer,
        {"a": url},
        tmp_path,
        limits={"unauthenticated": {"average": 1, "period": "1h", "burst": 3}},
        app_auth={"config_dir": str(auth_dir)},
    )
    proxy = await start(make_proxy, tmp_path, doc)
    admin = await admin_for(proxy.app)
    before = await scrape(admin)
    generation = sample(before, "proxyd_config_generation")
    assert generation is not None
    assert sample(before, "proxyd_app_auth_configs") == 1
    loaded_at = sample(before, "proxyd_config_last_load_timestamp_seconds")
    assert loaded_at is not None and loaded_at > 0
    assert sample(before, "proxyd_upstream_healthy", app="a", server=url, state="healthy") == 1
    assert sample(before, "proxyd_requests_total", app="a", method="POST", status="200") is None

    token = issuer.token(clock.wall())
    assert (await proxy.post(token)).status == 200
    assert (await proxy.post(token)).status == 200  # cached: no second verification
    await rpc_error(await proxy.post(None), 401)
    await rpc_error(await proxy.post(issuer.token(clock.wall(), aud="other")), 401)
    await rpc_error(await proxy.post(None), 429)  # the fourth unauthenticated request

    after = await scrape(admin)
    assert sample(after, "proxyd_requests_total", app="a", method="POST", status="200") == 2
    assert sample(after, "proxyd_requests_total", app="a", method="POST", status="401") == 2
    assert sample(after, "proxyd_requests_total", app="a", method="POST", status="429") == 1
    assert sample(after, "proxyd_request_duration_seconds_count", app="a") == 5
    assert sample(after, "proxyd_auth_total", outcome="success", reason="verified") == 1
    assert sample(after, "proxyd_auth_total", outcome="failure", reason="wrong_audience") == 1
    assert sample(after, "proxyd_rate_limited_total", limit="unauthenticated") == 1
    assert sample(after, "proxyd_jwks_fetch_errors_total", url=issuer.url) == 0
    age = sample(after, "proxyd_jwks_age_seconds", url=issuer.url)
    assert age is not None and age >= 0

    # The app auth config generation moves with the watcher; reloads are counted.
    (auth_dir / "extra.toml").write_text(
        f'name = "extra"\napp_labels = {{ env = "prod" }}\n[jwt]\nissuer = "{issuer.issuer}"\n'
        f'audience = "x"\njwks_url = "{issuer.url}"\n'
    )
    proxy.app[WATCHER].rescan()
    assert await proxy.reload(doc) is True
    moved = await scrape(admin)
    assert sample(moved, "proxyd_config_generation") == generation + 1
    assert sample(moved, "proxyd_app_auth_configs") == 2
    last = sample(moved, "proxyd_config_last_load_timestamp_seconds")
    assert last is not None and last >= loaded_at
    assert sample(moved, "proxyd_config_reloads_total", source="sighup", result="applied") == 1


async def test_metrics_show_an_ejected_server(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    admin_for: Callable[..., Any],
) -> None:
    bad = await upstreams.start(failing_app())
    doc = config(issuer, {"a": bad}, tmp_path)
    doc["apps"][0]["health_check"] = {"type": "none", "passive_failures": 1}
    proxy = await start(make_proxy, tmp_path, doc)
    admin = await admin_for(proxy.app)
    assert (
        sample(await scrape(admin), "proxyd_upstream_healthy", app="a", server=bad, state="healthy")
        == 1
    )
    assert (await proxy.post(issuer.token(clock.wall()))).status == 500
    samples = await scrape(admin)
    assert sample(samples, "proxyd_upstream_healthy", app="a", server=bad, state="ejected") == 0
    assert sample(samples, "proxyd_requests_total", app="a", method="POST", status="500") == 1


async def test_healthz_and_readyz(
    issuer: TestIssuer,
    clock: FakeClock,
    upstreams: Upstreams,
    tmp_path: Path,
    admin_for: Callable[..., Any],
) -> None:
    _, url = await echo_at(upstreams)
    app = create_app(
        parse_settings(config(issuer, {"a": url}, tmp_path)),
        clocks=clock.clocks(),
        rng=random.Random(7),
    )
    draining = False
    admin = await admin_for(app, lambda: draining)

    async def status(path: str) -> tuple[int, Any]:
        resp = await admin.get(path)
        return resp.status, await resp.json()

    # Not serving before the first full load.
    assert await status("/healthz") == (200, {"status": "ok"})
    assert await status("/readyz") == (503, {"ready": False})

    proxy = TestClient(TestServer(app, host="127.0.0.1"))
    await proxy.start_server()
    try:
        assert await status("/readyz") == (200, {"ready": True})
        draining = True
        assert await status("/readyz") == (503, {"ready": False})
        assert await status("/healthz") == (200, {"status": "ok"})
        draining = False
        assert await status("/readyz") == (200, {"ready": True})
    finally:
        await proxy.close()
    # Shut down: not ready any more, still alive.
    assert await status("/readyz") == (503, {"ready": False})
    assert await status("/healthz") == (200, {"status": "ok"})


def test_restart_only_values_stay_in_force() -> None:
    """A reload never half-applies a restart-only key; the values the process runs with win."""
    from proxyd.config import in_force, parse_settings

    boot = parse_settings({"server": {"listen": "127.0.0.1:1000", "max_header_size": "16KiB"}})
    new = parse_settings(
        {
            "server": {"listen": "127.0.0.1:2000", "max_header_size": "64KiB"},
            "sessions": {"max_ttl": "1h"},
        }
    )
    effective = in_force(new, boot)
    assert (effective.server.listen_port, effective.server.max_header_size) == (1000, 16 * 1024)
    assert effective.sessions.max_ttl == 3600.0  # reloadable values do change
