"""Several workers under one supervisor (issue 6, ``server.workers``), as REAL processes.

`python -m proxyd run -c FILE` with ``workers = 2``: the supervisor and its workers are real
processes, the signals are real (SIGKILL a worker, SIGHUP and SIGTERM the supervisor), the
port is shared by SO_REUSEPORT, and every wait is on a condition (a log line, an answer, a
datagram), never a fixed sleep. Connections are never reused by the clients here, so the
kernel spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxyd.config import MAX_WORKERS, ConfigError, parse_settings, settings_from_text
from proxyd.process.supervisor import RestartPolicy, Supervisor, describe_exit, parse_fields
from tests.kit.daemon import (
    Daemon,
    Upstream,
    launching,
    notify_message,
    notify_pending,
    notify_socket,
    ports_of,
    post,
    proxyd_config,
    spawn_proxyd,
    start_upstream,
    write_config,
)
from tests.kit.echo import Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.net import free_port
from tests.kit.redisserver import RedisServer
from tests.kit.wait import GUARD, until

WORKERS = 2
BURST = 10
MCP_KEY = base64.b64encode(bytes(range(32))).decode()

LaunchWorkers = Callable[[Path], Awaitable[Daemon]]


@pytest.fixture
async def launch(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LaunchWorkers]:
    """Start a supervised `proxyd run` and wait until the supervisor says it serves."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    async with launching("supervisor_started", before_kill=kill_workers) as start:
        yield start


def kill_workers(daemon: Daemon) -> None:
    with contextlib.suppress(ProcessLookupError):
        for pid in worker_pids(daemon):
            os.kill(pid, signal.SIGKILL)


