"""CORS through a real proxyd (proxyd/cors.py): preflights, the headers on every kind of answer,
the upstream's own Access-Control-* dropped, the public well-known documents; and the same in
real headless Chromium (tests/kit/browser.py), where the browser enforces the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import FakeClock, ProxyFactory
from tests.kit.browser import Browser, PageServer, browser
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import upstream_server
from tests.kit.proxy import PUBLIC_URL, RPC, Client, bearer, config, rpc_error

APP_ORIGIN = "https://app.example.com"
EXPOSE = "Mcp-Session-Id, WWW-Authenticate, MCP-Protocol-Version, Retry-After"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, "
    "Mcp-Method, Mcp-Name"
)


def cors_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


def assert_cors(headers: Any, origin: str) -> None:
    assert headers.getall("Access-Control-Allow-Origin") == [origin]
    assert "Origin" in [v.strip() for v in headers.get("Vary", "").split(",")]
    assert headers["Access-Control-Expose-Headers"] == EXPOSE
    assert "Access-Control-Allow-Credentials" not in headers


async def proxy(
    make_proxy: ProxyFactory,
    issuer: TestIssuer,
    upstream: str,
    tmp_path: Path,
    origins: list[str] | None = None,
    **sections: Any,
) -> Client:
    server = {"allowed_origins": [APP_ORIGIN] if origins is None else origins}
    return await make_proxy(config(issuer, {"a": upstream}, tmp_path, server=server, **sections))


def preflight(origin: str, method: str = "POST", headers: str | None = None) -> dict[str, str]:
    out = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        out["Access-Control-Request-Headers"] = headers
    return out


# --------------------------------------------------------------------------------------------
# Preflight


@pytest.mark.parametrize("origin", [APP_ORIGIN, PUBLIC_URL, "HTTPS://APP.EXAMPLE.COM"])
@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
async def test_preflight_from_an_allowed_origin(
    origin: str,
    method: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
) -> None:
    echo = Echo()
    client = await proxy(make_proxy, issuer, await upstreams.start(echo.app()), tmp_path)
    asked = "authorization,content-type,mcp-protocol-version,mcp-session-id,last-event-id"
    resp = await client.options("/mcp/apps/a", headers=preflight(origin, method, asked))
    assert resp.status == 204, await resp.text()
    assert cors_headers(resp.headers) == {
        "access-control-allow-origin": origin,
        "access-control-allow-methods": "POST, GET, DELETE",
        "access-control-allow-headers": ALLOW_HEADERS,
        "access-control-max-age": "600",
    }
    assert resp.headers["Vary"] == "Origin"
    assert echo.seen == []  # a preflight never reaches the upstream
    # Every header of the set, any case, with or without spaces; and none at all.
    every = " , ".join(h.upper() for h in ALLOW_HEADERS.split(", "))
    for names in (every, None, ""):
        resp = await client.options("/mcp/apps/a", headers=preflight(origin, method, names))
        assert resp.status == 204


@pytest.mark.parametrize(
    ("origin", "method", "asked", "reason"),
    [
        ("https://evil.example", "POST", "authorization", "origin_not_allowed"),
        ("null", "POST", None, "origin_not_allowed"),
        ("http://app.example.com", "POST", None, "origin_not_allowed"),
        (APP_ORIGIN, "PUT", None, "cors_method_not_allowed"),
        (APP_ORIGIN, "post", None, "cors_method_not_allowed"),
        (APP_ORIGIN, "POST", "authorization,x-custom", "cors_headers_not_allowed"),
        (APP_ORIGIN, "POST", "cookie", "cors_headers_not_allowed"),
    ],
)
async def test_preflight_refused_is_403_without_cors_headers(
    origin: str,
    method: str,
    asked: str | None,
    reason: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
) -> None:
    echo = Echo()
    client = await proxy(make_proxy, issuer, await upstreams.start(echo.app()), tmp_path)
    resp = await client.options("/mcp/apps/a", headers=preflight(origin, method, asked))
    body = await rpc_error(resp, 403)
    assert body["error"]["data"]["reason"] == reason
    assert cors_headers(resp.headers) == {}
    assert echo.seen == []


async def test_options_that_is_no_preflight_stays_405(
    issuer: TestIssuer, make_proxy: ProxyFactory, upstreams: Upstreams, tmp_path: Path
) -> None:
    client = await proxy(make_proxy, issuer, await upstreams.start(Echo().app()), tmp_path)
    for headers in ({}, {"Origin": APP_ORIGIN}, {"Access-Control-Request-Method": "POST"}):
        resp = await client.options("/mcp/apps/a", headers=headers)
        await rpc_error(resp, 405)
        assert resp.headers["Allow"] == "POST, GET, DELETE"


# --------------------------------------------------------------------------------------------
# Every answer to an allowed origin


class CorsUpstream(Echo):
    """An upstream with a CORS policy of its own (looser than proxyd's)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = await super().handle(request)
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["access-control-expose-headers"] = "X-Secret"
        return response


async def sse_upstream(request: web.Request) -> web.StreamResponse:
    await request.read()
    out = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Access-Control-Allow-Origin": "*",
            "Mcp-Session-Id": "s-1",
        }
    )
    await out.prepare(request)
    await out.write(b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n')
    await out.write_eof()
    return out


async def test_forwarded_answers_carry_proxyd_policy_only(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client = await proxy(make_proxy, issuer, await upstreams.start(CorsUpstream().app()), tmp_path)
    token = issuer.token(clock.wall())
    resp = await client.post(
        "/mcp/apps/a", json=RPC, headers={**bearer(token), "Origin": APP_ORIGIN}
    )
    assert resp.status == 200, await resp.text()
    assert_cors(resp.headers, APP_ORIGIN)
    assert resp.headers["Mcp-Session-Id"]
    # Without Origin (no browser): none of the upstream's Access-Control-* either.
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    assert resp.status == 200
    assert cors_headers(resp.headers) == {}
    assert "Vary" not in resp.headers


async def test_streamed_answer_carries_the_headers(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    # An SSE answer's head is sent before the handler returns: the headers must be there.
    app = web.Application()
    app.router.add_post("/mcp", sse_upstream)
    client = await proxy(make_proxy, issuer, await upstreams.start(app), tmp_path)
    headers = {**bearer(issuer.token(clock.wall())), "Origin": APP_ORIGIN}
    resp = await client.post("/mcp/apps/a", json=RPC, headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert_cors(resp.headers, APP_ORIGIN)
    assert b'"result"' in await resp.read()


@pytest.mark.parametrize("kind", [401, 404, 405, 415, 429, 502, 431])
async def test_proxyd_own_answers_carry_the_headers(
    kind: int,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    refused_url: str,
) -> None:
    upstream = refused_url if kind == 502 else await upstreams.start(Echo().app())
    limits = {"unauthenticated": {"average": 1, "period": "1h", "burst": 1}}
    client = await proxy(make_proxy, issuer, upstream, tmp_path, limits=limits)
    origin = {"Origin": APP_ORIGIN}
    token = bearer(issuer.token(clock.wall()))
    if kind == 401:
        resp = await client.post("/mcp/apps/a", json=RPC, headers=origin)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
    elif kind == 404:
        resp = await client.post("/mcp/apps/nope", json=RPC, headers={**origin, **token})
    elif kind == 405:
        resp = await client.put("/mcp/apps/a", json=RPC, headers={**origin, **token})
    elif kind == 415:
        resp = await client.post(
            "/mcp/apps/a", data=b"{}", headers={**origin, **token, "Content-Type": "text/plain"}
        )
    elif kind == 429:
        await client.post("/mcp/apps/a", json=RPC, headers=origin)  # spends the one token
        resp = await client.post("/mcp/apps/a", json=RPC, headers=origin)
        assert int(resp.headers["Retry-After"]) > 0
    elif kind == 431:
        big = {**origin, **token, "X-Big": "x" * 40_000}
        resp = await client.post("/mcp/apps/a", json=RPC, headers=big)
    else:
        resp = await client.post("/mcp/apps/a", json=RPC, headers={**origin, **token})
    await rpc_error(resp, kind)
    assert_cors(resp.headers, APP_ORIGIN)


async def test_forbidden_answers_carry_the_headers(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    # 403 for an allowed origin: the app is granted by no role of this user.
    roles = [{"name": "other", "users": ["nobody@example.com"], "app_labels": {"app": "b"}}]
    doc = config(
        issuer,
        {"a": await upstreams.start(Echo().app()), "b": await upstreams.start(Echo().app())},
        tmp_path,
        server={"allowed_origins": [APP_ORIGIN]},
        roles=roles,
    )
    client = await make_proxy(doc)
    headers = {**bearer(issuer.token(clock.wall())), "Origin": APP_ORIGIN}
    resp = await client.post("/mcp/apps/a", json=RPC, headers=headers)
    await rpc_error(resp, 403)
    assert_cors(resp.headers, APP_ORIGIN)
    # A disallowed origin's 403 has none (the page may not read it).
    resp = await client.post("/mcp/apps/a", json=RPC, headers={"Origin": "https://evil.example"})
    await rpc_error(resp, 403)
    assert cors_headers(resp.headers) == {}


async def test_allowed_origins_follow_a_reload(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    from proxyd.app import RUNTIME
    from proxyd.config import parse_settings

    url = await upstreams.start(Echo().app())
    client = await proxy(make_proxy, issuer, url, tmp_path)
    later = "https://later.example"
    resp = await client.options("/mcp/apps/a", headers=preflight(later))
    assert resp.status == 403
    runtime = client.app[RUNTIME]
    new = config(issuer, {"a": url}, tmp_path, server={"allowed_origins": [later]})
    runtime.install(parse_settings(new))
    resp = await client.options("/mcp/apps/a", headers=preflight(later))
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == later
    resp = await client.options("/mcp/apps/a", headers=preflight(APP_ORIGIN))
    assert resp.status == 403


# --------------------------------------------------------------------------------------------
# Public documents


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/jwks.json",
        "/.well-known/oauth-protected-resource/mcp/apps/a",
        "/.well-known/oauth-protected-resource/mcp/apps/nope",  # its 404 too
    ],
)
async def test_well_known_answers_any_origin(
    path: str, issuer: TestIssuer, make_proxy: ProxyFactory, upstreams: Upstreams, tmp_path: Path
) -> None:
    client = await proxy(make_proxy, issuer, await upstreams.start(Echo().app()), tmp_path)
    for origin in ("https://evil.example", APP_ORIGIN, "null"):
        resp = await client.get(path, headers={"Origin": origin})
        assert resp.status == (404 if path.endswith("nope") else 200)
        assert cors_headers(resp.headers) == {"access-control-allow-origin": "*"}
        resp = await client.options(path, headers=preflight(origin, "GET", "mcp-protocol-version"))
        assert resp.status == 204
        assert cors_headers(resp.headers) == {
            "access-control-allow-origin": "*",
            "access-control-allow-methods": "GET",
            "access-control-allow-headers": "*",
            "access-control-max-age": "600",
        }
    resp = await client.options(path)
    assert resp.status == 204
    assert resp.headers["Allow"] == "GET, OPTIONS"
    # Without an Origin too: a shared cache may hand this answer to a browser later.
    resp = await client.get(path)
    assert cors_headers(resp.headers) == {"access-control-allow-origin": "*"}


# --------------------------------------------------------------------------------------------
# Real headless Chromium: the browser enforces what the headers say

# Runs in the page: initialize, read Mcp-Session-Id, notify, call a tool, then a 401's
# WWW-Authenticate. Every step's outcome (or the error fetch rejected with) is returned.
MCP_FLOW = """
const [url, token, done] = arguments;
const version = "2025-06-18";
const base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"};
async function rpc(headers, body) {
  const resp = await fetch(url, {method: "POST", headers, body: JSON.stringify(body)});
  const text = await resp.text();
  const data = text.split("\\n").filter(l => l.startsWith("data:")).map(l => l.slice(5));
  const last = data.length ? data[data.length - 1] : text;
  return {resp, body: last ? JSON.parse(last) : null};
}
(async () => {
  const out = {};
  try {
    const auth = {...base, "Authorization": "Bearer " + token};
    const init = await rpc(auth, {jsonrpc: "2.0", id: 1, method: "initialize", params: {
      protocolVersion: version, capabilities: {}, clientInfo: {name: "chromium", version: "1"}}});
    out.init_status = init.resp.status;
    out.session = init.resp.headers.get("Mcp-Session-Id");
    out.server = init.body.result.serverInfo.name;
    const session = {...auth, "Mcp-Session-Id": out.session, "MCP-Protocol-Version": version};
    const note = await fetch(url, {method: "POST", headers: session,
      body: JSON.stringify({jsonrpc: "2.0", method: "notifications/initialized"})});
    out.note_status = note.status;
    const call = await rpc(session, {jsonrpc: "2.0", id: 2, method: "tools/call",
      params: {name: "add", arguments: {a: 2, b: 40}}});
    out.call_status = call.resp.status;
    out.call_text = call.body.result.content[0].text;
    const anon = await fetch(url, {method: "POST", headers: base,
      body: JSON.stringify({jsonrpc: "2.0", id: 3, method: "tools/list"})});
    out.anon_status = anon.status;
    out.www_authenticate = anon.headers.get("WWW-Authenticate");
  } catch (e) {
    out.error = String(e);
  }
  done(out);
})();
"""

BLOCKED_FETCH = """
const [url, token, done] = arguments;
fetch(url, {method: "POST", headers: {"Content-Type": "application/json",
  "Authorization": "Bearer " + token},
  body: JSON.stringify({jsonrpc: "2.0", id: 1, method: "tools/list"})})
  .then(r => done({status: r.status}), e => done({error: String(e)}));
"""


async def test_chromium_runs_an_mcp_session_through_proxyd(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    async with (
        browser() as chrome,
        PageServer() as allowed_page,
        PageServer() as other_page,
        upstream_server() as up,
    ):
        doc = config(issuer, {"a": up.url}, tmp_path)
        doc["server"]["allowed_origins"] = [allowed_page.origin]
        client = await make_proxy(doc)
        url = str(client.make_url("/mcp/apps/a"))
        token = issuer.token(clock.wall())

        out = await run_in_page(chrome, allowed_page.url, MCP_FLOW, url, token)
        assert "error" not in out, out
        assert out["init_status"] == 200
        assert out["session"]  # readable: exposed by proxyd
        assert out["server"] == "up"
        assert out["note_status"] == 202
        assert out["call_status"] == 200
        assert out["call_text"] == "42"
        assert out["anon_status"] == 401
        assert out["www_authenticate"].startswith("Bearer ")
        assert "resource_metadata=" in out["www_authenticate"]
        assert [c.name for c in up.calls] == ["add"]

        # The same page on an origin proxyd does not allow: the preflight is refused and
        # fetch rejects, nothing reaches the upstream.
        out = await run_in_page(chrome, other_page.url, BLOCKED_FETCH, url, token)
        assert "error" in out and "Failed to fetch" in out["error"], out
        assert [c.name for c in up.calls] == ["add"]


async def run_in_page(chrome: Browser, page: str, script: str, *args: str) -> dict[str, Any]:
    result = await chrome.run_async_script(page, script, *args)
    assert isinstance(result, dict), result
    return {str(k): v for k, v in result.items()}


async def test_chromium_reads_well_known_from_any_origin(
    issuer: TestIssuer, make_proxy: ProxyFactory, upstreams: Upstreams, tmp_path: Path
) -> None:
    script = """
const [url, done] = arguments;
fetch(url, {headers: {"MCP-Protocol-Version": "2025-06-18"}})
  .then(r => r.json()).then(j => done({resource: j.resource}), e => done({error: String(e)}));
"""
    async with browser() as chrome, PageServer() as page:
        client = await proxy(make_proxy, issuer, await upstreams.start(Echo().app()), tmp_path)
        url = str(client.make_url("/.well-known/oauth-protected-resource/mcp/apps/a"))
        out = await run_in_page(chrome, page.url, script, url)
        assert out == {"resource": f"{PUBLIC_URL}/mcp/apps/a"}
