"""Operating proxyd (issue 4) with a REAL daemon: `python -m proxyd run -c FILE` as a child
process, real signals, real sockets on 127.0.0.1, its JSON log lines read from stdout.

Covered: the app auth config watcher (add, change, atomic replace, broken file, duplicate name,
delete; inotify and the polling fallback) while an SSE stream stays open; SIGHUP reloads
(valid, broken, restart-only keys, a stream across them); SIGTERM drain (in-flight request
finishes, readiness false, SIGHUP ignored, exit 0; a stream longer than the grace is cut after
it); reloads and shutdown with active health checks in flight; the sd_notify protocol on a unix
datagram socket (path and abstract namespace); /metrics parsed with the Prometheus text parser.

Nothing is faked in the daemon: every wait is on a condition (a log line, an HTTP answer, a
datagram, a scrape) with a bounded deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kit.daemon import (
    HELD_ANSWER,
    Daemon,
    Launch,
    Scrape,
    notify_message,
    notify_pending,
    notify_socket,
    open_stream,
    post,
    proxyd_config,
    rpc,
    scrape,
    start_upstream,
    write_config,
)
from tests.kit.echo import Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.net import free_port
from tests.kit.proxy import bearer
from tests.kit.tomltext import toml_tables
from tests.kit.wait import GUARD, until

WATCH_DEADLINE = 2.0  # issue 4: a file change applies within 2 s without a signal
WATCH_MARGIN = 0.5  # scheduling slack on a loaded CI machine, on top of the deadline


# --------------------------------------------------------------------------------------------
# The daemon (tests/kit/daemon.py), its config files, client helpers


def auth_file(issuer: TestIssuer, name: str, audience: str, **jwt: Any) -> str:
    """One app auth config file of `app_auth.config_dir` (top-level keys)."""
    return toml_tables(
        {
            "name": name,
            "app_labels": {"env": "test"},
            "jwt": {
                "issuer": issuer.issuer,
                "audience": audience,
                "jwks_url": issuer.url,
                **jwt,
            },
        }
    )


def replace_atomically(path: Path, text: str) -> None:
    """How editors and config management write: a temporary file renamed over the target."""
    temp = path.with_name(path.name + ".tmp")  # not *.toml: the watcher ignores it
    temp.write_text(text)
    os.replace(temp, path)


def reason(body: dict[str, Any]) -> str:
    """The stable reason code of a proxyd error answer."""
    value = body["error"]["data"]["reason"]
    assert isinstance(value, str)
    return value


async def connect_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


# --------------------------------------------------------------------------------------------
# 1. The app auth config watcher, while a client keeps streaming


@pytest.mark.parametrize("watch", ["inotify", "polling"])
async def test_watched_directory_changes_apply_within_2s_while_a_stream_stays_open(
    watch: str,
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # watchfiles reads this in the daemon: inotify on Linux, or the polling fallback.
    monkeypatch.setenv("WATCHFILES_FORCE_POLLING", "1" if watch == "polling" else "false")
    upstream, url = await start_upstream(upstreams)
    config_dir = tmp_path / "app_auth.d"
    config_dir.mkdir()
    doc = proxyd_config(issuer, tmp_path, {"a": [url]}, config_dir=config_dir)
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    app = proxyd.url("a")
    idp = config_dir / "idp.toml"
    now = time.time()
    main_token = issuer.token(now)  # accepted by the main file's config, all along

    async def applied(event: str, since: int, started: float, **fields: Any) -> dict[str, Any]:
        line = await proxyd.wait_for(event, since, within=WATCH_DEADLINE + WATCH_MARGIN, **fields)
        took = time.monotonic() - started
        assert took <= WATCH_DEADLINE, f"{event} took {took:.2f}s"
        return line

    async def session_of_next_request(token: str) -> tuple[int, dict[str, Any], str | None]:
        mark = await proxyd.sync(http)
        status, body = await post(http, app, token)
        line = await proxyd.wait_for("request", mark)
        return status, body, line.get("session")

    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, app, main_token, upstream)
        await stream.relay("before")

        # Added: a new file's tokens are accepted.
        t1 = issuer.token(now, aud="aud-1")
        status, body = await post(http, app, t1)
        assert (status, reason(body)) == (401, "wrong_audience")
        mark, started = proxyd.mark(), time.monotonic()
        idp.write_text(auth_file(issuer, "dir-idp", "aud-1"))
        added = await applied("app_auth_config_added", mark, started, config="dir-idp")
        assert added["source"] == str(idp)
        assert (await post(http, app, t1))[0] == 200
        await stream.relay("after-add")

        # Changed in place (audience): sessions of the old audience are verified again on
        # their next request and refused; tokens for the new audience are accepted; sessions
        # of other configs stay cached.
        mark, started = proxyd.mark(), time.monotonic()
        idp.write_text(auth_file(issuer, "dir-idp", "aud-2"))
        updated = await applied("app_auth_config_updated", mark, started, config="dir-idp")
        assert updated["generation"] > added["generation"]
        status, body = await post(http, app, t1)
        assert (status, reason(body)) == (401, "wrong_audience")
        t2 = issuer.token(now, aud="aud-2")
        assert (await session_of_next_request(t2))[::2] == (200, "new")
        assert (await session_of_next_request(main_token))[::2] == (200, "cached")
        await stream.relay("after-change")

        # Atomic replace (temp file + rename) with a change the session still satisfies: the
        # token is verified again (a "new" session) and carries on.
        mark, started = proxyd.mark(), time.monotonic()
        replace_atomically(idp, auth_file(issuer, "dir-idp", "aud-2", leeway="30s"))
        replaced = await applied("app_auth_config_updated", mark, started, config="dir-idp")
        assert replaced["generation"] > updated["generation"]
        assert (await session_of_next_request(t2))[::2] == (200, "new")
        assert (await session_of_next_request(t2))[::2] == (200, "cached")
        await stream.relay("after-replace")

        # Broken: reported with the file and the key path; the last good version stays.
        mark, started = proxyd.mark(), time.monotonic()
        idp.write_text(auth_file(issuer, "dir-idp", "aud-3").replace("audience", "audiance"))
        rejected = await applied("app_auth_config_rejected", mark, started, file=str(idp))
        problems = "\n".join(rejected["problems"])
        assert f"{idp}: jwt.audiance: unknown key" in problems
        assert rejected["kept"] == "last good version"
        t3 = issuer.token(now, aud="aud-2", jti="t3")  # a new session: verified by aud-2
        assert (await session_of_next_request(t3))[::2] == (200, "new")
        assert (await session_of_next_request(t2))[::2] == (200, "cached")
        assert not proxyd.find("app_auth_config_updated", mark)
        assert not proxyd.find("app_auth_config_removed", mark)
        await stream.relay("after-broken")

        # Duplicate name in a newer file: an error for that file, even though its name sorts
        # first; the config in force is not overridden.
        dup = config_dir / "00-dup.toml"
        t_dup = issuer.token(now, aud="aud-dup")
        mark, started = proxyd.mark(), time.monotonic()
        dup.write_text(auth_file(issuer, "dir-idp", "aud-dup"))
        duplicate = await applied(
            "app_auth_config_rejected",
            mark,
            started,
            where=lambda line: str(line.get("problem")).startswith(f"{dup}: "),
        )
        assert "already defined" in duplicate["problem"], duplicate
        status, body = await post(http, app, t_dup)
        assert (status, reason(body)) == (401, "wrong_audience")
        assert (await session_of_next_request(t2))[::2] == (200, "cached")
        t4 = issuer.token(now, aud="aud-2", jti="t4")
        assert (await post(http, app, t4))[0] == 200
        assert not proxyd.find("app_auth_config_updated", mark)
        await stream.relay("after-duplicate")
        dup.unlink()

        # Deleted: its sessions end (401 config_removed), its tokens are refused.
        mark, started = proxyd.mark(), time.monotonic()
        idp.unlink()
        removed = await applied("app_auth_config_removed", mark, started, config="dir-idp")
        assert removed["generation"] > replaced["generation"]
        for token in (t2, t3):
            status, body = await post(http, app, token)
            assert (status, reason(body)) == (401, "config_removed")
        status, body = await post(http, app, issuer.token(now, aud="aud-2", jti="t5"))
        assert (status, reason(body)) == (401, "wrong_audience")
        assert (await session_of_next_request(main_token))[::2] == (200, "cached")
        await stream.relay("after-delete")

        # The stream went through every change unharmed and ends cleanly.
        assert await stream.finish() == b""
        assert stream.received == [
            "before",
            "after-add",
            "after-change",
            "after-replace",
            "after-broken",
            "after-duplicate",
            "after-delete",
        ]
    # Its access line: complete, not broken (written when the stream ended).
    size = sum(len(f"event: message\ndata: {item}\n\n") for item in stream.received)
    line = await proxyd.wait_for("request", where=lambda line: line.get("bytes_out") == size)
    assert line["status"] == 200 and "broken" not in line, line
    assert line["app"] == "a"
    assert proxyd.find("session_ended", reason="config_removed", config="dir-idp")
    proxyd.signal(signal.SIGTERM)
    assert await proxyd.exit_code() == 0


# --------------------------------------------------------------------------------------------
# 2. SIGHUP: reload the main file


async def test_sighup_applies_a_valid_change_and_a_broken_file_changes_nothing(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    _, url_a = await start_upstream(upstreams)
    _, url_b = await start_upstream(upstreams)
    path = tmp_path / "proxyd.toml"
    doc = proxyd_config(issuer, tmp_path, {"a": [url_a]})
    proxyd = await launch(write_config(path, doc))
    now = time.time()
    token_a = issuer.token(now, jti="a")

    async with aiohttp.ClientSession() as http:
        assert (await post(http, proxyd.url("a"), token_a))[0] == 200
        status, body = await post(http, proxyd.url("b"), token_a)
        assert (status, reason(body)) == (404, "unknown_app")

        # Valid: a new app and a tighter limit for new tokens (2, then 429).
        doc = proxyd_config(
            issuer,
            tmp_path,
            {"a": [url_a], "b": [url_b]},
            port=proxyd.port,
            admin=proxyd.admin,
            limits={"unauthenticated": {"average": 1, "period": "1h", "burst": 2}},
        )
        write_config(path, doc)
        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        reloaded = await proxyd.wait_for("config_reloaded", mark)
        assert reloaded["apps"] == ["a", "b"]
        assert not proxyd.find("config_change_needs_restart", mark)
        token_b = issuer.token(now, jti="b")
        assert (await post(http, proxyd.url("b"), token_b))[0] == 200
        assert (await post(http, proxyd.url("a"), issuer.token(now, jti="c")))[0] == 200
        status, body = await post(http, proxyd.url("a"), issuer.token(now, jti="d"))
        assert (status, reason(body)) == (429, "rate_limited")
        assert (await post(http, proxyd.url("a"), token_a))[0] == 200  # cached: no limiter

        # Valid: the log level goes to warning (config_reloaded itself is info: not shown,
        # so the scrape tells when it applied).
        doc["log"]["level"] = "warning"
        write_config(path, doc)
        proxyd.signal(signal.SIGHUP)
        await until(lambda: _reloads(http, proxyd, "applied", 2), what="second reload applied")
        mark = proxyd.mark()
        assert (await post(http, proxyd.url("a"), token_a))[0] == 200
        assert (await post(http, proxyd.url("b"), token_b))[0] == 200

        # Broken: app a removed, an unknown key, a bad server URL. Nothing changes.
        broken = proxyd_config(
            issuer, tmp_path, {"b": ["ftp://127.0.0.1/mcp"]}, port=proxyd.port, admin=proxyd.admin
        )
        broken["server"]["listne"] = "127.0.0.1:1"
        write_config(path, broken)
        proxyd.signal(signal.SIGHUP)
        failed = await proxyd.wait_for("config_reload_failed", mark)
        assert failed["level"] == "error"
        assert failed["path"] == str(path)
        problems = failed["problems"]
        assert any(p.startswith("server.listne: unknown key") for p in problems), problems
        assert any(p.startswith("apps[0].servers[0]:") for p in problems), problems
        # The warning level stayed in force: no access line for the two requests above.
        assert not proxyd.find("request", mark), proxyd.lines[mark:]
        assert not proxyd.find("config_reloaded", mark)
        assert (await post(http, proxyd.url("a"), token_a))[0] == 200
        assert (await post(http, proxyd.url("b"), token_b))[0] == 200
        status, body = await post(http, proxyd.url("a"), issuer.token(now, jti="e"))
        assert (status, reason(body)) == (429, "rate_limited")  # the limiter state is kept
        assert await _reloads(http, proxyd, "failed", 1)
    proxyd.signal(signal.SIGTERM)
    assert await proxyd.exit_code() == 0


async def _reloads(http: aiohttp.ClientSession, proxyd: Daemon, result: str, count: int) -> bool:
    metrics = await scrape(http, proxyd)
    return metrics.value("proxyd_config_reloads_total", source="sighup", result=result) == count


async def test_sighup_reports_restart_only_keys_and_streams_continue(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    upstream, url = await start_upstream(upstreams)
    path = tmp_path / "proxyd.toml"
    proxyd = await launch(write_config(path, proxyd_config(issuer, tmp_path, {"a": [url]})))
    token = issuer.token(time.time())
    new_port = free_port()

    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, proxyd.url("a"), token, upstream)
        await stream.relay("before")
        doc = proxyd_config(
            issuer,
            tmp_path,
            {"a": [url], "b": [url]},
            port=new_port,
            admin=proxyd.admin,
        )
        write_config(path, doc)
        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        later = await proxyd.wait_for("config_change_needs_restart", mark)
        # public_url follows listen when not set, and is restart-only too (the resource URLs
        # and the access middleware are built once).
        assert later["keys"] == ["server.listen", "server.public_url"]
        reloaded = await proxyd.wait_for("config_reloaded", mark)
        assert reloaded["apps"] == ["a", "b"]
        await stream.relay("after-reload")

        # The old port keeps serving, with the rest of the change applied; the new one is not
        # opened until a restart.
        assert (await post(http, proxyd.url("b"), token))[0] == 200
        assert await connect_refused(new_port)

        # A second reload while the stream is still open: it goes on.
        proxyd.signal(signal.SIGHUP)
        await proxyd.wait_for("config_reloaded", proxyd.lines.index(reloaded) + 1)
        await stream.relay("after-second-reload")
        assert await stream.finish() == b""
        assert stream.received == ["before", "after-reload", "after-second-reload"]
    proxyd.signal(signal.SIGTERM)
    assert await proxyd.exit_code() == 0
    assert [line["status"] for line in proxyd.find("request", path="/mcp/apps/a")] == [200]
    assert not proxyd.find("request", where=lambda line: "broken" in line)


# --------------------------------------------------------------------------------------------
# 3. SIGTERM: drain


async def test_sigterm_lets_an_in_flight_request_finish_then_exits_0(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    upstream, url = await start_upstream(upstreams)
    doc = proxyd_config(issuer, tmp_path, {"a": [url]}, server={"shutdown_grace": "20s"})
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    token = issuer.token(time.time())

    async with aiohttp.ClientSession() as http:
        async with http.get(proxyd.admin_url("/readyz")) as ready:
            assert ready.status == 200

        async def held() -> tuple[int, bytes]:
            async with http.post(proxyd.url("a"), json=rpc("hold"), headers=bearer(token)) as r:
                return r.status, await r.read()

        in_flight = asyncio.create_task(held())
        try:
            await asyncio.wait_for(upstream.holding.wait(), GUARD)
            mark = proxyd.mark()
            proxyd.signal(signal.SIGTERM)
            stopping = await proxyd.wait_for("proxyd_stopping", mark)
            assert stopping["grace_seconds"] == 20

            # Draining: not ready, no new connections, the held request still going.
            async with http.get(proxyd.admin_url("/readyz")) as ready:
                assert ready.status == 503
                assert await ready.json() == {"ready": False}
            async with http.get(proxyd.admin_url("/healthz")) as alive:
                assert alive.status == 200
            await until(lambda: connect_refused(proxyd.port), what="listener closed")
            assert proxyd.proc.returncode is None
            assert not in_flight.done()
            # A reload request or a second stop signal during the drain changes nothing.
            proxyd.signal(signal.SIGHUP)
            proxyd.signal(signal.SIGTERM)
            await proxyd.wait_for("reload_skipped", mark, reason="draining")

            upstream.release.set()
            status, body = await asyncio.wait_for(in_flight, GUARD)
        finally:
            upstream.release.set()
            in_flight.cancel()
    assert status == 200
    answer = json.loads(body)
    assert answer["result"] == "x" * HELD_ANSWER
    assert await proxyd.exit_code() == 0
    done = await proxyd.wait_for("request", mark, status=200)
    stopped = await proxyd.wait_for("proxyd_stopped", mark)
    assert proxyd.lines.index(done) < proxyd.lines.index(stopped)
    assert "broken" not in done
    assert not proxyd.find("config_reloaded", mark)


async def test_sigterm_answers_a_new_connection_whose_first_request_is_still_arriving(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    """A connection accepted just before the drain, its head half sent: aiohttp's drain
    closed it unanswered, a reset the client could not safely retry. proxyd answers that
    first request, then closes the connection; an idle keep-alive connection is closed."""
    _, url = await start_upstream(upstreams)
    doc = proxyd_config(
        issuer, tmp_path, {"a": [url]}, server={"shutdown_grace": "20s", "header_timeout": "20s"}
    )
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    body = json.dumps(rpc("ping")).encode()
    head = (
        "POST /mcp/apps/a HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{proxyd.port}\r\n"
        f"Authorization: Bearer {issuer.token(time.time())}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxyd.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", proxyd.port)
    try:
        # The idle connection has served a request: keep-alive, waiting for the next one.
        idle_writer.write(head + body)
        first = await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), GUARD)
        assert first.startswith(b"HTTP/1.1 200 ")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in first.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        await idle_reader.readexactly(length)

        writer.write(head[:40])
        await writer.drain()
        mark = proxyd.mark()
        proxyd.signal(signal.SIGTERM)
        await proxyd.wait_for("proxyd_stopping", mark)
        await until(lambda: connect_refused(proxyd.port), what="listener closed")
        # The drain has begun: the idle keep-alive connection is closed at once.
        assert await asyncio.wait_for(idle_reader.read(), GUARD) == b""
        assert proxyd.proc.returncode is None

        writer.write(head[40:] + body)
        answer = await asyncio.wait_for(reader.read(), GUARD)  # to EOF: answered, then closed
    finally:
        writer.close()
        idle_writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", answer[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["result"] is not None
    assert await proxyd.exit_code() == 0
    assert proxyd.find("proxyd_stopped")


async def test_sigterm_cuts_a_stream_longer_than_the_grace_and_exits_0(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    upstream, url = await start_upstream(upstreams)
    doc = proxyd_config(issuer, tmp_path, {"a": [url]}, server={"shutdown_grace": "2s"})
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    token = issuer.token(time.time())

    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, proxyd.url("a"), token, upstream)
        await stream.relay("open")
        proxyd.signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Within the grace the stream still flows.
        await proxyd.wait_for("proxyd_stopping")
        await stream.relay("during-grace")
        assert await proxyd.exit_code() == 0
        took = time.monotonic() - signalled
        # The stream was given its grace, then cut: the client sees a truncated answer (never
        # a clean end it could take for complete), and the upstream request is closed too.
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream.next()
        await asyncio.wait_for(upstream.stream_closed.wait(), GUARD)
    # The grace was given, and no more (aiohttp alone held such a stream for twice the grace).
    assert 1.9 <= took < 3.5, f"exited {took:.2f}s after SIGTERM with a 2 s grace"
    assert proxyd.find("proxyd_stopped")


async def test_reloads_and_shutdown_never_hang_on_active_health_checks(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    """A reload stops and restarts the active health checks, and so does shutdown: a signal
    that lands while the new probes connect must still end them. (A probe that swallowed its
    cancellation, as asyncio.wait_for does on Python 3.11 when the connection completes at
    that moment, hung the reload, and with it every later one, or the exit.)"""
    apps = {}
    for name in ("a", "b", "c", "d"):
        apps[name] = [(await start_upstream(upstreams))[1]]
    doc = proxyd_config(issuer, tmp_path, apps)
    for app in doc["apps"]:
        app["health_check"] = {"type": "tcp", "interval": "10s"}
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    for _ in range(30):
        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)  # right as the previous reload's probes connect
        await proxyd.wait_for("config_reloaded", mark)
    proxyd.signal(signal.SIGINT)
    assert await proxyd.exit_code() == 0
    assert proxyd.find("proxyd_stopped")


# --------------------------------------------------------------------------------------------
# 4. sd_notify


@pytest.fixture
def notify_path() -> Iterator[str]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is long.
    directory = tempfile.mkdtemp(prefix="proxyd-notify-")
    path = os.path.join(directory, "notify.sock")
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def test_notify_socket_gets_ready_reloading_ready_stopping_in_order(
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    tmp_path: Path,
    notify_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, url = await start_upstream(upstreams)
    config_dir = tmp_path / "app_auth.d"
    config_dir.mkdir()
    (config_dir / "idp.toml").write_text(auth_file(issuer, "dir-idp", "aud-dir"))
    path = tmp_path / "proxyd.toml"
    write_config(path, proxyd_config(issuer, tmp_path, {"a": [url]}, config_dir=config_dir))
    sock = notify_socket(notify_path)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    try:
        proxyd = await launch(path)
        ready = await notify_message(sock)
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(proxyd.proc.pid)
        assert ready["STATUS"]
        # READY=1 means the app auth config directory is loaded: its tokens work at once.
        async with aiohttp.ClientSession() as http:
            token = issuer.token(time.time(), aud="aud-dir")
            assert (await post(http, proxyd.url("a"), token))[0] == 200

        # A reload: RELOADING=1 with the CLOCK_MONOTONIC time of the reload, then READY=1.
        before = _monotonic_usec()
        proxyd.signal(signal.SIGHUP)
        reloading = await notify_message(sock)
        after = _monotonic_usec()
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        assert (await notify_message(sock))["READY"] == "1"
        await proxyd.wait_for("config_reloaded")

        # A failed reload ends the reloading state too (systemd would wait otherwise).
        path.write_text("this is [not toml")
        proxyd.signal(signal.SIGHUP)
        assert (await notify_message(sock))["RELOADING"] == "1"
        ready_again = await notify_message(sock)
        assert ready_again["READY"] == "1"
        assert "fail" in ready_again["STATUS"]
        await proxyd.wait_for("config_reload_failed")

        proxyd.signal(signal.SIGTERM)
        assert await notify_message(sock) == {"STOPPING": "1"}
        assert await proxyd.exit_code() == 0
        assert notify_pending(sock) == []  # nothing after STOPPING=1
    finally:
        sock.close()


async def test_notify_socket_in_the_abstract_namespace(
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, url = await start_upstream(upstreams)
    path = write_config(tmp_path / "proxyd.toml", proxyd_config(issuer, tmp_path, {"a": [url]}))
    name = f"proxyd-test-{uuid.uuid4().hex}"
    sock = notify_socket("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        proxyd = await launch(path)
        assert (await notify_message(sock))["READY"] == "1"
        proxyd.signal(signal.SIGHUP)
        assert (await notify_message(sock))["RELOADING"] == "1"
        assert (await notify_message(sock))["READY"] == "1"
        proxyd.signal(signal.SIGINT)
        assert await notify_message(sock) == {"STOPPING": "1"}
        assert await proxyd.exit_code() == 0
        assert not proxyd.find("sd_notify_failed")
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------
# 5. /metrics


async def test_metrics_parse_and_move(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, refused_url: str, tmp_path: Path
) -> None:
    upstream, url = await start_upstream(upstreams)
    down = refused_url
    idp2_jwks = refused_url.removesuffix("/mcp") + "/jwks.json"
    config_dir = tmp_path / "app_auth.d"
    config_dir.mkdir()
    burst = 12
    doc = proxyd_config(
        issuer,
        tmp_path,
        {"a": [url], "down": [down]},
        config_dir=config_dir,
        server={"trusted_proxies": ["127.0.0.1/32"]},
        limits={"unauthenticated": {"average": 1, "period": "1h", "burst": burst}},
    )
    doc["apps"][1]["health_check"] = {"interval": "100ms", "unhealthy_threshold": 1}
    doc["apps"].append({"name": "other", "labels": {"env": "other"}, "servers": [url]})
    doc["app_auth_configs"].append(
        {
            "name": "idp2",
            "app_labels": {"env": "test"},
            "jwt": {"issuer": "https://idp2.test", "audience": "x", "jwks_url": idp2_jwks},
        }
    )
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    a = proxyd.url("a")
    now = time.time()
    token = issuer.token(now)

    async with aiohttp.ClientSession() as http:
        m0 = await scrape(http, proxyd)
        assert m0.types["proxyd_requests"] == "counter"
        assert m0.types["proxyd_request_duration_seconds"] == "histogram"
        assert m0.types["proxyd_open_streams"] == "gauge"

        # Upstream health per server: the live one 1, the refused one 0 after its checks.
        async def down_is_unhealthy() -> bool:
            m = await scrape(http, proxyd)
            return m.has("proxyd_upstream_healthy", app="down", server=down, state="unhealthy")

        await until(down_is_unhealthy, what="refused server reported unhealthy")
        m = await scrape(http, proxyd)
        assert m.value("proxyd_upstream_healthy", app="down", server=down, state="unhealthy") == 0
        assert m.value("proxyd_upstream_healthy", app="a", server=url, state="healthy") == 1

        # Requests by app, method and status; one verification for three requests.
        for _ in range(3):
            assert (await post(http, a, token))[0] == 200
        # Auth failures by reason (each a new token from 127.0.0.1: 6 of the burst).
        other_key = TestIssuer()
        other_key.add_key("k-unknown")
        failures = {
            "expired": issuer.token(now - 900, exp=int(now) - 600),
            "bad_signature": issuer.tampered(issuer.token(now, jti="x"), sub="mallory"),
            "unknown_kid": other_key.token(now),
            "jwks_unavailable": issuer.token(now, iss="https://idp2.test", aud="x"),
        }
        statuses = {}
        for expected, bad in failures.items():
            status, body = await post(http, a, bad)
            assert reason(body) == expected
            statuses[expected] = status
        assert statuses == {
            "expired": 401,
            "bad_signature": 401,
            "unknown_kid": 401,
            "jwks_unavailable": 503,
        }
        status, body = await post(http, proxyd.url("other"), token)
        assert (status, reason(body)) == (401, "no_matching_config")

        # A flood without tokens from one client (behind a trusted proxy) is rate limited.
        flood = {"X-Forwarded-For": "198.51.100.7"}
        answers = [(await post(http, a, None, headers=flood))[0] for _ in range(burst + 5)]
        assert answers == [401] * burst + [429] * 5

        m1 = await scrape(http, proxyd)

        def delta(name: str, **labels: str) -> float:
            return m1.value(name, **labels) - m0.value(name, **labels)

        assert delta("proxyd_requests_total", app="a", method="POST", status="200") == 3
        assert delta("proxyd_requests_total", app="a", method="POST", status="401") == 3 + burst
        assert delta("proxyd_requests_total", app="a", method="POST", status="503") == 1
        assert delta("proxyd_requests_total", app="a", method="POST", status="429") == 5
        assert delta("proxyd_requests_total", app="other", method="POST", status="401") == 1
        assert delta("proxyd_auth_total", outcome="success", reason="verified") == 1
        for expected in (*failures, "no_matching_config"):
            assert delta("proxyd_auth_total", outcome="failure", reason=expected) == 1, expected
        assert delta("proxyd_rate_limited_total", limit="unauthenticated") == 5
        requests_a = 3 + 4 + burst + 5
        assert delta("proxyd_request_duration_seconds_count", app="a") == requests_a
        assert delta("proxyd_request_duration_seconds_sum", app="a") > 0
        _check_histogram(m1, "proxyd_request_duration_seconds", app="a")

        # JWKS age and fetch errors per URL.
        assert m1.has("proxyd_jwks_age_seconds", url=issuer.url)
        assert 0 <= m1.value("proxyd_jwks_age_seconds", url=issuer.url) < GUARD * 6
        assert not m1.has("proxyd_jwks_age_seconds", url=idp2_jwks)  # never fetched
        assert m1.value("proxyd_jwks_fetch_errors_total", url=idp2_jwks) >= 1
        assert m1.value("proxyd_jwks_fetch_errors_total", url=issuer.url) == 0

        # Open streams: 1 while one is relayed, 0 after; its time lands in the histogram.
        stream = await open_stream(http, a, token, upstream)
        opened = time.monotonic()
        await stream.relay("one")

        async def streams_open(n: float) -> bool:
            return (await scrape(http, proxyd)).value("proxyd_open_streams", app="a") == n

        await until(lambda: streams_open(1), what="open stream gauge 1")
        assert await stream.finish() == b""
        held = time.monotonic() - opened
        await until(lambda: streams_open(0), what="open stream gauge back to 0")
        m2 = await scrape(http, proxyd)
        assert (
            m2.value("proxyd_request_duration_seconds_count", app="a")
            == m1.value("proxyd_request_duration_seconds_count", app="a") + 1
        )
        spent = m2.value("proxyd_request_duration_seconds_sum", app="a") - m1.value(
            "proxyd_request_duration_seconds_sum", app="a"
        )
        assert spent >= held - 0.05, (spent, held)
        # The JWKS age grows with real time.
        assert m2.value("proxyd_jwks_age_seconds", url=issuer.url) > m1.value(
            "proxyd_jwks_age_seconds", url=issuer.url
        )

        # Config generation: a file in the watched directory moves it within the deadline.
        generation = m2.value("proxyd_config_generation")
        loaded_at = m2.value("proxyd_config_last_load_timestamp_seconds")
        assert m2.value("proxyd_app_auth_configs") == 2
        (config_dir / "new.toml").write_text(auth_file(issuer, "new-idp", "aud-new"))

        async def generation_moved() -> bool:
            m = await scrape(http, proxyd)
            return m.value("proxyd_config_generation") == generation + 1

        await until(generation_moved, "generation + 1", WATCH_DEADLINE + WATCH_MARGIN)
        m3 = await scrape(http, proxyd)
        assert m3.value("proxyd_config_last_load_timestamp_seconds") > loaded_at
        assert m3.value("proxyd_app_auth_configs") == 3
    proxyd.signal(signal.SIGTERM)
    assert await proxyd.exit_code() == 0


def _check_histogram(m: Scrape, name: str, **labels: str) -> None:
    buckets = sorted(
        (float(sample["le"]), m.value(f"{name}_bucket", **sample))
        for sample in m.labelled(f"{name}_bucket")
        if all(sample.get(k) == v for k, v in labels.items())
    )
    assert len(buckets) > 2
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert buckets[-1][0] == float("inf")
    assert buckets[-1][1] == m.value(f"{name}_count", **labels)
