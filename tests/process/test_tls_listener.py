"""TLS on proxyd's own listener (issue 13 §1), against a REAL `proxyd run` and real TLS.

A private CA (tests/kit/tlscerts.py) issues proxyd's certificates; clients verify them against
it: the official MCP SDK client runs a session over https, an mTLS listener refuses a client
without a certificate at the handshake, a SIGHUP serves a new certificate to new connections
while an SSE stream opened before keeps going, a broken pair changes nothing, plain HTTP gets
a 400. check-config's findings, and systemd socket activation with a real inherited socket.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.kit.daemon import (
    Daemon,
    Launch,
    launching,
    open_stream,
    ports_of,
    post,
    proxyd_config,
    rpc,
    spawn_proxyd,
    start_upstream,
    write_config,
)
from tests.kit.echo import Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import LEGACY, upstream_server
from tests.kit.net import free_port
from tests.kit.proxy import bearer
from tests.kit.tlscerts import TestCA
from tests.kit.wait import GUARD

# --------------------------------------------------------------------------------------------
# Helpers


def tls_doc(
    issuer: TestIssuer,
    tmp_path: Path,
    apps: dict[str, list[str]],
    cert: Path,
    key: Path,
    **tls: str,
) -> dict[str, Any]:
    doc = proxyd_config(issuer, tmp_path, apps)
    doc["server"]["tls"] = {"cert_file": str(cert), "key_file": str(key), **tls}
    return doc


def client_context(ca: TestCA, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def https(proxyd: Daemon, app: str = "a") -> str:
    return f"https://127.0.0.1:{proxyd.port}/mcp/apps/{app}"


async def served_certificate(port: int, ca: TestCA) -> x509.Certificate:
    """The leaf certificate a new connection to ``port`` is served (verified against ``ca``)."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca)), GUARD
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() in (None, "http/1.1")
        der = ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


