"""MCP authorization the way clients do it, with real components on both sides of proxyd.

A real OAuth authorization server (npm ``oidc-provider``, tests/node/as.mjs via
tests/kit/oauth.py) and the official MCP Python SDK's own OAuth clients, starting from nothing
but proxyd's MCP URL:

* ``OAuthClientProvider`` (authorization code + PKCE): 401 -> RFC 9728 metadata named by
  ``WWW-Authenticate`` -> RFC 8414 AS metadata -> RFC 7591 registration -> authorize with PKCE
  and ``resource`` (RFC 8707) -> token -> tools/list and tools/call through proxyd.
* ``ClientCredentialsOAuthProvider`` (a machine client, no user: ``username_claim = "sub"``),
  and the same with a token requested directly from the AS.

proxyd runs in process on a port chosen before it starts, so ``server.public_url`` is the
exact address the client uses (the resource URL it advertises is the token's audience).
The first tests name that resource URL as ``audience`` explicitly; the others rely on
``resource_audience`` alone (no ``audience``):

* etc/proxyd/proxyd.toml as shipped (only listen/public_url, state_dir, the apps' servers and
  issuer/jwks_url changed) with the SDK flow; its token for one app is refused on the other.
* Step-up: ``required_scopes = ["mcp:tools"]`` and a role granting ``add`` by ``mcp:write``;
  the SDK asks for the advertised scope only, gets 403 insufficient_scope on ``add`` and
  re-authorizes on its own with the union (a client registered for both scopes; with the
  SDK's own dynamic registration oidc-provider refuses the wider scope, pinned below).
* A token for app a's resource URL is refused on app b of the same app auth config.
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from mcp_types import TextContent

from proxyd.app import create_app
from proxyd.config import parse_settings
from tests.conftest import LogCapture
from tests.kit.mcpkit import upstream_server
from tests.kit.net import free_port
from tests.kit.nodekit import NodeKitError
from tests.kit.oauth import (
    TEST_EMAIL,
    AuthorizationServer,
    HeadlessBrowser,
    authorization_server,
    jwt_claims,
)

APP = "notes"
SCOPES = ["mcp:tools", "mcp:write"]
GUARD = 60.0  # failure guard for one whole client run


class MemoryStorage:
    """The SDK's TokenStorage protocol, in memory; keeps what the flow stored for the asserts."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class Recorder:
    """httpx2 event hooks: every (method, url) sent and (status, url) received, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.received: list[tuple[int, str, str]] = []

    async def request(self, request: httpx2.Request) -> None:
        self.sent.append((request.method, str(request.url)))

    async def response(self, response: httpx2.Response) -> None:
        www = response.headers.get("www-authenticate", "")
        self.received.append((response.status_code, str(response.request.url), www))


@asynccontextmanager
async def serve_proxyd(doc: dict[str, Any], port: int) -> AsyncIterator[None]:
    """proxyd in process for ``doc``, listening on 127.0.0.1:``port`` (its listen address)."""
    app: web.Application = create_app(parse_settings(doc), rng=random.Random(7))
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        yield
    finally:
        await server.close()


@asynccontextmanager
async def proxyd_for(
    asrv: AuthorizationServer,
    upstream_url: str,
    tmp_path: Path,
    *,
    apps: Sequence[str] = (APP,),
    roles: Sequence[dict[str, Any]] = (),
    **jwt: Any,
) -> AsyncIterator[str]:
    """proxyd on a fixed 127.0.0.1 port whose public_url is that address; yields the base URL
    of the first app (``{public_url}/mcp/apps/{apps[0]}``). One app auth config selects every
    app; ``jwt`` adds to (or, with ``audience=None``, drops) its settings."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    resource = f"{base}/mcp/apps/{apps[0]}"
    settings: dict[str, Any] = {
        "issuer": asrv.issuer,
        "jwks_url": asrv.jwks_url,
        "audience": resource,  # RFC 8707: the resource URL proxyd advertises
        **jwt,
    }
    doc: dict[str, Any] = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "public_url": base,
            "state_dir": str(tmp_path),
        },
        "apps": [{"name": a, "labels": {"env": "test"}, "servers": [upstream_url]} for a in apps],
        "app_auth_configs": [
            {
                "name": "oidc-provider",
                "app_labels": {"env": "test"},
                "jwt": {k: v for k, v in settings.items() if v is not None},
            }
        ],
    }
    if roles:
        doc["roles"] = list(roles)
    async with serve_proxyd(doc, port):
        yield resource


