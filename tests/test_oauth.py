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
The app auth config names that resource URL as its ``audience`` explicitly.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
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
async def proxyd_for(
    asrv: AuthorizationServer, upstream_url: str, tmp_path: Path, **jwt: Any
) -> AsyncIterator[str]:
    """proxyd on a fixed 127.0.0.1 port whose public_url is that address; yields the app URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    resource = f"{base}/mcp/apps/{APP}"
    doc = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "public_url": base,
            "state_dir": str(tmp_path),
        },
        "apps": [{"name": APP, "labels": {"env": "test"}, "servers": [upstream_url]}],
        "app_auth_configs": [
            {
                "name": "oidc-provider",
                "app_labels": {"env": "test"},
                "jwt": {
                    "issuer": asrv.issuer,
                    "jwks_url": asrv.jwks_url,
                    "audience": resource,  # RFC 8707: the resource URL proxyd advertises
                    **jwt,
                },
            }
        ],
    }
    app: web.Application = create_app(parse_settings(doc), rng=random.Random(7))
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        yield resource
    finally:
        await server.close()


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