def self_signed(
    directory: Path, name: str, not_after: datetime.datetime, mode: int = 0o600
) -> tuple[Path, Path]:
    """A self-signed certificate valid until ``not_after`` (check-config's expiry checks)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=90))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(mode)
    return cert_file, key_file


async def check_config(path: Path) -> tuple[int, str, str]:
    proc = await spawn_proxyd("check-config", "-c", str(path))
    out, err = await asyncio.wait_for(proc.communicate(), GUARD)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --------------------------------------------------------------------------------------------
# The listener


async def test_the_sdk_client_runs_a_session_over_tls_verified_by_the_private_ca(
    issuer: TestIssuer, launch: Launch, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("proxyd")
    async with upstream_server(name="up") as up:
        path = write_config(
            tmp_path / "proxyd.toml", tls_doc(issuer, tmp_path, {"a": [up.url]}, cert, key)
        )
        proxyd = await launch(path)
        started = await proxyd.wait_for("proxyd_started")
        assert started["public_url"] == f"https://127.0.0.1:{proxyd.port}"
        assert started["tls"] is True
        token = issuer.token(time.time())
        http = httpx2.AsyncClient(
            headers=bearer(token),
            verify=client_context(ca),
            timeout=httpx2.Timeout(GUARD, read=300.0),
        )
        async with http:
            transport = streamable_http_client(https(proxyd), http_client=http)
            async with Client(transport, mode=LEGACY, cache=None) as client:
                assert "add" in {t.name for t in (await client.list_tools()).tools}
                added = await client.call_tool("add", {"a": 2, "b": 40})
                assert added.content[0].text == "42"  # type: ignore[union-attr]

        # A client that does not trust the CA is refused by its own verification.
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await plain.post(https(proxyd), json=rpc(), headers=bearer(token))


async def test_plain_http_to_the_tls_port_is_a_clear_400(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("proxyd")
    _, url = await start_upstream(upstreams)
    proxyd = await launch(
        write_config(tmp_path / "proxyd.toml", tls_doc(issuer, tmp_path, {"a": [url]}, cert, key))
    )
    async with aiohttp.ClientSession() as http:
        resp = await asyncio.wait_for(
            http.post(proxyd.url("a"), json=rpc(), headers=bearer(issuer.token(time.time()))),
            GUARD,
        )
        assert resp.status == 400
        body = await resp.json()
        assert "TLS" in body["error"]["message"]
        assert "https://" in body["error"]["message"]
    await proxyd.wait_for("request_rejected", reason="plain_http_on_tls_port")


async def test_mtls_refuses_a_client_without_a_certificate_at_the_handshake(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("proxyd")
    client_cert = ca.issue("alice", hosts=[], client=True)
    _, url = await start_upstream(upstreams)
    doc = tls_doc(
        issuer, tmp_path, {"a": [url]}, cert, key, client_ca_file=str(ca.ca_file), min_version="1.3"
    )
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    token = issuer.token(time.time())
    # Without a client certificate: the handshake fails, no HTTP is ever answered.
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", proxyd.port, ssl=client_context(ca)), GUARD
    )
    # (TLS 1.3: the server's refusal arrives after the client's side of the handshake.)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        data = await asyncio.wait_for(reader.read(), GUARD)
        assert data == b""  # (a close without an alert is a refusal too)
        raise ConnectionResetError
    writer.close()
    # With one: served.
    connector = aiohttp.TCPConnector(ssl=client_context(ca, client_cert))
    async with aiohttp.ClientSession(connector=connector) as http:
        assert (await post(http, https(proxyd), token))[0] == 200


async def test_sighup_serves_a_new_certificate_to_new_connections_while_a_stream_goes_on(
    issuer: TestIssuer, launch: Launch, upstreams: Upstreams, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "ca")
    first_cert, first_key = ca.issue("first")
    live_cert, live_key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    live_cert.write_bytes(first_cert.read_bytes())
    live_key.write_bytes(first_key.read_bytes())
    live_key.chmod(0o600)
    upstream, url = await start_upstream(upstreams)
    proxyd = await launch(
        write_config(
            tmp_path / "proxyd.toml", tls_doc(issuer, tmp_path, {"a": [url]}, live_cert, live_key)
        )
    )
    token = issuer.token(time.time())
    first = await served_certificate(proxyd.port, ca)
    assert first.subject.rfc4514_string() == "CN=first"
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as http:
        stream = await open_stream(http, https(proxyd), token, upstream)
        await stream.relay("before")

        # A broken pair (the key of another certificate) changes nothing.
        _, other_key = ca.issue("other")
        live_key.write_bytes(other_key.read_bytes())
        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        failed = await proxyd.wait_for("config_reload_failed", mark)
        assert "does not match" in " ".join(failed["problems"])
        assert (await served_certificate(proxyd.port, ca)).subject == first.subject
        await stream.relay("after a failed reload")

        # The renewed pair: the next connection gets it, the stream opened before goes on.
        second_cert, second_key = ca.issue("second")
        live_cert.write_bytes(second_cert.read_bytes())
        live_key.write_bytes(second_key.read_bytes())
        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        await proxyd.wait_for("config_reloaded", mark)
        second = await served_certificate(proxyd.port, ca)
        assert second.subject.rfc4514_string() == "CN=second"
        await stream.relay("after the rotation")
        assert (await post(http, https(proxyd), token))[0] == 200
        await stream.finish()
    async with aiohttp.ClientSession() as plain, plain.get(proxyd.admin_url("/metrics")) as resp:
        text = await resp.text()
    expected = second.not_valid_after_utc.timestamp()
    line = next(
        ln for ln in text.splitlines() if ln.startswith("proxyd_tls_certificate_expiry_seconds{")
    )
    assert 'listener="mcp"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# check-config


async def test_check_config_reports_expiry_a_wrong_key_and_a_readable_key(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    path = tmp_path / "proxyd.toml"

    async def check(cert: Path, key: Path) -> tuple[int, str, str]:
        write_config(path, tls_doc(issuer, tmp_path, {"a": ["http://127.0.0.1:1"]}, cert, key))
        return await check_config(path)

    good = self_signed(tmp_path, "good", now + datetime.timedelta(days=60))
    code, _, err = await check(*good)
    assert code == 0, err
    assert "warning" not in err

    expired = self_signed(tmp_path, "expired", now - datetime.timedelta(days=1))
    code, _, err = await check(*expired)
    assert code == 2
    assert "server.tls: cert_file" in err
    assert "expired" in err

    soon = self_signed(tmp_path, "soon", now + datetime.timedelta(days=3))
    code, _, err = await check(*soon)
    assert code == 0
    assert "warning: server.tls: cert_file" in err
    assert "expires on" in err

    code, _, err = await check(good[0], soon[1])
    assert code == 2
    assert "the key does not match the certificate" in err

    readable = self_signed(tmp_path, "readable", now + datetime.timedelta(days=60), mode=0o640)
    code, _, err = await check(*readable)
    assert code == 0
    assert "warning: server.tls: key_file" in err
    assert "readable by its group or others" in err

    # The chain in the wrong order: the CA before the leaf.
    ca = TestCA(tmp_path / "ca")
    leaf, leaf_key = ca.issue("leaf")
    reversed_chain = tmp_path / "reversed.pem"
    reversed_chain.write_bytes(ca.ca_file.read_bytes() + leaf.read_bytes())
    code, _, err = await check(reversed_chain, leaf_key)
    assert code == 2


@pytest.mark.parametrize("workers", [1, 2])
async def test_run_logs_the_warnings_once_at_start_and_on_a_reload(
    workers: int,
    issuer: TestIssuer,
    upstreams: Upstreams,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """check-config prints them; `run` logs each as one config_warning line (not on stderr),
    once for the service: a supervisor's workers leave it to the supervisor."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    now = datetime.datetime.now(datetime.UTC)
    cert, key = self_signed(tmp_path, "readable", now + datetime.timedelta(days=60), mode=0o640)
    _, url = await start_upstream(upstreams)
    doc = tls_doc(issuer, tmp_path, {"a": [url]}, cert, key)
    doc["server"]["workers"] = workers
    path = write_config(tmp_path / "proxyd.toml", doc)
    ready = "supervisor_started" if workers > 1 else "proxyd_started"
    async with launching(ready=ready) as launch:
        proxyd = await launch(path)
        [warning] = proxyd.find("config_warning")
        assert warning["level"] == "warning"
        assert warning["key"] == "server.tls"
        assert warning["message"].startswith("key_file")
        assert "readable by its group or others" in warning["message"]
        assert "warning:" not in proxyd.stderr.decode()

        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        if workers > 1:
            for index in range(workers):
                await proxyd.wait_for("config_reloaded", mark, worker=index)
            await proxyd.wait_for("reload_forwarded", mark)
        else:
            await proxyd.wait_for("config_reloaded", mark)
        [again] = proxyd.find("config_warning", mark)
        assert (again["key"], again["message"]) == (warning["key"], warning["message"])
        assert len(proxyd.find("config_warning")) == 2