def sdk_provider(url: str, browser: HeadlessBrowser, storage: MemoryStorage) -> OAuthClientProvider:
    """The SDK's authorization-code + PKCE client, registering itself dynamically."""
    return OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="proxyd test client",
            redirect_uris=[browser.redirect_uri],  # type: ignore[list-item]
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
        ),
        storage=storage,
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    )


def hooks_of(recorder: Recorder) -> dict[str, list[Callable[..., Any]]]:
    return {"request": [recorder.request], "response": [recorder.response]}


async def post_initialize(url: str, token: str) -> httpx2.Response:
    """One bare MCP ``initialize`` with ``token`` as the bearer."""
    async with httpx2.AsyncClient(timeout=GUARD) as http:
        return await http.post(
            url,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "probe", "version": "1"},
                },
            },
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json, text/event-stream",
            },
        )


def text_of(result: Any) -> str:
    assert not result.is_error, result
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def list_and_call(url: str, auth: httpx2.Auth, recorder: Recorder) -> tuple[list[str], str]:
    """An SDK client through proxyd: the tool names and whoami's answer (proxyd's assertion)."""
    hooks: dict[str, list[Callable[..., Any]]] = {
        "request": [recorder.request],
        "response": [recorder.response],
    }
    async with httpx2.AsyncClient(auth=auth, event_hooks=hooks, timeout=GUARD) as http:
        transport = streamable_http_client(url, http_client=http, terminate_on_close=True)
        async with Client(transport, cache=None) as client:
            tools = await client.list_tools()
            echoed = text_of(await client.call_tool("echo", {"text": "through proxyd"}))
            assert echoed == "through proxyd"
            assertion = text_of(await client.call_tool("whoami", {}))
    return sorted(tool.name for tool in tools.tools), assertion


@pytest.fixture
async def asrv() -> AsyncIterator[AuthorizationServer]:
    async with authorization_server(scopes=SCOPES) as server:
        yield server


async def test_authorization_server_is_standard(asrv: AuthorizationServer) -> None:
    """What an MCP client relies on: RFC 8414 metadata naming the issuer, registration, PKCE
    S256, client_credentials, and a JWKS with the ES256 key the JWTs are signed with."""
    meta = await asrv.metadata()
    assert meta["issuer"] == asrv.issuer
    assert meta["jwks_uri"] == asrv.jwks_url
    assert meta["registration_endpoint"] == f"{asrv.issuer}/reg"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert {"authorization_code", "client_credentials"} <= set(meta["grant_types_supported"])
    assert set(SCOPES) <= set(meta["scopes_supported"])
    async with httpx2.AsyncClient() as http:
        oidc = (await http.get(f"{asrv.issuer}/.well-known/openid-configuration")).json()
        jwks = (await http.get(asrv.jwks_url)).json()
    assert oidc["issuer"] == asrv.issuer
    assert [(k["kid"], k["kty"], k["crv"]) for k in jwks["keys"]] == [("as-es256", "EC", "P-256")]
    assert all("d" not in key for key in jwks["keys"])

    resource = "http://127.0.0.1:1/mcp/apps/x"
    token = await asrv.client_credentials_token(resource, "mcp:tools")
    claims = jwt_claims(token["access_token"])
    assert claims["aud"] == resource
    assert claims["iss"] == asrv.issuer
    assert claims["scope"] == "mcp:tools"
    assert claims["sub"] == asrv.client_id
    assert "email" not in claims


