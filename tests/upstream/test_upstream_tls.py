"""TLS to app servers, per app (issue 13 §2): ``[apps.tls]`` and ``[app_auth_configs.jwt.tls]``.

Real TLS servers on 127.0.0.1 with certificates of a private test CA; no mocks.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web

from proxyd.app import RUNTIME
from proxyd.config import ConfigError, parse_settings
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import RPC, Client, access_lines, bearer, config, rpc_error
from tests.kit.tlscerts import TestCA
from tests.kit.wait import until

ANSWER = {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}

Serve = Callable[..., Awaitable[str]]


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app over TLS on 127.0.0.1; returns its https base URL."""
    runners: list[web.AppRunner] = []

    async def start(context: ssl.SSLContext, app: web.Application | None = None) -> str:
        if app is None:
            app = web.Application()

            async def mcp(request: web.Request) -> web.Response:
                # Which client certificate (if any) the handshake presented.
                transport = request.transport
                peer = transport.get_extra_info("peercert") if transport is not None else None
                subject = dict(x[0] for x in peer["subject"]) if peer else {}
                return web.json_response(
                    ANSWER, headers={"X-Peer": subject.get("commonName", "none")}
                )

            async def health(request: web.Request) -> web.Response:
                return web.Response(text="ok")

            app.router.add_post("/mcp", mcp)
            app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"https://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def _with_tls(doc: dict[str, Any], tls: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for app in doc["apps"]:
        if app["name"] in tls:
            app["tls"] = tls[app["name"]]
    return doc


async def _tls_server(
    ca: TestCA,
    serve: Serve,
    name: str = "app-a",
    *,
    hosts: list[str] | None = None,
    client_ca: Path | None = None,
    app: web.Application | None = None,
) -> str:
    """A server with a certificate of ``ca`` for ``name``; returns its https base URL."""
    cert, key = ca.issue(name, hosts=hosts)
    return await serve(server_context(cert, key, client_ca=client_ca), app)


