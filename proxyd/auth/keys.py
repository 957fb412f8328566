"""A JWKS document → the verification keys proxyd will use, each with its allowed algorithms.

Only asymmetric public keys are kept (RFC 8725 §3.1: never accept HMAC with a public key);
the algorithms of a key are its ``alg`` member, narrowed by the config's ``algorithms`` list,
or that list alone when the key has no ``alg`` (Entra and others publish keys without one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey, import_key

from proxyd.config import ASYMMETRIC_ALGORITHMS

# alg → (kty, curve or None) it requires (RFC 7518 §3.1, RFC 8037 §3.1).
_ALG_KEY_TYPE: dict[str, tuple[str, str | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
    "Ed25519": ("OKP", "Ed25519"),  # RFC 9864 fully-specified name
}


class KeySetError(ValueError):
    """The JWKS document cannot be used."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    kid: str | None
    key: Key
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeySet:
    by_kid: dict[str, VerifyKey]
    # Keys without a kid; only used for tokens without a kid header.
    anonymous: tuple[VerifyKey, ...]

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.anonymous)

    def find(self, kid: str | None) -> VerifyKey | tuple[VerifyKey, ...] | None:
        if kid is not None:
            return self.by_kid.get(kid)
        return self.anonymous or None


def _compatible(alg: str, key: Key) -> bool:
    need = _ALG_KEY_TYPE.get(alg)
    if need is None:
        return False
    kty, curve = need
    if key.key_type != kty:
        return False
    if isinstance(key, ECKey | OKPKey):
        if curve is not None:
            return key.curve_name == curve
        return isinstance(key, OKPKey) and key.curve_name in ("Ed25519", "Ed448")
    return isinstance(key, RSAKey)


def parse_jwks(raw: bytes, configured_algorithms: frozenset[str]) -> KeySet:
    """Parse a JWKS; keys that cannot verify anything are skipped, an empty result is an error."""
    try:
        doc = json.loads(raw)
    # RecursionError: deeply nested JSON must be "invalid", not escape the fetch task.
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise KeySetError("JWKS is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySetError('JWKS must be an object with a "keys" array')
    by_kid: dict[str, VerifyKey] = {}
    anonymous: list[VerifyKey] = []
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # "oct" (shared secrets) can never verify an IdP token
        public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
        try:
            key = import_key(public)
        except (JoseError, ValueError, TypeError):
            continue
        declared = entry.get("alg")
        if isinstance(declared, str):
            algs = {declared} & ASYMMETRIC_ALGORITHMS
            if configured_algorithms:
                algs &= configured_algorithms
        else:
            algs = set(configured_algorithms)
        algs = {a for a in algs if _compatible(a, key)}
        if not algs:
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        vk = VerifyKey(kid=kid, key=key, algorithms=frozenset(algs))
        if kid is None:
            anonymous.append(vk)
        elif kid not in by_kid:
            by_kid[kid] = vk
    result = KeySet(by_kid=by_kid, anonymous=tuple(anonymous))
    if not len(result):
        raise KeySetError(
            "JWKS has no usable signing key (asymmetric keys with an 'alg', or set "
            "jwt.algorithms for keys without one)"
        )
    return result