async def test_sdk_oauth_client_completes_the_flow_from_proxyd_url(
    asrv: AuthorizationServer, tmp_path: Path, logs: LogCapture
) -> None:
    async with (
        upstream_server(json_response=False) as up,
        proxyd_for(asrv, up.url, tmp_path) as url,
    ):
        browser = HeadlessBrowser(redirect_uri="http://127.0.0.1:1/callback")
        storage = MemoryStorage()
        provider = OAuthClientProvider(
            server_url=url,
            client_metadata=OAuthClientMetadata(
                client_name="proxyd test client",
                redirect_uris=[browser.redirect_uri],  # type: ignore[list-item]
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
            ),
            storage=storage,
            redirect_handler=browser.redirect,
            callback_handler=browser.callback,
        )
        recorder = Recorder()
        tools, assertion = await list_and_call(url, provider, recorder)

    assert {"echo", "whoami"} <= set(tools)
    # The discovery chain, as the SDK walked it: the first request to proxyd got the 401 that
    # names the resource metadata, which names the AS; then registration and the token.
    first_status, first_url, www = recorder.received[0]
    assert (first_status, first_url) == (401, url)
    metadata_url = f"{url.split('/mcp/')[0]}/.well-known/oauth-protected-resource/mcp/apps/{APP}"
    assert f'resource_metadata="{metadata_url}"' in www
    sent = [u for _, u in recorder.sent]
    assert metadata_url in sent
    assert asrv.metadata_url in sent
    assert f"{asrv.issuer}/reg" in sent
    assert asrv.token_endpoint in sent
    # One authorization, with PKCE and the resource indicator.
    assert len(browser.authorization_urls) == 1
    authorize = httpx2.URL(browser.authorization_urls[0])
    assert authorize.params["code_challenge_method"] == "S256"
    assert authorize.params["resource"] == url
    # The token the AS issued is for proxyd's resource URL, and proxyd accepted it for alice.
    assert storage.tokens is not None
    claims = jwt_claims(storage.tokens.access_token)
    assert claims["aud"] == url
    assert claims["iss"] == asrv.issuer
    assert claims["email"] == TEST_EMAIL
    assert set(claims["scope"].split()) <= set(SCOPES)
    created = logs.events("session_created")
    assert [(e["app"], e["user"]) for e in created] == [(APP, TEST_EMAIL)]
    # The app got proxyd's own assertion for alice, never the client's token.
    assert assertion and assertion != storage.tokens.access_token
    assert TEST_EMAIL in jwt_claims(assertion).values()
    # The AS side: the SDK registered itself, alice consented (no UI), one token for the URL.
    assert storage.client_info is not None
    client_id = storage.client_info.client_id
    events = [(e["event"], e.get("client")) for e in asrv.log()]
    assert ("registration", client_id) in events
    assert ("consent", client_id) in events
    tokens = [e for e in asrv.log() if e["event"] == "token"]
    assert [(t["kind"], t["account"], t["aud"]) for t in tokens] == [("access_token", "alice", url)]
    # Nothing was refused after the token: one 401, then only successes from proxyd.
    proxyd_answers = [s for s, u, _ in recorder.received if u.startswith(url)]
    assert proxyd_answers[0] == 401
    assert all(200 <= s < 300 for s in proxyd_answers[1:]), proxyd_answers


async def test_sdk_client_credentials_provider_through_proxyd(
    asrv: AuthorizationServer, tmp_path: Path, logs: LogCapture
) -> None:
    async with (
        upstream_server(json_response=True) as up,
        proxyd_for(asrv, up.url, tmp_path, username_claim="sub") as url,
    ):
        storage = MemoryStorage()
        provider = ClientCredentialsOAuthProvider(
            server_url=url,
            storage=storage,
            client_id=asrv.client_id,
            client_secret=asrv.client_secret,
            scope="mcp:tools",
            issuer=asrv.issuer,
        )
        recorder = Recorder()
        tools, assertion = await list_and_call(url, provider, recorder)

    assert {"echo", "whoami"} <= set(tools)
    assert storage.tokens is not None
    claims = jwt_claims(storage.tokens.access_token)
    assert claims["aud"] == url
    assert claims["sub"] == asrv.client_id
    # The SDK replaces its scope= with what discovery names (the AS's whole scopes_supported
    # while proxyd's metadata lists none); the AS keeps only the resource's scopes.
    assert set(claims.get("scope", "").split()) <= set(SCOPES)
    assert "email" not in claims
    created = logs.events("session_created")
    assert [(e["app"], e["user"]) for e in created] == [(APP, asrv.client_id)]
    assert asrv.client_id in jwt_claims(assertion).values()


