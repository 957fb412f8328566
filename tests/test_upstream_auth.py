"""[apps.upstream_auth] (issue 13 §3): a secret proxyd sends to an app's servers.

Real behaviour only: proxyd in front of a recording upstream that keeps every request byte, the
secret in a real file (``secret_file``) or a real ``$CREDENTIALS_DIRECTORY``, reloads through the
runtime as SIGHUP does, and ``proxyd check-config`` as a real process. A guard proves that no
secret of a test reached a log line or /metrics.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxyd.app import RUNTIME
from proxyd.process.notify import Notifier
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.daemon import spawn_proxyd
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import RPC, config
from tests.kit.recording import RawRequest, RecordingUpstream, json_answer, recording_upstream
from tests.kit.tomltext import to_toml

OK = json_answer(b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}')
ACCEPT = "application/json, text/event-stream"

# Every secret a test writes; the guard below looks for each in the logs and the metrics.
SECRETS: set[str] = set()


@pytest.fixture(autouse=True)
def secret_guard(logs: LogCapture) -> Iterator[None]:
    SECRETS.clear()
    yield
    text = logs.text()
    for secret in SECRETS:
        assert secret not in text, "a secret reached the logs"


def secret(name: str) -> str:
    value = f"sk-{name}-7f3a9c1e5b"
    SECRETS.add(value)
    return value


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")  # as `echo` and most editors write it: one newline stripped
    return path


def set_credential(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str) -> None:
    """A real ``$CREDENTIALS_DIRECTORY`` (as systemd's LoadCredential= makes) holding ``name``."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write_secret(credentials / name, value)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))


def with_auth(doc: dict[str, Any], auth: dict[str, Any], app: int = 0) -> dict[str, Any]:
    doc["apps"][app]["upstream_auth"] = auth
    return doc


async def post(
    client: TestClient[web.Request, web.Application],
    token: str,
    extra: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT, **(extra or {})}
    resp = await client.post("/mcp/apps/a", json=RPC, headers=headers)
    await resp.read()
    return resp


async def reload(
    client: TestClient[web.Request, web.Application], path: Path, doc: dict[str, Any]
) -> bool:
    write_config(path, doc)
    return await client.app[RUNTIME].reload(str(path), Notifier(None))


def write_config(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(to_toml(doc))


def last(up: RecordingUpstream) -> RawRequest:
    assert up.requests, "nothing reached the upstream"
    return up.requests[-1]


def assert_not_exposed(client: TestClient[web.Request, web.Application]) -> None:
    metrics = client.app[RUNTIME].core.metrics.render().decode()
    for value in SECRETS:
        assert value not in metrics, "a secret reached /metrics"
    # Nor a repr of the configuration in force (an App lands in tracebacks and debuggers).
    runtime = client.app[RUNTIME]
    shown = repr(runtime.settings) + repr(runtime.handler.registry.get("a"))
    for value in SECRETS:
        assert value not in shown


# --------------------------------------------------------------------------------------------
# The upstream sees exactly the secret


async def test_bearer_from_a_secret_file_replaces_the_clients_authorization(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    value = secret("file")
    path = write_secret(tmp_path / "token", value)
    async with recording_upstream(OK) as up:
        doc = with_auth(config(issuer, {"a": up.url}, tmp_path), {"secret_file": str(path)})
        client = await make_proxy(doc)
        token = issuer.token(clock.wall())
        resp = await post(client, token)
        assert resp.status == 200, await resp.text()
        request = last(up)
        assert request.header("Authorization") == [f"Bearer {value}"]
        assert token.encode() not in request.head  # the client's own credential, never
        assert request.header("X-Proxyd-Identity")  # the identity assertion is still added
        assert_not_exposed(client)


async def test_header_type_from_credentials_directory(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value = secret("credential")
    set_credential(monkeypatch, tmp_path, "api-key", value)
    auth = {"type": "header", "header": "X-Api-Key", "credential": "api-key"}
    async with recording_upstream(OK) as up:
        client = await make_proxy(with_auth(config(issuer, {"a": up.url}, tmp_path), auth))
        token = issuer.token(clock.wall())
        # A client's own line of that name never reaches the upstream either.
        resp = await post(client, token, {"X-Api-Key": "forged-by-the-client"})
        assert resp.status == 200, await resp.text()
        request = last(up)
        assert request.header("X-Api-Key") == [value]
        assert request.header("Authorization") == []
        assert token.encode() not in request.head
        assert b"forged-by-the-client" not in request.head
        assert_not_exposed(client)


async def test_only_the_configured_app_gets_the_secret(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    value = secret("only-a")
    path = write_secret(tmp_path / "token", value)
    async with recording_upstream(OK) as up_a, recording_upstream(OK) as up_b:
        doc = config(issuer, {"a": up_a.url, "b": up_b.url}, tmp_path)
        client = await make_proxy(with_auth(doc, {"secret_file": str(path)}))
        token = issuer.token(clock.wall())
        assert (await post(client, token)).status == 200
        headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
        resp = await client.post("/mcp/apps/b", json=RPC, headers=headers)
        assert resp.status == 200
        assert last(up_a).header("Authorization") == [f"Bearer {value}"]
        assert last(up_b).header("Authorization") == []
        assert value.encode() not in last(up_b).head


async def test_an_error_body_never_holds_the_secret(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    value = secret("error-body")
    path = write_secret(tmp_path / "token", value)
    doc = config(issuer, {"a": "http://127.0.0.1:9/mcp"}, tmp_path)  # nothing listens there
    client = await make_proxy(with_auth(doc, {"secret_file": str(path)}))
    resp = await post(client, issuer.token(clock.wall()))
    assert resp.status == 502
    assert value not in await resp.text() + repr(dict(resp.headers))
    assert_not_exposed(client)


# --------------------------------------------------------------------------------------------
# Rotation: read again on every reload (SIGHUP)


async def test_a_rotated_secret_is_used_after_a_reload(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    old, new = secret("old"), secret("new")
    path = write_secret(tmp_path / "token", old)
    conf = tmp_path / "proxyd.toml"
    async with recording_upstream(OK) as up:
        doc = with_auth(config(issuer, {"a": up.url}, tmp_path), {"secret_file": str(path)})
        client = await make_proxy(doc)
        token = issuer.token(clock.wall())
        assert (await post(client, token)).status == 200
        assert last(up).header("Authorization") == [f"Bearer {old}"]
        write_secret(path, new)
        # No file read per request: the running configuration keeps what it read.
        assert (await post(client, token)).status == 200
        assert last(up).header("Authorization") == [f"Bearer {old}"]
        assert await reload(client, conf, doc) is True
        assert (await post(client, token)).status == 200
        assert last(up).header("Authorization") == [f"Bearer {new}"]
        assert_not_exposed(client)


@pytest.mark.parametrize("breakage", ["missing", "empty"])
async def test_a_broken_secret_on_reload_keeps_the_old_one(
    breakage: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    old = secret("kept")
    path = write_secret(tmp_path / "token", old)
    conf = tmp_path / "proxyd.toml"
    async with recording_upstream(OK) as up:
        doc = with_auth(config(issuer, {"a": up.url}, tmp_path), {"secret_file": str(path)})
        client = await make_proxy(doc)
        token = issuer.token(clock.wall())
        if breakage == "missing":
            path.unlink()
        else:
            path.write_text("\n")  # one newline stripped: nothing left
        assert await reload(client, conf, doc) is False
        failed = logs.events("config_reload_failed")
        assert len(failed) == 1
        [problem] = failed[0]["problems"]
        assert problem.startswith("apps[0].upstream_auth.secret_file: app 'a': ")
        assert ("empty" if breakage == "empty" else "cannot read") in problem
        assert (await post(client, token)).status == 200
        assert last(up).header("Authorization") == [f"Bearer {old}"]
        assert_not_exposed(client)


async def test_credentials_directory_gone_on_reload_keeps_the_old_secret(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = secret("cred-kept")
    set_credential(monkeypatch, tmp_path, "token", old)
    conf = tmp_path / "proxyd.toml"
    async with recording_upstream(OK) as up:
        doc = with_auth(config(issuer, {"a": up.url}, tmp_path), {"credential": "token"})
        client = await make_proxy(doc)
        monkeypatch.delenv("CREDENTIALS_DIRECTORY")
        assert await reload(client, conf, doc) is False
        [failed] = logs.events("config_reload_failed")
        assert failed["problems"][0].startswith("apps[0].upstream_auth.credential: app 'a': ")
        assert "CREDENTIALS_DIRECTORY is not set" in failed["problems"][0]
        assert (await post(client, issuer.token(clock.wall()))).status == 200
        assert last(up).header("Authorization") == [f"Bearer {old}"]


# --------------------------------------------------------------------------------------------
# check-config: the problem is named by its key, the content never shown


async def check_config(path: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    if env is None:
        proc = await spawn_proxyd("check-config", "-c", str(path))
    else:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxyd",
            "check-config",
            "-c",
            str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_config_names_bad_secrets_by_key_never_by_content(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    valid = secret("valid")
    two_lines = secret("two-lines")
    good = write_secret(tmp_path / "good", valid)
    broken = tmp_path / "broken"
    broken.write_text(f"{two_lines}\nsecond line\n")  # not one header value
    empty = tmp_path / "empty"
    empty.write_text("")
    doc = config(
        issuer,
        {"a": "http://127.0.0.1:9/mcp", "b": "http://127.0.0.1:9/mcp", "c": "http://x:9/mcp"},
        tmp_path,
    )
    with_auth(doc, {"secret_file": str(broken)}, 0)
    with_auth(doc, {"secret_file": str(empty)}, 1)
    with_auth(doc, {"secret_file": str(tmp_path / "absent")}, 2)
    doc["apps"].append(
        {"name": "d", "servers": ["http://127.0.0.1:9/mcp"], "upstream_auth": {"credential": "x"}}
    )
    path = tmp_path / "proxyd.toml"
    write_config(path, doc)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    code, out, err = await check_config(path, env)
    assert code == 2
    lines = err.splitlines()[1:]
    assert lines == [
        f"  apps[0].upstream_auth.secret_file: app 'a': {broken} is not a valid header value "
        "(printable ASCII, one line)",
        f"  apps[1].upstream_auth.secret_file: app 'b': {empty} is empty",
        f"  apps[2].upstream_auth.secret_file: app 'c': cannot read {tmp_path / 'absent'}: "
        "No such file or directory",
        "  apps[3].upstream_auth.credential: app 'd': CREDENTIALS_DIRECTORY is not set "
        "(LoadCredential= in the systemd unit provides it; or use secret_file)",
    ]
    assert two_lines not in err + out and "second line" not in err + out

    # A good secret: ok, and nothing of it printed.
    doc["apps"] = doc["apps"][:1]
    with_auth(doc, {"type": "header", "header": "X-Api-Key", "secret_file": str(good)})
    write_config(path, doc)
    code, out, err = await check_config(path)
    assert (code, err) == (0, ""), err
    assert out.startswith(f"{path}: ok (1 apps")
    assert valid not in out + err
