"""JWT verification against one app auth config: pure functions, the clock passed in.

Rules (Teleport's CreateAppSessionWithJWT, go-jose's 60 s leeway, RFC 7519 §4.1, RFC 8725):
signature with a key chosen by ``kid`` and an asymmetric algorithm that key allows; ``iss``
exact; ``aud`` contains a configured audience or the resource URL of the app (RFC 8707);
``exp`` and ``iat`` required; ``exp``/``nbf``/``iat`` checked with the leeway; ``iat`` no older
than ``max_token_age``; one of the username claims a non-empty string; and then the token's
scopes hold the required ones (else 403 insufficient_scope, not 401: the token is valid).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning

from proxyd.auth.keys import ASYMMETRIC_ALGORITHMS, KeySet, VerifyKey
from proxyd.config import JwtSettings
from proxyd.errors import InsufficientScope, InvalidToken

# RFC 9864 deprecates "EdDSA" in favour of "Ed25519"; IdPs still publish it and we accept it.
warnings.filterwarnings("ignore", category=SecurityWarning, message=".*EdDSA.*")

MAX_TOKEN_BYTES = 16 * 1024
_MAX_NUMERIC_DATE = 2**53  # beyond this an int is not exactly a float (and may overflow one)
# Claims kept with a session for later policy (roles, issue 5); bounded so a token cannot bloat
# the cache.
MAX_KEPT_CLAIMS_BYTES = 4096


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    raw: str
    header: Mapping[str, Any]
    claims: Mapping[str, Any]

    @property
    def issuer(self) -> str | None:
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else None


@dataclass(frozen=True, slots=True)
class Identity:
    username: str
    issuer: str
    subject: str | None
    config: str
    expires_at: float
    issued_at: float
    claims: Mapping[str, Any]
    config_version: int = 0  # the app auth config generation it was verified under
    dropped_claims: frozenset[str] = frozenset()  # too large to keep (see kept_claims)
    username_claim: str = ""  # the claim the username came from (audit)


def _b64json(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    # RecursionError: deeply nested JSON ("[[[[…") fits in 16 KiB and must be a 401, not a 500.
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidToken("token is not a valid JWT", reason="malformed_token") from None


def peek(raw: str) -> UnverifiedToken:
    """Decode header and claims without trusting them (used to choose configs and keys)."""
    if len(raw) > MAX_TOKEN_BYTES:
        raise InvalidToken("token is too large", reason="malformed_token")
    parts = raw.split(".")
    if len(parts) != 3:
        raise InvalidToken("token is not a signed JWT (JWS compact form)", reason="malformed_token")
    header, claims = _b64json(parts[0]), _b64json(parts[1])
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken("token is not a valid JWT", reason="malformed_token")
    if not isinstance(header.get("alg"), str):
        raise InvalidToken("token header has no algorithm", reason="malformed_token")
    if "crit" in header:
        # RFC 7515 §4.1.11: we understand no critical extensions, so we must reject.
        raise InvalidToken("token uses unsupported critical headers", reason="malformed_token")
    return UnverifiedToken(raw=raw, header=header, claims=claims)


def verify_signature(token: UnverifiedToken, keyset: KeySet) -> None:
    alg = token.header["alg"]
    if alg not in ASYMMETRIC_ALGORITHMS:
        # Covers "none" and HS* (a public key must never be used as an HMAC secret).
        raise InvalidToken(f"token algorithm {alg} is not allowed", reason="alg_not_allowed")
    kid = token.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("token kid is not a string", reason="malformed_token")
    found = keyset.find(kid)
    if found is None:
        raise InvalidToken("token signed with an unknown key", reason="unknown_kid")
    candidates: tuple[VerifyKey, ...] = found if isinstance(found, tuple) else (found,)
    usable = [vk for vk in candidates if alg in vk.algorithms]
    if not usable:
        raise InvalidToken(
            f"token algorithm {alg} is not allowed for its key", reason="alg_not_allowed"
        )
    for vk in usable:
        try:
            jws.deserialize_compact(token.raw, vk.key, algorithms=[alg])
            return
        except (JoseError, ValueError):
            continue
    raise InvalidToken("token signature is invalid", reason="bad_signature")


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # Non-finite values (JSON NaN/Infinity, which Python's json accepts) and ints too large for a
    # float are not NumericDates: NaN compares false with everything, so it would never expire,
    # and float(10**400) raises OverflowError (a 500).
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or abs(value) > _MAX_NUMERIC_DATE or not math.isfinite(value):
        raise InvalidToken(f"token claim {name!r} is not a NumericDate", reason=f"invalid_{name}")
    return float(value)


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")


def token_scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The scopes a token grants: ``scope`` (RFC 8693 §4.2, RFC 9068: space-delimited) and
    ``scp`` (a list at Okta, a space-delimited string at Entra), in order, without repeats.
    Only RFC 6749 §3.3 scope tokens count: anything else can match no configured scope and
    must never reach a header."""
    found: list[str] = []
    for name in ("scope", "scp"):
        value = claims.get(name)
        items = value.split(" ") if isinstance(value, str) else value
        if isinstance(items, list):
            found.extend(v for v in items if isinstance(v, str) and _SCOPE_TOKEN.fullmatch(v))
    return tuple(dict.fromkeys(found))