async def test_direct_client_credentials_token_through_proxyd(
    asrv: AuthorizationServer, tmp_path: Path, logs: LogCapture
) -> None:
    """A token asked of the AS by hand (``resource=`` the app's URL) works as a bearer."""
    async with (
        upstream_server(json_response=True) as up,
        proxyd_for(asrv, up.url, tmp_path, username_claim="sub") as url,
    ):
        token = await asrv.client_credentials_token(url, "mcp:tools")
        bearer = {"Authorization": f"Bearer {token['access_token']}"}
        async with httpx2.AsyncClient(headers=bearer, timeout=GUARD) as http:
            transport = streamable_http_client(url, http_client=http, terminate_on_close=True)
            async with Client(transport, cache=None) as client:
                echoed = text_of(await client.call_tool("echo", {"text": "machine"}))
        # The same AS token for another resource is refused by proxyd.
        other = await asrv.client_credentials_token(url + "-other", "mcp:tools")
        async with httpx2.AsyncClient() as http:
            refused = await http.post(
                url,
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers={
                    "Authorization": f"Bearer {other['access_token']}",
                    "Accept": "application/json, text/event-stream",
                },
            )
    assert echoed == "machine"
    assert refused.status_code == 401
    assert [e["user"] for e in logs.events("session_created")] == [asrv.client_id]


EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "etc" / "proxyd" / "proxyd.toml"


async def test_shipped_example_config_works_with_the_sdk_flow(
    asrv: AuthorizationServer, tmp_path: Path, logs: LogCapture
) -> None:
    """etc/proxyd/proxyd.toml as shipped, with only what must point at this test changed:
    where proxyd listens (and so its public_url), state_dir, the apps' servers and the IdP
    (issuer, jwks_url). Everything else stays: no ``audience`` (only the resource URL is
    accepted, resource_audience = true), username_claim ["email", "preferred_username", "sub"],
    required_scopes = [], the roles (engineers: alice@example.com may call ``echo``)."""
    doc: dict[str, Any] = tomllib.loads(EXAMPLE_CONFIG.read_text())
    shipped_jwt = dict(doc["app_auth_configs"][0]["jwt"])
    assert "audience" not in shipped_jwt
    assert shipped_jwt["resource_audience"] is True
    assert shipped_jwt["username_claim"] == ["email", "preferred_username", "sub"]
    assert shipped_jwt["required_scopes"] == []
    async with upstream_server(json_response=False) as up:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        doc["server"].update(listen=f"127.0.0.1:{port}", public_url=base, state_dir=str(tmp_path))
        for app in doc["apps"]:
            app["servers"] = [up.url]
        for config in doc["app_auth_configs"]:
            config["jwt"].update(issuer=asrv.issuer, jwks_url=asrv.jwks_url)
        assert [a["name"] for a in doc["apps"]] == ["everything", "billing"]
        url = f"{base}/mcp/apps/everything"
        async with serve_proxyd(doc, port):
            browser = HeadlessBrowser(redirect_uri="http://127.0.0.1:1/callback")
            storage = MemoryStorage()
            recorder = Recorder()
            provider = sdk_provider(url, browser, storage)
            async with httpx2.AsyncClient(
                auth=provider, event_hooks=hooks_of(recorder), timeout=GUARD
            ) as http:
                transport = streamable_http_client(url, http_client=http, terminate_on_close=True)
                async with Client(transport, cache=None) as client:
                    tools = await client.list_tools()
                    echoed = text_of(await client.call_tool("echo", {"text": "as shipped"}))
            assert storage.tokens is not None
            # The same AS token, for the everything app's resource URL, does not open billing
            # although the shipped corp-idp config selects both apps.
            on_billing = await post_initialize(
                f"{base}/mcp/apps/billing", storage.tokens.access_token
            )

    assert echoed == "as shipped"
    # The shipped engineers role allows echo (and search_*, read_*), not whoami or add.
    assert {tool.name for tool in tools.tools} == {"echo"}
    assert len(browser.authorization_urls) == 1
    # required_scopes = [] as shipped: the 401 names no scope, so the SDK falls back to the
    # AS's whole scopes_supported (the AS grants the resource only its own scopes).
    assert "scope=" not in recorder.received[0][2]
    assert set(SCOPES) <= set(httpx2.URL(browser.authorization_urls[0]).params["scope"].split())
    tokens = [e for e in asrv.log() if e["event"] == "token"]
    assert [(t["account"], t["aud"]) for t in tokens] == [("alice", url)]
    claims = jwt_claims(storage.tokens.access_token)
    assert claims["aud"] == url
    assert claims["email"] == TEST_EMAIL
    created = logs.events("session_created")
    assert [(e["app"], e["user"]) for e in created] == [("everything", TEST_EMAIL)]
    proxyd_answers = [s for s, u, _ in recorder.received if u.startswith(url)]
    assert proxyd_answers[0] == 401
    assert all(200 <= s < 300 for s in proxyd_answers[1:]), proxyd_answers
    assert on_billing.status_code == 401