# --------------------------------------------------------------------------------------------
# systemd socket activation


ACTIVATE = """
import os, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen(128)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.environ.pop("LISTEN_FDNAMES", None)
os.execv(sys.executable, [sys.executable, "-m", "proxyd", "run", "-c", sys.argv[2]])
"""


@pytest.mark.parametrize("workers", [1, 2])
async def test_an_inherited_socket_is_served_and_takes_precedence_over_listen(
    workers: int, issuer: TestIssuer, upstreams: Upstreams, tmp_path: Path
) -> None:
    """Like systemd: the socket is bound by the parent, passed as fd 3 with LISTEN_FDS=1 and
    LISTEN_PID, then the parent becomes proxyd (exec keeps the pid)."""
    _, url = await start_upstream(upstreams)
    inherited = free_port()
    doc = proxyd_config(issuer, tmp_path, {"a": [url]})
    doc["server"]["workers"] = workers
    path = write_config(tmp_path / "proxyd.toml", doc)
    listen, admin = ports_of(path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ACTIVATE,
        str(inherited),
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        | {"PYTHONUNBUFFERED": "1"},
    )
    proxyd = Daemon(proc, inherited, admin)
    try:
        await proxyd.wait_for("supervisor_started" if workers > 1 else "proxyd_started")
        token = issuer.token(time.time())
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                assert (await post(http, proxyd.url("a"), token))[0] == 200
        # `listen` was not bound.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", listen)) != 0
    finally:
        await proxyd.kill()
    proxyd.check_output()