def accepted_audiences(settings: JwtSettings, resource: str | None) -> tuple[str, ...]:
    if settings.resource_audience and resource is not None:
        return (*settings.audience, resource)
    return settings.audience


def username_of(claims: Mapping[str, Any], settings: JwtSettings) -> tuple[str, str] | None:
    """(claim name, username): the first of ``username_claim`` holding a non-empty string."""
    for name in settings.username_claim:
        value = claims.get(name)
        if isinstance(value, str) and value.strip():
            return name, value
    return None


def check_claims(
    claims: Mapping[str, Any], settings: JwtSettings, now: float, resource: str | None = None
) -> None:
    """``resource``: the resource URL of the app the token is presented to (RFC 8707); with
    ``resource_audience`` an ``aud`` holding it is accepted for that app, and that app only."""
    leeway = settings.leeway
    if claims.get("iss") != settings.issuer:
        raise InvalidToken("token issuer is not accepted", reason="wrong_issuer")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(a in audiences for a in accepted_audiences(settings, resource)):
        raise InvalidToken("token audience is not accepted", reason="wrong_audience")
    exp = _numeric(claims, "exp")
    if exp is None:
        raise InvalidToken("token must have an 'exp' claim", reason="missing_exp")
    iat = _numeric(claims, "iat")
    if iat is None:
        raise InvalidToken("token must have an 'iat' claim", reason="missing_iat")
    if now - leeway >= exp:
        raise InvalidToken("token has expired", reason="expired")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise InvalidToken("token is not valid yet", reason="not_yet_valid")
    if iat > now + leeway:
        raise InvalidToken("token was issued in the future", reason="issued_in_future")
    if now - iat > settings.max_token_age:
        # Teleport's jwtMaxIssuedAtAfter: sessions only start from recently issued tokens.
        raise InvalidToken("token was issued too long ago", reason="too_old")
    if username_of(claims, settings) is None:
        names = " or ".join(repr(n) for n in settings.username_claim)
        raise InvalidToken(
            f"token must have a non-empty string {names} claim",
            reason="missing_username_claim",
        )


def check_scopes(claims: Mapping[str, Any], settings: JwtSettings) -> None:
    """After every other check: a token lacking a required scope is valid, just not enough."""
    if not settings.required_scopes:
        return
    granted = set(token_scopes(claims))
    if not all(s in granted for s in settings.required_scopes):
        raise InsufficientScope("token lacks a required scope", scope=settings.required_scopes)


def kept_claims(claims: Mapping[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """Scalar and string-list claims, up to MAX_KEPT_CLAIMS_BYTES of JSON, for later policy;
    and the names of those dropped for size (policy must fail closed on them)."""
    kept: dict[str, Any] = {}
    dropped: set[str] = set()
    size = 0
    for name, value in claims.items():
        if isinstance(value, str | int | float | bool) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            cost = len(json.dumps([name, value]))
            if size + cost > MAX_KEPT_CLAIMS_BYTES:
                dropped.add(name)
                continue
            kept[name] = value
            size += cost
    return kept, frozenset(dropped)


def verify(
    token: UnverifiedToken,
    keyset: KeySet,
    settings: JwtSettings,
    config: str,
    now: float,
    resource: str | None = None,
) -> Identity:
    verify_signature(token, keyset)
    claims = token.claims
    kept, dropped = kept_claims(claims)
    check_claims(claims, settings, now, resource)
    check_scopes(claims, settings)
    found = username_of(claims, settings)
    assert found is not None  # check_claims
    sub = claims.get("sub")
    return Identity(
        username=found[1],
        username_claim=found[0],
        issuer=settings.issuer,
        subject=sub if isinstance(sub, str) else None,
        config=config,
        expires_at=float(claims["exp"]),
        issued_at=float(claims["iat"]),
        claims=kept,
        dropped_claims=dropped,
    )