STEP_UP_ROLES = [
    {
        "name": "readers",
        "claims": {"scope": "mcp:tools"},
        "app_labels": {"env": "test"},
        "mcp": {"tools": ["echo", "whoami"]},
    },
    {
        "name": "writers",
        "claims": {"scope": "mcp:write"},
        "app_labels": {"env": "test"},
        "mcp": {"tools": ["add"]},  # the "write" tool
    },
]


async def test_step_up_through_the_real_authorization_server(
    asrv: AuthorizationServer, tmp_path: Path, logs: LogCapture
) -> None:
    """required_scopes = ["mcp:tools"], and ``add`` needs mcp:write (role by scope). The SDK
    asks only for what proxyd advertises, lists and reads, is refused ``add`` with 403
    insufficient_scope, re-authorizes with the union of scopes on its own (MCP 2025-11-25
    step-up, SEP-2350) and the retried call goes through."""
    async with (
        upstream_server(json_response=False) as up,
        proxyd_for(
            asrv,
            up.url,
            tmp_path,
            audience=None,
            required_scopes=["mcp:tools"],
            username_claim=["email", "preferred_username", "sub"],
            roles=STEP_UP_ROLES,
        ) as url,
    ):
        browser = HeadlessBrowser(redirect_uri="http://127.0.0.1:1/callback")
        storage = MemoryStorage()
        recorder = Recorder()
        provider = sdk_provider(url, browser, storage)
        # A client registered for every scope it may ever need (RFC 7591 ``scope``): the SDK
        # registers dynamically with the scope of the first challenge only, and oidc-provider
        # holds a client to its registered scope (see the test below).
        registered = await asrv.register_client(
            {
                **provider.context.client_metadata.model_dump(mode="json", exclude_none=True),
                "scope": " ".join([*SCOPES, "offline_access"]),
            }
        )
        storage.client_info = OAuthClientInformationFull.model_validate(
            {**registered, "issuer": asrv.issuer}
        )
        async with httpx2.AsyncClient(
            auth=provider, event_hooks=hooks_of(recorder), timeout=GUARD
        ) as http:
            transport = streamable_http_client(url, http_client=http, terminate_on_close=True)
            async with Client(transport, cache=None) as client:
                listed = await client.list_tools()
                echoed = text_of(await client.call_tool("echo", {"text": "read"}))
                first_token = storage.tokens.access_token if storage.tokens else ""
                added = text_of(await client.call_tool("add", {"a": 2, "b": 3}))

    # Before the step-up: the 401 named scope="mcp:tools", and the SDK asked for exactly that
    # (plus offline_access, which it adds for refresh tokens when the AS offers it, SEP-2207),
    # not every scope of the AS (mcp:write is one).
    status, _, www = recorder.received[0]
    assert status == 401
    assert 'scope="mcp:tools"' in www
    first_claims = jwt_claims(first_token)
    assert first_claims["aud"] == url
    assert first_claims["scope"].split() == ["mcp:tools"]
    assert {tool.name for tool in listed.tools} == {"echo", "whoami"}
    assert echoed == "read"
    # The write tool: 403 insufficient_scope naming the token's scope plus the missing one.
    refused = [(s, w) for s, u, w in recorder.received if u.startswith(url) and s == 403]
    assert len(refused) == 1, recorder.received
    assert 'error="insufficient_scope"' in refused[0][1]
    assert 'scope="mcp:tools mcp:write"' in refused[0][1]
    # The SDK re-authorized by itself, through the same AS, with the union of scopes.
    assert len(browser.authorization_urls) == 2
    asked = [httpx2.URL(u).params["scope"].split() for u in browser.authorization_urls]
    assert asked == [["mcp:tools", "offline_access"], ["mcp:tools", "offline_access", "mcp:write"]]
    assert all(httpx2.URL(u).params["resource"] == url for u in browser.authorization_urls)
    assert storage.tokens is not None
    second_claims = jwt_claims(storage.tokens.access_token)
    assert second_claims["aud"] == url
    assert set(second_claims["scope"].split()) == {"mcp:tools", "mcp:write"}
    tokens = [(e["aud"], e["scope"]) for e in asrv.log() if e["event"] == "token"]
    assert [(aud, set(s.split())) for aud, s in tokens] == [
        (url, {"mcp:tools"}),
        (url, {"mcp:tools", "mcp:write"}),
    ]
    assert added == "5"
    # The pre-registered client was used: the SDK registered nothing itself.
    assert storage.client_info is not None
    assert storage.client_info.client_id == registered["client_id"]
    assert [e["client"] for e in asrv.log() if e["event"] == "registration"] == [
        registered["client_id"]
    ]
    assert [call.name for call in up.calls] == ["echo", "add"]
    assert {e["user"] for e in logs.events("session_created")} == {TEST_EMAIL}


