"""A test identity provider: real keys, real signed JWTs, a real JWKS endpoint on 127.0.0.1.

Forged tokens (``alg: none``, HMAC keyed with the public key) are built by hand here, the way
an attacker would, because no honest library will produce them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, Key, RSAKey

ISSUER = "https://idp.test"
# Every token minted in a test run; the autouse log guard in conftest checks none was logged.
MINTED: set[str] = set()
AUDIENCE = "proxyd-test"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class JwksBehaviour:
    """What the JWKS endpoint does; tests flip these fields."""

    status: int = 200
    cache_control: str | None = "max-age=600"
    body: bytes | None = None  # overrides the key set when set
    down: bool = False  # answer by dropping the connection


@dataclass
class TestIssuer:
    __test__ = False  # not a pytest class

    issuer: str = ISSUER
    audience: str = AUDIENCE
    keys: dict[str, tuple[Key, str]] = field(default_factory=dict)  # kid → (key, alg)
    behaviour: JwksBehaviour = field(default_factory=JwksBehaviour)
    fetches: int = 0
    url: str = ""

    def add_key(self, kid: str, alg: str = "ES256") -> Key:
        key: Key
        if alg.startswith("ES"):
            curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
            key = ECKey.generate_key(curve, private=True)
        else:
            key = RSAKey.generate_key(2048, private=True)
        self.keys[kid] = (key, alg)
        return key

    def remove_key(self, kid: str) -> None:
        del self.keys[kid]

    def jwks(self, *, with_alg: bool = True) -> dict[str, Any]:
        out = []
        for kid, (key, alg) in self.keys.items():
            entry: dict[str, Any] = {**key.as_dict(private=False), "kid": kid, "use": "sig"}
            if with_alg:
                entry["alg"] = alg
            out.append(entry)
        return {"keys": out}

    def claims(self, now: float, **overrides: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "u-123",
            "email": "alice@example.com",
            "iat": int(now),
            "exp": int(now) + 3600,
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(
        self,
        now: float,
        *,
        kid: str | None = None,
        header: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        kid = kid or next(iter(self.keys))
        key, alg = self.keys[kid]
        hdr = {"alg": alg, "kid": kid, **(header or {})}
        token = jwt.encode(hdr, self.claims(now, **claims), key, algorithms=[hdr["alg"]])
        MINTED.add(token)
        return token

    def unsigned_token(self, now: float, **claims: Any) -> str:
        """``alg: none`` (RFC 7519 §6): the classic forgery."""
        head = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        body = b64url(json.dumps(self.claims(now, **claims)).encode())
        MINTED.add(f"{head}.{body}.")
        return f"{head}.{body}."

    def hmac_with_public_key(self, now: float, kid: str, **claims: Any) -> str:
        """HS256 keyed with the RSA/EC public key (the algorithm-confusion attack)."""
        key, _ = self.keys[kid]
        assert isinstance(key, RSAKey | ECKey)
        secret = key.as_pem(private=False)
        head = b64url(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
        body = b64url(json.dumps(self.claims(now, **claims)).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        MINTED.add(f"{head}.{body}.{b64url(sig)}")
        return f"{head}.{body}.{b64url(sig)}"

    def tampered(self, token: str, **claims: Any) -> str:
        """Same signature, different claims: must fail the signature check."""
        head, body, sig = token.split(".")
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        payload.update(claims)
        return f"{head}.{b64url(json.dumps(payload).encode())}.{sig}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        b = self.behaviour
        if b.down:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        body = b.body if b.body is not None else json.dumps(self.jwks()).encode()
        headers = {"Cache-Control": b.cache_control} if b.cache_control else {}
        return web.Response(
            status=b.status, body=body, content_type="application/json", headers=headers
        )