async def test_workers_share_the_tls_listener_and_the_admin_listener_speaks_tls(
    issuer: TestIssuer, upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("proxyd")
    admin_cert, admin_key = ca.issue("admin")
    _, url = await start_upstream(upstreams)
    doc = tls_doc(issuer, tmp_path, {"a": [url]}, cert, key)
    doc["server"]["workers"] = 2
    doc["admin"]["tls"] = {"cert_file": str(admin_cert), "key_file": str(admin_key)}
    path = write_config(tmp_path / "proxyd.toml", doc)
    async with launching(ready="supervisor_started") as launch:
        proxyd = await launch(path)
        token = issuer.token(time.time())
        connector = aiohttp.TCPConnector(ssl=client_context(ca), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(6):
                assert (await post(http, https(proxyd), token))[0] == 200
            async with http.get(f"https://127.0.0.1:{proxyd.admin}/readyz") as resp:
                assert resp.status == 200
        assert (await served_certificate(proxyd.admin, ca)).subject.rfc4514_string() == "CN=admin"
        # Every worker re-reads the pair on the SIGHUP the supervisor forwards.
        new_cert, new_key = ca.issue("renewed")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        mark = proxyd.mark()
        proxyd.signal(signal.SIGHUP)
        for index in (0, 1):
            await proxyd.wait_for("config_reloaded", mark, worker=index)
        for _ in range(6):
            renewed = await served_certificate(proxyd.port, ca)
            assert renewed.subject.rfc4514_string() == "CN=renewed"


EXEC_WITH = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.environ.pop("LISTEN_FDNAMES", None)
os.execv(sys.executable, [sys.executable, "-m", "proxyd", "run", "-c", sys.argv[2]])
"""


async def test_requests_during_a_restart_wait_on_the_inherited_socket_and_are_all_answered(
    issuer: TestIssuer, upstreams: Upstreams, tmp_path: Path
) -> None:
    """Like systemd with proxyd.socket: this test holds the listening socket across a restart
    (SIGTERM, then a new proxyd on the same socket). Connections made while no proxyd runs
    wait in the accept backlog; no request is refused or reset, every one gets a 200."""
    _, url = await start_upstream(upstreams)
    path = write_config(tmp_path / "proxyd.toml", proxyd_config(issuer, tmp_path, {"a": [url]}))
    _, admin = ports_of(path)
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    held.listen(128)
    port = held.getsockname()[1]

    async def start() -> Daemon:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            EXEC_WITH,
            str(held.fileno()),
            str(path),
            pass_fds=(held.fileno(),),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            | {"PYTHONUNBUFFERED": "1"},
        )
        daemon = Daemon(proc, port, admin)
        await daemon.wait_for("proxyd_started")
        return daemon

    token = issuer.token(time.time())
    statuses: list[int] = []
    connected = 0
    progress = asyncio.Event()

    def tick() -> None:
        nonlocal progress
        progress.set()
        progress = asyncio.Event()

    tasks: list[asyncio.Task[None]] = []

    async def until(condition: Any) -> None:
        async def wait() -> None:
            while not condition():
                for task in tasks:  # a request that failed fails the test now
                    if task.done():
                        task.result()
                await progress.wait()

        await asyncio.wait_for(wait(), GUARD)

    async def on_connected(*_: Any) -> None:
        nonlocal connected
        connected += 1
        tick()

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connected)
    done = False

    async def one(http: aiohttp.ClientSession) -> None:
        status, body = await post(http, f"http://127.0.0.1:{port}/mcp/apps/a", token)
        assert status == 200, body
        statuses.append(status)
        tick()

    async def stream(http: aiohttp.ClientSession) -> None:
        while not done:
            await one(http)

    first = await start()
    second: Daemon | None = None
    # A new connection per request: each one goes through the listening socket.
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as http:
            # Three streams keep connecting across the SIGTERM: a connection the stopping
            # proxyd accepted just as it closed its listener is answered too.
            tasks.extend(asyncio.create_task(stream(http)) for _ in range(3))
            await until(lambda: len(statuses) >= 5)
            first.signal(signal.SIGTERM)
            assert await first.exit_code() == 0
            first.check_output()
            # No proxyd runs: these connect (the kernel completes the handshake) and wait.
            before = connected
            tasks.extend(asyncio.create_task(one(http)) for _ in range(5))
            await until(lambda: connected >= before + 5)
            answered = len(statuses)
            second = await start()
            await until(lambda: len(statuses) >= answered + 5 + 10)
            done = True
            await asyncio.wait_for(asyncio.gather(*tasks), GUARD)
        assert len(statuses) >= 5 + 5 + 10
        assert set(statuses) == {200}
        assert first.find("request")  # both served some of them
        assert second.find("request")
    finally:
        held.close()
        for task in tasks:
            task.cancel()
        await first.kill()
        if second is not None:
            await second.kill()
    assert second is not None
    second.check_output()