async def test_token_for_one_app_is_refused_on_another_of_the_same_config(
    asrv: AuthorizationServer, tmp_path: Path, logs: LogCapture
) -> None:
    """One app auth config (no ``audience``: resource URLs only) selects apps a and b; the AS
    token for a's resource URL opens a and is refused (401) on b, and b's own token opens b."""
    async with (
        upstream_server(json_response=True) as up,
        proxyd_for(
            asrv, up.url, tmp_path, apps=("a", "b"), audience=None, username_claim="sub"
        ) as url_a,
    ):
        url_b = url_a.removesuffix("/a") + "/b"
        token_a = (await asrv.client_credentials_token(url_a, "mcp:tools"))["access_token"]
        token_b = (await asrv.client_credentials_token(url_b, "mcp:tools"))["access_token"]
        a_on_a = await post_initialize(url_a, token_a)
        a_on_b = await post_initialize(url_b, token_a)
        b_on_b = await post_initialize(url_b, token_b)
        b_on_a = await post_initialize(url_a, token_b)
    assert jwt_claims(token_a)["aud"] == url_a
    assert jwt_claims(token_b)["aud"] == url_b
    assert (a_on_a.status_code, b_on_b.status_code) == (200, 200)
    assert (a_on_b.status_code, b_on_a.status_code) == (401, 401)
    assert "insufficient_scope" not in a_on_b.headers.get("www-authenticate", "")
    created = logs.events("session_created")
    assert sorted(e["app"] for e in created) == ["a", "b"]


async def test_step_up_with_a_dynamically_registered_sdk_client_is_refused_by_the_as(
    asrv: AuthorizationServer, tmp_path: Path
) -> None:
    """Pinned interop limit (not proxyd's): the SDK registers itself (RFC 7591) with the scope
    of the first challenge only ("mcp:tools offline_access"). On the 403 it does re-authorize on
    its own with the union, but oidc-provider holds the client to its registered ``scope`` and
    answers invalid_scope for mcp:write, so the step-up cannot complete with that client."""
    async with (
        upstream_server(json_response=False) as up,
        proxyd_for(
            asrv,
            up.url,
            tmp_path,
            audience=None,
            required_scopes=["mcp:tools"],
            username_claim=["email", "preferred_username", "sub"],
            roles=STEP_UP_ROLES,
        ) as url,
    ):
        browser = HeadlessBrowser(redirect_uri="http://127.0.0.1:1/callback")
        storage = MemoryStorage()
        provider = sdk_provider(url, browser, storage)
        async with httpx2.AsyncClient(auth=provider, timeout=GUARD) as http:
            transport = streamable_http_client(url, http_client=http, terminate_on_close=True)
            with pytest.raises(ExceptionGroup) as raised:
                async with Client(transport, cache=None) as client:
                    assert text_of(await client.call_tool("echo", {"text": "read"})) == "read"
                    await client.call_tool("add", {"a": 2, "b": 3})
    # The AS's own refusal, as the authorization redirect brought it back to the client.
    assert raised.group_contains(NodeKitError, match="invalid_scope.*mcp:write")
    assert storage.client_info is not None
    assert storage.client_info.scope == "mcp:tools offline_access"
    assert len(browser.authorization_urls) == 2
    assert httpx2.URL(browser.authorization_urls[1]).params["scope"].split() == [
        "mcp:tools",
        "offline_access",
        "mcp:write",
    ]
    assert [c.name for c in up.calls] == ["echo"]