def _app_a(
    issuer: TestIssuer, url: str, tmp_path: Path, tls: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A config with app "a" on ``url``/mcp, ``tls`` (if any) as its ``[apps.tls]``."""
    doc = config(issuer, {"a": f"{url}/mcp"}, tmp_path)
    return doc if tls is None else _with_tls(doc, {"a": tls})


async def _call(client: Client, token: str, app: str = "a") -> ClientResponse:
    return await client.post(f"/mcp/apps/{app}", json=RPC, headers=bearer(token))


async def test_private_ca_and_client_certificate(
    ca: TestCA,
    serve: Serve,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    plain = await _tls_server(ca, serve)
    mtls = await _tls_server(ca, serve, "app-b", client_ca=ca.ca_file)
    client_cert, client_key = ca.issue("proxyd-client", hosts=[], client=True)
    doc = config(issuer, {"a": f"{plain}/mcp", "b": f"{mtls}/mcp"}, tmp_path)
    _with_tls(
        doc,
        {
            "a": {"ca_file": str(ca.ca_file)},
            "b": {
                "ca_file": str(ca.ca_file),
                "cert_file": str(client_cert),
                "key_file": str(client_key),
            },
        },
    )
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    for app, peer in (("a", "none"), ("b", "proxyd-client")):
        resp = await _call(client, token, app)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == ANSWER
        assert resp.headers["X-Peer"] == peer
    assert not logs.events("upstream_tls_failed")


async def test_wrong_ca_is_502_upstream_tls_with_one_log_line(
    ca: TestCA,
    serve: Serve,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    url = await _tls_server(ca, serve)
    other = TestCA(tmp_path / "other", name="another CA")
    client = await make_proxy(_app_a(issuer, url, tmp_path, {"ca_file": str(other.ca_file)}))
    body = await rpc_error(await _call(client, issuer.token(clock.wall())), 502)
    assert body["error"]["data"]["reason"] == "upstream_tls"
    [line] = logs.events("upstream_tls_failed")
    assert line["server"] == url.removeprefix("https://")
    assert "certificate verify failed" in line["reason"] or "unable to get" in line["reason"]
    [access] = access_lines(logs)
    assert access["reason"] == "upstream_tls"


async def test_system_trust_store_refuses_a_private_ca(
    ca: TestCA,
    serve: Serve,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    # No [apps.tls]: the system's CAs, never a silent fallback to no verification.
    url = await _tls_server(ca, serve)
    client = await make_proxy(_app_a(issuer, url, tmp_path))
    body = await rpc_error(await _call(client, issuer.token(clock.wall())), 502)
    assert body["error"]["data"]["reason"] == "upstream_tls"
    assert len(logs.events("upstream_tls_failed")) == 1


async def test_server_name_is_the_verified_name(
    ca: TestCA,
    serve: Serve,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    url = await _tls_server(ca, serve, hosts=["mcp.internal.test"])
    tls = {"ca_file": str(ca.ca_file), "server_name": "mcp.internal.test"}
    client = await make_proxy(_app_a(issuer, url, tmp_path, tls))
    resp = await _call(client, issuer.token(clock.wall()))
    assert resp.status == 200, await resp.text()


async def test_insecure_skip_verify_works_and_is_warned(
    ca: TestCA,
    serve: Serve,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    url = await _tls_server(ca, serve)
    client = await make_proxy(_app_a(issuer, url, tmp_path, {"insecure_skip_verify": True}))
    [warning] = logs.events("upstream_tls_insecure")
    assert warning["app"] == "a"
    resp = await _call(client, issuer.token(clock.wall()))
    assert resp.status == 200, await resp.text()
    text = client.app[RUNTIME].core.metrics.render().decode()
    assert 'proxyd_upstream_tls_insecure{app="a"} 1.0' in text


async def test_health_checks_over_tls(
    ca: TestCA,
    serve: Serve,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:
    good = await _tls_server(ca, serve)
    bad_ca = TestCA(tmp_path / "other", name="another CA")
    bad = await _tls_server(bad_ca, serve, "app-x")
    check = {
        "type": "http",
        "path": "/health",
        "interval": "50ms",
        "timeout": "50ms",
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    doc = config(issuer, {"a": [f"{good}/mcp", f"{bad}/mcp"]}, tmp_path)
    doc["apps"][0]["tls"] = {"ca_file": str(ca.ca_file)}
    doc["apps"][0]["health_check"] = check
    client = await make_proxy(doc)
    health = client.app[RUNTIME].core.health
    await until(lambda: not health.available("a", f"{bad}/mcp"))
    assert health.available("a", f"{good}/mcp")
    assert health.get("a", f"{good}/mcp").ok_streak >= 1  # type: ignore[union-attr]


async def test_jwks_over_tls_with_a_private_ca(
    ca: TestCA,
    serve: Serve,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    idp = await _tls_server(ca, serve, "idp", app=issuer.app())
    app_url = await _tls_server(ca, serve)
    doc = _app_a(issuer, app_url, tmp_path, {"ca_file": str(ca.ca_file)})
    jwt = doc["app_auth_configs"][0]["jwt"]
    jwt["jwks_url"] = f"{idp}/jwks.json"
    jwt["tls"] = {"ca_file": str(ca.ca_file)}
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    resp = await _call(client, token)
    assert resp.status == 200, await resp.text()
    assert issuer.fetches == 1

    # Without the CA: the system's store refuses the IdP, the token cannot be verified.
    del jwt["tls"]
    other = await make_proxy(doc)
    resp = await _call(other, token)
    assert resp.status in (401, 503), await resp.text()
    failed = [e for e in logs.events("jwks_fetch_failed") if "upstream_tls" in e["error"]]
    assert failed


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    return exc.value.problems


def test_config_errors_name_their_key(ca: TestCA, issuer: TestIssuer, tmp_path: Path) -> None:
    cert, key = ca.issue("proxyd-client", hosts=[], client=True)
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    url = "https://127.0.0.1:1/mcp"

    def app_tls(tls: dict[str, Any]) -> list[str]:
        return problems(_with_tls(config(issuer, {"a": url}, tmp_path), {"a": tls}))

    [p] = app_tls({"ca_file": str(tmp_path / "missing.pem")})
    assert p.startswith("apps[0].tls.ca_file: no such file")
    [p] = app_tls({"key_file": str(key)})
    assert p == "apps[0].tls.key_file: requires cert_file"
    [p] = app_tls({"ca_file": str(junk)})
    assert p.startswith("apps[0].tls.ca_file: ")
    [p] = app_tls({"ca_file": str(bad)})
    assert p.startswith("apps[0].tls.ca_file: ")
    [p] = app_tls({"cert_file": str(junk), "key_file": str(key)})
    assert p.startswith("apps[0].tls.cert_file: ")
    [p] = app_tls({"cert_file": str(cert), "key_file": str(junk)})
    assert p.startswith("apps[0].tls.key_file: ")
    [p] = app_tls({"cert_file": str(cert)})  # no key in it
    assert p.startswith("apps[0].tls.cert_file: ")
    [p] = app_tls({"insecure_skip_verify": "yes"})
    assert p.startswith("apps[0].tls.insecure_skip_verify: ")
    [p] = app_tls({"ca": "x"})
    assert p == "apps[0].tls.ca: unknown key"

    doc = config(issuer, {"a": url}, tmp_path)
    doc["app_auth_configs"][0]["jwt"]["tls"] = {"ca_file": str(tmp_path / "missing.pem")}
    [p] = problems(doc)
    assert p.startswith("app_auth_configs[0].jwt.tls.ca_file: no such file")

    # One server in two apps: one TLS setting (connections to it are pooled).
    doc = config(issuer, {"a": url, "b": url}, tmp_path)
    doc["apps"][1]["tls"] = {"ca_file": str(ca.ca_file)}
    [p] = problems(doc)
    assert p.startswith("apps[1].tls: server https://127.0.0.1:1/mcp is also in app 'a'")
    # The same origin under other URLs (another path, the default port written out, the host in
    # capitals) is the same pool and the same TLS profile: one setting too, never the last
    # app's profile silently used for both.
    base = "https://mcp.internal.test"
    for first, second in [
        (f"{base}/a", f"{base}/b"),
        (f"{base}/mcp", f"{base}:443/mcp"),
        (f"{base}/mcp", "https://MCP.Internal.TEST/mcp"),
    ]:
        doc = config(issuer, {"a": first, "b": second}, tmp_path)
        doc["apps"][0]["tls"] = {"insecure_skip_verify": True}
        doc["apps"][1]["tls"] = {"ca_file": str(ca.ca_file)}
        [p] = problems(doc)
        assert p.startswith(f"apps[1].tls: server {second} is also in app 'a'"), p
    # Other ports or plain http are other origins: no conflict.
    doc = config(issuer, {"a": f"{base}/mcp", "b": f"{base}:8443/mcp"}, tmp_path)
    doc["apps"][1]["tls"] = {"ca_file": str(ca.ca_file)}
    assert parse_settings(doc).apps[1].tls.ca_file == str(ca.ca_file)

    good = parse_settings(_with_tls(config(issuer, {"a": url}, tmp_path), {"a": {}}))
    assert good.apps[0].tls.ca_file == ""
