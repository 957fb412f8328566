"""A test identity provider: real keys, real signed JWTs, a real JWKS endpoint on 127.0.0.1.

Forged tokens (``alg: none``, HMAC keyed with the public key) are built by hand here, the way
an attacker would, because no honest library will produce them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, RSAKey

ISSUER = "https://idp.test"
# Every token minted in a test run; the autouse log guard in conftest checks none was logged.
MINTED: set[str] = set()
AUDIENCE = "proxyd-test"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _probable_prime(n: int, rng: random.Random, rounds: int = 40) -> bool:
    """Miller-Rabin: composite with probability at most 4**-rounds."""
    if n < 4:
        return n in (2, 3)
    for small in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % small == 0:
            return n == small
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, rng: random.Random, e: int) -> int:
    while True:
        # Top two bits set: the product of two such primes has exactly 2 * bits bits.
        candidate = rng.getrandbits(bits) | (0b11 << (bits - 2)) | 1
        if candidate % e != 1 and _probable_prime(candidate, rng):
            return candidate


@functools.cache
def weak_rsa_key(bits: int) -> RSAKey:
    """An RSA private key of ``bits`` bits, as an IdP with a weak key would publish.

    ``cryptography`` refuses to generate keys under 1024 bits, so smaller ones are built from
    two primes found here; joserfc's SecurityWarning about small keys is expected and muted.
    """
    e = 65537
    if bits >= 1024:
        private = rsa.generate_private_key(public_exponent=e, key_size=bits)
    else:
        rng = random.Random(bits)  # deterministic: one key per size, found quickly
        p = _prime(bits // 2, rng, e)
        q = _prime(bits // 2, rng, e)
        while q == p:
            q = _prime(bits // 2, rng, e)
        d = pow(e, -1, (p - 1) * (q - 1))
        numbers = rsa.RSAPrivateNumbers(
            p=p,
            q=q,
            d=d,
            dmp1=d % (p - 1),
            dmq1=d % (q - 1),
            iqmp=pow(q, -1, p),
            public_numbers=rsa.RSAPublicNumbers(e, p * q),
        )
        private = numbers.private_key()
    assert private.key_size == bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return RSAKey.import_key(private)


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
    # kid → the "alg" the JWKS shows for it instead of the signing alg (None: no "alg").
    published_alg: dict[str, str | None] = field(default_factory=dict)
    behaviour: JwksBehaviour = field(default_factory=JwksBehaviour)
    fetches: int = 0
    url: str = ""

    def add_key(self, kid: str, alg: str = "ES256", *, bits: int = 2048) -> Key:
        """A new signing key; ``bits`` below 2048 makes a weak RSA key (see weak_rsa_key)."""
        key: Key
        if alg.startswith("ES"):
            # ES256K (RFC 8812) signs on secp256k1, a curve proxyd refuses.
            curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "ES256K": "secp256k1"}
            key = ECKey.generate_key(curve[alg], private=True)
        elif bits < 2048:
            key = weak_rsa_key(bits)
        else:
            key = RSAKey.generate_key(bits, private=True)
        self.keys[kid] = (key, alg)
        return key

    def remove_key(self, kid: str) -> None:
        del self.keys[kid]

    def jwks(self, *, with_alg: bool = True) -> dict[str, Any]:
        out = []
        for kid, (key, alg) in self.keys.items():
            entry: dict[str, Any] = {**key.as_dict(private=False), "kid": kid, "use": "sig"}
            shown = self.published_alg.get(kid, alg)
            if with_alg and shown is not None:
                entry["alg"] = shown
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
