"""A REAL OAuth authorization server for the tests: npm ``oidc-provider`` (tests/node/as.mjs).

Not a token minter: discovery (RFC 8414 and OIDC), dynamic client registration (RFC 7591),
authorization code with PKCE required, resource indicators (RFC 8707) with JWT access tokens
(RFC 9068, ES256, ``aud`` = the resource), client_credentials, JWKS. Logins need no UI: the
fixed user ``alice`` (``alice@example.com``) is logged in and consents to everything asked as
soon as a client follows the authorization redirects with a cookie jar.

    from tests.kit.oauth import authorization_server, HeadlessBrowser

    async with authorization_server(scopes=["mcp:tools"]) as asrv:
        asrv.issuer                # http://127.0.0.1:PORT (the JWTs' iss)
        asrv.jwks_url              # http://127.0.0.1:PORT/jwks
        asrv.metadata_url          # .../.well-known/oauth-authorization-server
        asrv.client_id, asrv.client_secret   # a confidential client_credentials client
        await asrv.client_credentials_token(resource, "mcp:tools")   # {"access_token": ...}
        await asrv.metadata()      # the RFC 8414 document
        await asrv.register_client({...})   # RFC 7591 registration (pre-registering a client)

    browser = HeadlessBrowser("http://127.0.0.1:1/callback")
    OAuthClientProvider(..., redirect_handler=browser.redirect, callback_handler=browser.callback)

Requires node and tests/node/node_modules with oidc-provider (``require_oidc_provider``: skipped
locally, FAILS under CI, like ``require_node``).
The process is always terminated and awaited on exit; its stderr (one JSON line per event:
registration, consent, errors) is in ``asrv.log()``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx2
import pytest
from mcp.shared.auth import AuthorizationCodeResult

from tests.kit.nodekit import (
    NODE_DIR,
    NODE_MODULES,
    NodeKitError,
    _tail,
    listening,
    require_node,
)

AS_JS = NODE_DIR / "as.mjs"
TEST_USER = "alice"
TEST_EMAIL = "alice@example.com"
MAX_REDIRECTS = 20  # authorize -> interaction (login) -> authorize -> interaction (consent) -> ...


@dataclass
class AuthorizationServer:
    port: int
    client_id: str
    client_secret: str
    scopes: list[str]
    _stderr: IO[bytes]

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def metadata_url(self) -> str:
        return f"{self.issuer}/.well-known/oauth-authorization-server"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    async def metadata(self) -> dict[str, Any]:
        async with httpx2.AsyncClient() as http:
            response = await http.get(self.metadata_url)
            response.raise_for_status()
            document: dict[str, Any] = response.json()
            return document

    async def client_credentials_token(self, resource: str, scope: str) -> dict[str, Any]:
        """A direct client_credentials token request (client_secret_basic) for ``resource``."""
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                self.token_endpoint,
                data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
                auth=httpx2.BasicAuth(self.client_id, self.client_secret),
            )
            if response.status_code != 200:
                raise NodeKitError(f"token request: {response.status_code} {response.text}")
            answer: dict[str, Any] = response.json()
            return answer

    async def register_client(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """RFC 7591 registration at /reg, as an operator pre-registering a client would do it;
        the registration response (client_id, client_secret, the registered ``scope``...)."""
        async with httpx2.AsyncClient() as http:
            response = await http.post(f"{self.issuer}/reg", json=metadata)
            if response.status_code != 201:
                raise NodeKitError(f"registration: {response.status_code} {response.text}")
            answer: dict[str, Any] = response.json()
            return answer

    def log(self) -> list[dict[str, Any]]:
        """The JSON lines as.mjs wrote on stderr so far (warnings from the library skipped)."""
        lines = []
        for line in _tail(self._stderr, 1 << 20).splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


def require_oidc_provider() -> str:
    """The node binary, once tests/node/node_modules also holds ``oidc-provider`` (an older
    install may predate it); else skip locally, FAIL under CI, like ``require_node``."""
    node = require_node()
    if not (NODE_MODULES / "oidc-provider" / "package.json").is_file():
        message = "oidc-provider is not installed in tests/node (npm ci --prefix tests/node)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return node


@asynccontextmanager
async def authorization_server(
    scopes: Sequence[str] = ("mcp:tools",),
) -> AsyncIterator[AuthorizationServer]:
    """as.mjs on 127.0.0.1 (a free port), stopped and awaited on exit."""
    node = require_oidc_provider()
    client_id = "machine-client"
    client_secret = secrets.token_urlsafe(24)
    argv = [
        node,
        str(AS_JS),
        "--scopes",
        " ".join(scopes),
        "--client-id",
        client_id,
        "--client-secret",
        client_secret,
        "--exit-on-eof",  # it also exits if this process dies without stopping it
    ]
    async with listening(argv, "as.mjs") as (port, stderr):
        yield AuthorizationServer(port, client_id, client_secret, list(scopes), stderr)


@dataclass
class HeadlessBrowser:
    """The user agent of an authorization-code flow, without a person: ``redirect`` (the SDK's
    redirect_handler) GETs the authorization URL and follows the redirects with a cookie jar
    (the AS logs alice in and consents on its own) until one points at ``redirect_uri``;
    ``callback`` (the SDK's callback_handler) returns that redirect's code, state and iss."""

    redirect_uri: str
    authorization_urls: list[str] = field(default_factory=list)
    _result: AuthorizationCodeResult | None = None

    async def redirect(self, authorization_url: str) -> None:
        self.authorization_urls.append(authorization_url)
        url = authorization_url
        async with httpx2.AsyncClient(follow_redirects=False) as http:
            for _ in range(MAX_REDIRECTS):
                response = await http.get(url)
                location = response.headers.get("location")
                if response.status_code not in (302, 303) or location is None:
                    raise NodeKitError(
                        f"authorization stopped at {url}: {response.status_code} {response.text}"
                    )
                url = urljoin(url, location)
                if url.split("?", 1)[0] == self.redirect_uri:
                    self._result = _code_result(url)
                    return
        raise NodeKitError(f"more than {MAX_REDIRECTS} redirects from {authorization_url}")

    async def callback(self) -> AuthorizationCodeResult:
        result, self._result = self._result, None
        if result is None:
            raise NodeKitError("no authorization response was received")
        return result


def _code_result(url: str) -> AuthorizationCodeResult:
    query = parse_qs(urlsplit(url).query)
    if "error" in query:
        raise NodeKitError(f"authorization error: {query}")

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[0] if values else None

    code = one("code")
    if code is None:
        raise NodeKitError(f"no code in {url}")
    return AuthorizationCodeResult(code=code, state=one("state"), iss=one("iss"))


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWS compact token, NOT verified (proxyd is what verifies)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims
