"""``proxyd dev``: everything embedded, no config file, no network beyond loopback.

A demo MCP app, a dev token issuer whose keys are given to proxyd as ``static_jwks``, and
proxyd itself, configured through the same validated settings path as a real deployment.
"""

from __future__ import annotations

import json
import secrets
import shlex
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from proxyd.config import Settings, parse_settings

DEV_ISSUER = "https://dev-issuer.proxyd.invalid"
DEV_AUDIENCE = "proxyd-dev"
DEV_USER = "dev@example.com"


class DevIssuer:
    """An in-process identity provider: one ES256 key, tokens on demand."""

    def __init__(self, issuer: str = DEV_ISSUER, audience: str = DEV_AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.kid = "dev-" + secrets.token_hex(4)
        self._key = ECKey.generate_key("P-256", private=True)

    def jwks(self) -> dict[str, Any]:
        public = self._key.as_dict(private=False)
        return {"keys": [{**public, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def token(
        self, username: str = DEV_USER, ttl: float = 12 * 3600, now: float | None = None
    ) -> str:
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": username,
            "email": username,
            "iat": issued,
            "exp": issued + int(ttl),
        }
        return jwt.encode(
            {"alg": "ES256", "kid": self.kid}, claims, self._key, algorithms=["ES256"]
        )


@dataclass(frozen=True, slots=True)
class DevSetup:
    settings: Settings
    issuer: DevIssuer
    token: str


def dev_settings(
    listen: str, demo_url: str, issuer: DevIssuer, state_dir: str | None = None
) -> Settings:
    doc: dict[str, Any] = {
        "server": {
            "listen": listen,
            "state_dir": state_dir or tempfile.mkdtemp(prefix="proxyd-dev-"),
        },
        "admin": {"enabled": False},
        "log": {"format": "console"},
        "apps": [{"name": "demo", "labels": {"env": "dev"}, "servers": [demo_url]}],
        "app_auth_configs": [
            {
                "name": "dev-issuer",
                "app_labels": {"env": "dev"},
                "jwt": {
                    "issuer": issuer.issuer,
                    "audience": issuer.audience,
                    "static_jwks": json.dumps(issuer.jwks()),
                    # Dev tokens live 12h; a session may start from one any time in that window.
                    "max_token_age": "12h",
                },
            }
        ],
    }
    return parse_settings(doc)


def instructions(public_url: str, token: str) -> str:
    url = f"{public_url}/mcp/apps/demo"
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": "countdown",
                "arguments": {"steps": 5},
                "_meta": {"progressToken": 1},
            },
        }
    )
    curl = " ".join(
        [
            "curl -N",
            shlex.quote(url),
            "-H",
            shlex.quote(f"Authorization: Bearer {token}"),
            "-H",
            shlex.quote("Content-Type: application/json"),
            "-H",
            shlex.quote("Accept: application/json, text/event-stream"),
            "-H",
            shlex.quote("MCP-Protocol-Version: 2025-11-25"),
            "-d",
            shlex.quote(body),
        ]
    )
    return "\n".join(
        [
            "",
            "proxyd dev is running (Ctrl-C to stop).",
            f"  MCP endpoint : {url}",
            f"  user         : {DEV_USER} (token valid 12h)",
            "",
            "Token:",
            f"  {token}",
            "",
            "Try it (progress events arrive one by one through proxyd):",
            f"  {curl}",
            "",
            "Or point an MCP client (e.g. MCP Inspector, streamable HTTP) at the endpoint with",
            "the header 'Authorization: Bearer <token>'.",
            "",
        ]
    )