def worker_pids(daemon: Daemon) -> list[int]:
    """The pids of the workers the supervisor started, latest per index."""
    latest: dict[int, int] = {}
    for line in daemon.find("worker_spawned"):
        latest[line["worker"]] = line["pid"]
    return list(latest.values())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(FileNotFoundError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def fresh_connections() -> aiohttp.ClientSession:
    # A new connection per request: the kernel picks a worker per connection.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def spread(daemon: Daemon, issuer: TestIssuer, app: str = "a", n: int = 40) -> set[int]:
    """``n`` requests on fresh connections, all answered 200; the workers that served them."""
    since = daemon.mark()
    token = issuer.token(time.time())
    async with fresh_connections() as http:
        for _ in range(n):
            status, body = await post(http, daemon.url(app), token)
            assert status == 200, body
    await until(lambda: len(daemon.find("request", since, app=app)) >= n, "access lines")
    return {line["worker"] for line in daemon.find("request", since, app=app)}


def workers_config(issuer: TestIssuer, tmp_path: Path, url: str, **sections: Any) -> dict[str, Any]:
    server = {"workers": WORKERS, "shutdown_grace": "5s", **sections.pop("server", {})}
    return proxyd_config(issuer, tmp_path, {"a": [url]}, server=server, **sections)


async def start_workers(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> tuple[Daemon, Upstream, str, Path]:
    """An upstream, and a supervised proxyd with WORKERS workers serving app "a" from it."""
    upstream, url = await start_upstream(upstreams)
    path = write_config(tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, url))
    return await launch(path), upstream, url, path


async def scrape(daemon: Daemon) -> list[Sample]:
    """Every sample of the supervisor's /metrics."""
    async with aiohttp.ClientSession() as http, http.get(daemon.admin_url("/metrics")) as resp:
        assert resp.status == 200
        text = await resp.text()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


# --------------------------------------------------------------------------------------------
# Serving


async def test_workers_share_the_port_and_one_mcp_session_key(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    upstream_url = await _session_upstream(upstreams)
    path = write_config(tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, upstream_url))
    proxyd = await launch(path)
    started = proxyd.find("supervisor_started")[0]
    assert len(started["pids"]) == WORKERS
    assert {line["worker"] for line in proxyd.find("proxyd_started")} == set(range(WORKERS))
    # One ephemeral key for all: said once, by the supervisor.
    assert len(proxyd.find("mcp_session_key_ephemeral")) == 1

    # An MCP session opened on one worker works on the other: its id is sealed with the key
    # every worker got from the supervisor.
    token = issuer.token(time.time())
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    since = proxyd.mark()
    async with fresh_connections() as http:
        async with http.post(
            proxyd.url("a"),
            json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
            headers=headers,
        ) as resp:
            assert resp.status == 200
            session_id = resp.headers["Mcp-Session-Id"]
        for i in range(30):
            async with http.post(
                proxyd.url("a"),
                json={"jsonrpc": "2.0", "id": i + 2, "method": "ping"},
                headers={**headers, "Mcp-Session-Id": session_id},
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["result"]["session"] == "upstream-session-1"
    await until(lambda: len(proxyd.find("request", since)) >= 31, "access lines")
    assert {line["worker"] for line in proxyd.find("request", since)} == set(range(WORKERS))


async def _session_upstream(upstreams: Upstreams) -> str:
    """An upstream that opens one MCP session (legacy era) and echoes it back."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        if body["method"] == "initialize":
            return web.json_response(
                {"jsonrpc": "2.0", "id": body["id"], "result": {}},
                headers={"Mcp-Session-Id": "upstream-session-1"},
            )
        session = request.headers.get("Mcp-Session-Id")
        return web.json_response(
            {"jsonrpc": "2.0", "id": body["id"], "result": {"session": session}}
        )

    app = web.Application()
    app.router.add_post("/mcp", handle)
    return await upstreams.start(app)


async def test_metrics_merge_every_worker_with_a_worker_label(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, _upstream, _url, _path = await start_workers(issuer, launch, upstreams, tmp_path)
    served = await spread(proxyd, issuer)
    samples = await scrape(proxyd)
    async with aiohttp.ClientSession() as http, http.get(proxyd.admin_url("/readyz")) as resp:
        assert resp.status == 200
        assert (await resp.json())["workers"]["ready"] == WORKERS
    requests = [s for s in samples if s.name == "proxyd_requests_total" and s.labels["app"] == "a"]
    assert {s.labels["worker"] for s in requests} == {str(w) for w in served}
    assert sum(s.value for s in requests) == 40
    ready = [s for s in samples if s.name == "proxyd_workers" and s.labels["state"] == "ready"]
    assert [s.value for s in ready] == [WORKERS]
    scraped = [s for s in samples if s.name == "proxyd_worker_scrape_ok"]
    assert sorted(s.value for s in scraped) == [1.0] * WORKERS


async def test_workers_on_redis_enforce_one_unauthenticated_limit(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="proxyd-wr-"))
    redis = RedisServer(directory)
    redis.start()
    try:
        _, url = await start_upstream(upstreams)
        doc = workers_config(
            issuer,
            tmp_path,
            url,
            limits={"unauthenticated": {"average": 1, "period": "1h", "burst": BURST}},
            state={"backend": "redis", "url": redis.url},
            sessions={"mcp_keys": [MCP_KEY]},
        )
        proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
        assert not proxyd.find("state_per_worker")
        since = proxyd.mark()
        statuses: list[int] = []
        async with fresh_connections() as http:
            for _ in range(3 * BURST):
                statuses.append((await post(http, proxyd.url("a"), None))[0])
        # One bucket for the address, whichever worker answered: BURST verifications (401,
        # no token) then 429 — with a bucket per worker it would have been up to 2 x BURST.
        assert statuses == [401] * BURST + [429] * (2 * BURST)
        await until(lambda: len(proxyd.find("request", since)) >= 3 * BURST, "access lines")
        assert {line["worker"] for line in proxyd.find("request", since)} == set(range(WORKERS))
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def test_workers_on_memory_state_say_their_limits_are_per_worker(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    _, url = await start_upstream(upstreams)
    proxyd = await launch(
        write_config(tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, url))
    )
    assert proxyd.find("state_per_worker", workers=WORKERS)


# --------------------------------------------------------------------------------------------
# A worker dies


async def test_a_sigkilled_worker_is_replaced_and_the_service_keeps_answering(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, _upstream, _url, _path = await start_workers(issuer, launch, upstreams, tmp_path)
    assert await spread(proxyd, issuer) == set(range(WORKERS))
    victim = worker_pids(proxyd)[0]

    since = proxyd.mark()
    os.kill(victim, signal.SIGKILL)
    exited = await proxyd.wait_for("worker_exited", since, pid=victim)
    assert exited["status"] == "killed by SIGKILL"
    # From here the dead worker's socket is closed: the kernel sends every new connection to
    # the one still serving — no request fails while the replacement boots.
    await spread(proxyd, issuer, n=20)
    replaced = await proxyd.wait_for("worker_replaced", since, worker=exited["worker"])
    assert replaced["pid"] != victim and alive(replaced["pid"])
    assert await spread(proxyd, issuer) == set(range(WORKERS))
    restarts = {
        s.labels["worker"]: s.value
        for s in await scrape(proxyd)
        if s.name == "proxyd_worker_restarts_total"
    }
    assert restarts == {str(exited["worker"]): 1.0, str(1 - exited["worker"]): 0.0}


async def test_a_replacement_worker_runs_the_accepted_configuration_not_a_broken_file(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, _upstream, _url, path = await start_workers(issuer, launch, upstreams, tmp_path)
    path.write_text("this is [not toml")  # edited, never reloaded
    since = proxyd.mark()
    os.kill(worker_pids(proxyd)[1], signal.SIGKILL)
    await proxyd.wait_for("worker_replaced", since, worker=1)
    assert await spread(proxyd, issuer) == set(range(WORKERS))


async def test_a_replacement_worker_keeps_the_restart_only_settings_the_others_run(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    # A reload that changes a restart-only key (here the MCP port): the running workers keep
    # the old value until a restart. A worker replaced after it must keep it too, not bind
    # the new port alone and leave the service split over two ports.
    proxyd, _upstream, url, path = await start_workers(issuer, launch, upstreams, tmp_path)
    server = {"workers": WORKERS, "shutdown_grace": "5s"}
    doc = proxyd_config(issuer, tmp_path, {"a": [url]}, admin=proxyd.admin, server=server)
    write_config(path, doc)
    since = proxyd.mark()
    proxyd.signal(signal.SIGHUP)
    await proxyd.wait_for("config_change_needs_restart", since, worker=0)
    await proxyd.wait_for("config_change_needs_restart", since, worker=1)
    since = proxyd.mark()
    os.kill(worker_pids(proxyd)[1], signal.SIGKILL)
    await proxyd.wait_for("worker_replaced", since, worker=1)
    assert await spread(proxyd, issuer) == set(range(WORKERS))


async def test_a_worker_still_starting_at_a_reload_applies_it_once_it_serves(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, _upstream, url, path = await start_workers(issuer, launch, upstreams, tmp_path)
    since = proxyd.mark()
    os.kill(worker_pids(proxyd)[1], signal.SIGKILL)
    spawned = await proxyd.wait_for("worker_spawned", since, worker=1)
    # Frozen while it boots (long before it could serve): it is "starting" at the reload, and
    # a SIGHUP then would kill it (no handler yet), so the supervisor must not send one.
    os.kill(spawned["pid"], signal.SIGSTOP)
    try:
        assert not proxyd.find("worker_replaced", since), "the worker booted too fast to test"
        _, url_b = await start_upstream(upstreams)
        server = {"workers": WORKERS, "shutdown_grace": "5s"}
        doc = proxyd_config(
            issuer,
            tmp_path,
            {"a": [url], "b": [url_b]},
            port=proxyd.port,
            admin=proxyd.admin,
            server=server,
        )
        write_config(path, doc)
        proxyd.signal(signal.SIGHUP)
        forwarded = await proxyd.wait_for("reload_forwarded", since)
        assert forwarded["workers"] == [0]
        await proxyd.wait_for("config_reloaded", since, worker=0)
    finally:
        os.kill(spawned["pid"], signal.SIGCONT)
    await proxyd.wait_for("worker_replaced", since, worker=1)
    late = await proxyd.wait_for("reload_forwarded", since, reason="late_start")
    assert late["workers"] == [1]
    await proxyd.wait_for("config_reloaded", since, worker=1)
    assert await spread(proxyd, issuer, app="b") == set(range(WORKERS))


async def test_a_reload_while_a_replacement_is_being_spawned_reaches_it(
    issuer: TestIssuer, upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor in this process (its workers are real): a real SIGHUP lands exactly while
    # a replacement worker is being started (its boot text already sent, the spawn awaited).
    # The replacement runs the text from before the reload, so it must be sent the reload once
    # it serves, like any worker still starting at a reload.
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    _, url = await start_upstream(upstreams)
    path = write_config(tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, url))
    text = path.read_text()
    supervisor = Supervisor(settings_from_text(text, str(path)), str(path), text)
    port, admin = ports_of(path)
    real_exec = asyncio.create_subprocess_exec
    armed = False

    async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        nonlocal armed
        if armed:
            armed = False
            _, url_b = await start_upstream(upstreams)
            doc = proxyd_config(
                issuer,
                tmp_path,
                {"a": [url], "b": [url_b]},
                port=port,
                admin=admin,
                server={"workers": WORKERS, "shutdown_grace": "5s"},
            )
            write_config(path, doc)
            generation = supervisor.generation
            os.kill(os.getpid(), signal.SIGHUP)
            await until(lambda: supervisor.generation > generation, "reload accepted")
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    running = asyncio.ensure_future(supervisor.run())
    try:
        await until(lambda: supervisor.booted and supervisor._all_ready(), "serving")
        victim = supervisor.workers[1]
        readies = victim.readies
        armed = True
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        # Started (READY) and then the reload applied (RELOADING=1 ... READY=1).
        await until(lambda: victim.restarts == 1 and victim.readies >= readies + 2, "reloaded")
        token = issuer.token(time.time())
        async with fresh_connections() as http:
            for _ in range(40):
                status, body = await post(http, f"http://127.0.0.1:{port}/mcp/apps/b", token)
                assert status == 200, body
    finally:
        supervisor._stop.set()
        assert await asyncio.wait_for(running, GUARD) == 0


async def test_a_sigterm_while_a_worker_is_being_spawned_stops_it_too(
    issuer: TestIssuer, upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor in this process (its workers are real): a real SIGTERM lands while a
    # worker is being started, after the others were told to stop. That worker must be
    # stopped as well, not left serving until the SIGKILL past shutdown_grace + EXIT_SLACK.
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    _, url = await start_upstream(upstreams)
    path = write_config(tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, url))
    text = path.read_text()
    supervisor = Supervisor(settings_from_text(text, str(path)), str(path), text)
    real_exec = asyncio.create_subprocess_exec
    armed = True

    async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        nonlocal armed
        if armed:
            armed = False
            os.kill(os.getpid(), signal.SIGTERM)
            await until(lambda: supervisor.stopping, "stopping")
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    running = asyncio.ensure_future(supervisor.run())
    try:
        assert await asyncio.wait_for(running, GUARD) == 0
    finally:
        for worker in supervisor.workers:
            with contextlib.suppress(ProcessLookupError):
                if worker.pid is not None and worker.alive:
                    os.kill(worker.pid, signal.SIGKILL)
    late = supervisor.workers[0].process
    assert late is not None and late.returncode != -signal.SIGKILL


async def test_the_workers_stop_when_the_supervisor_is_killed(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, _upstream, _url, _path = await start_workers(issuer, launch, upstreams, tmp_path)
    pids = worker_pids(proxyd)
    assert all(alive(pid) for pid in pids)
    proxyd.proc.kill()  # SIGKILL: the supervisor cannot forward anything
    await proxyd.proc.wait()
    # PR_SET_PDEATHSIG: the kernel sends each worker SIGTERM and they drain and exit.
    await until(lambda: not any(alive(pid) for pid in pids), "workers gone")


async def test_a_worker_that_cannot_start_fails_the_service(
    issuer: TestIssuer, upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    _, url = await start_upstream(upstreams)
    port = free_port()
    path = write_config(tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, url, port=port))
    # Somebody else holds the port, without SO_REUSEPORT: no worker can bind it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        daemon = Daemon(await spawn_proxyd("run", "-c", str(path)), *ports_of(path))
        try:
            assert await daemon.exit_code() == 1
        finally:
            await daemon.kill()
    assert daemon.find("worker_exited")
    assert daemon.find("listen_failed")
    assert not daemon.find("supervisor_started")
    assert daemon.find("supervisor_stopped")
    daemon.check_output()


async def test_an_admin_port_in_use_fails_the_service_and_stops_its_workers(
    issuer: TestIssuer, upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    _, url = await start_upstream(upstreams)
    admin = free_port()
    path = write_config(
        tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, url, admin=admin)
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", admin))
        squatter.listen()
        daemon = Daemon(await spawn_proxyd("run", "-c", str(path)), *ports_of(path))
        try:
            assert await daemon.exit_code() == 1
        finally:
            await daemon.kill()
    # The workers were serving when the supervisor's own listener failed: they are stopped,
    # not left behind holding the MCP port.
    pids = worker_pids(daemon)
    assert len(pids) == WORKERS
    assert not any(alive(pid) for pid in pids)
    assert sorted(line["worker"] for line in daemon.find("proxyd_stopped")) == [0, 1]
    assert daemon.find("listen_failed")
    assert not daemon.find("supervisor_started")
    daemon.check_output()


# --------------------------------------------------------------------------------------------
# Signals and sd_notify


async def test_sighup_reaches_every_worker_and_systemd_hears_one_service(
    issuer: TestIssuer,
    launch: LaunchWorkers,
    upstreams: Upstreams,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, url = await start_upstream(upstreams)
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is long.
    directory = Path(tempfile.mkdtemp(prefix="proxyd-w-"))
    notify = str(directory / "n.sock")
    sock = notify_socket(notify)
    try:
        path = write_config(tmp_path / "proxyd.toml", workers_config(issuer, tmp_path, url))
        monkeypatch.setenv("NOTIFY_SOCKET", notify)
        proxyd = await launch(path)
        ready = await notify_message(sock)
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(proxyd.proc.pid)  # the supervisor is the service
        assert ready["STATUS"].startswith(f"{WORKERS}/{WORKERS} workers serving")
        assert notify_pending(sock) == []  # the workers speak to the supervisor only

        # A new app, by SIGHUP to the supervisor alone: every worker applies it.
        _, url_b = await start_upstream(upstreams)
        doc = proxyd_config(
            issuer,
            tmp_path,
            {"a": [url], "b": [url_b]},
            port=proxyd.port,
            admin=proxyd.admin,
            server={"workers": WORKERS, "shutdown_grace": "5s"},
        )
        write_config(path, doc)
        since = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        assert (await notify_message(sock))["RELOADING"] == "1"
        # READY=1 comes only once every worker has applied the file.
        assert (await notify_message(sock))["READY"] == "1"
        reloaded = proxyd.find("config_reloaded", since)
        assert sorted(line["worker"] for line in reloaded) == list(range(WORKERS))
        assert await spread(proxyd, issuer, app="b") == set(range(WORKERS))

        # A broken file: the supervisor refuses it and the workers keep theirs.
        path.write_text("this is [not toml")
        since = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        assert (await notify_message(sock))["RELOADING"] == "1"
        assert "fail" in (await notify_message(sock))["STATUS"]
        assert proxyd.find("config_reload_failed", since)
        assert not proxyd.find("config_reloaded", since)
        await spread(proxyd, issuer, app="b")

        # SIGTERM: STOPPING=1 for the service, every worker drains and stops, exit 0.
        pids = worker_pids(proxyd)
        proxyd.signal(signal.SIGTERM)
        assert await notify_message(sock) == {"STOPPING": "1"}
        assert await proxyd.exit_code() == 0
        stopped = proxyd.find("proxyd_stopped")
        assert sorted(line["worker"] for line in stopped) == list(range(WORKERS))
        assert not any(alive(pid) for pid in pids)
        assert notify_pending(sock) == []
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify)
        os.rmdir(directory)


async def test_sigterm_lets_a_request_in_flight_on_a_worker_finish(
    issuer: TestIssuer, launch: LaunchWorkers, upstreams: Upstreams, tmp_path: Path
) -> None:
    proxyd, upstream, _url, _path = await start_workers(issuer, launch, upstreams, tmp_path)
    token = issuer.token(time.time())
    async with fresh_connections() as http:
        held = asyncio.ensure_future(post(http, proxyd.url("a"), token, "hold"))
        await asyncio.wait_for(upstream.holding.wait(), GUARD)
        proxyd.signal(signal.SIGTERM)
        await proxyd.wait_for("proxyd_stopping")  # a worker is draining
        upstream.release.set()
        status, body = await asyncio.wait_for(held, GUARD)
        assert status == 200 and len(body["result"]) > 0
    assert await proxyd.exit_code() == 0


# --------------------------------------------------------------------------------------------
# Pure parts


def test_restart_policy_backs_off_a_crash_loop_and_forgives_a_stable_worker() -> None:
    policy = RestartPolicy(initial=0.1, maximum=1.0, stable_after=10.0)
    delay = 0.0
    seen = []
    for _ in range(6):
        delay = policy.next_delay(delay, lived=0.5)
        seen.append(delay)
    assert seen == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.next_delay(1.0, lived=10.0) == 0.1


def test_exit_statuses_and_notify_fields_are_read_plainly() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-200) == "killed by signal 200"
    assert parse_fields(b"READY=1\nSTATUS=a=b\ngarbage\n") == {"READY": "1", "STATUS": "a=b"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (8, 8), (MAX_WORKERS, MAX_WORKERS), ("auto", len(os.sched_getaffinity(0)))],
)
def test_workers_setting(value: object, expected: int) -> None:
    settings = parse_settings({"server": {"workers": value}}, "proxyd.toml")
    assert settings.server.workers == expected


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, True, "4", "all", 2.0])
def test_workers_setting_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"server": {"workers": value}}, "proxyd.toml")
    assert any(p.startswith("server.workers:") for p in info.value.problems), info.value.problems
