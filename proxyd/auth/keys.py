"""A JWKS document → the verification keys proxyd will use, each with its allowed algorithms.

Only asymmetric public keys are kept (RFC 8725 §3.1: never accept HMAC with a public key);
the algorithms of a key are its ``alg`` member, narrowed by the config's ``algorithms`` list,
or that list alone when the key has no ``alg`` (Entra and others publish keys without one).

A signing key proxyd will not trust (too small, a curve outside RFC 7518 §3.4 / RFC 8037 §3.1,
an ``alg`` that does not fit it, malformed) is *rejected*: left out of the key set and reported
in ``rejected``, so the caller can log it or fail the configuration. Keys that are not for
verifying JWS at all (``use`` other than ``sig``, ``oct`` secrets, encryption algorithms) are
skipped without a word: publishing them is normal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey, import_key
from joserfc.util import base64_to_int

# The JWS algorithms proxyd accepts from an identity provider: asymmetric only, so a public key
# can never be used as an HMAC secret (RFC 8725 §2.1, §3.1) and "none" is impossible.
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
        "Ed25519",
    }
)


# alg → (kty, curve or None) it requires (RFC 7518 §3.1, RFC 8037 §3.1).
_ALG_KEY_TYPE: dict[str, tuple[str, str | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
    "Ed25519": ("OKP", "Ed25519"),  # RFC 9864 fully-specified name
}
# RFC 7518 §3.3 and §3.5: "A key of size 2048 bits or larger MUST be used".
MIN_RSA_BITS = 2048
# RFC 7518 §3.4 defines ECDSA on these curves only; secp256k1 (ES256K, RFC 8812) and others are
# not something an OIDC provider signs ID tokens with, and proxyd has no algorithm for them.
_EC_CURVES = ("P-256", "P-384", "P-521")
# RFC 8037 §3.1: EdDSA signs with Ed25519 or Ed448; X25519/X448 are key-agreement curves.
_OKP_CURVES = ("Ed25519", "Ed448")
# RFC 7518 §4.1 / RFC 8037 §3.2 key-management algorithms: a key that declares one is an
# encryption key (IdPs publish them without "use"), not a badly configured signing key.
_ENCRYPTION_ALG_PREFIXES = ("RSA1_5", "RSA-OAEP", "ECDH-ES")
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


class KeySetError(ValueError):
    """The JWKS document cannot be used."""

    def __init__(self, message: str, rejected: tuple[RejectedKey, ...] = ()) -> None:
        super().__init__(message)
        self.rejected = rejected


@dataclass(frozen=True, slots=True)
class RejectedKey:
    """A signing key left out of the key set; never carries key material."""

    index: int  # position in the "keys" array: config problems name ``static_jwks.keys[i]``
    kid: str | None
    reason: str


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
    rejected: tuple[RejectedKey, ...] = ()

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
        return isinstance(key, OKPKey) and key.curve_name in _OKP_CURVES
    return isinstance(key, RSAKey)


def _show(value: object) -> str:
    """An IdP-supplied name for a message: quoted, bounded, never a whole JSON value."""
    if value is None:
        return "(none)"
    if not isinstance(value, str):
        kind = {bool: "a boolean", int: "a number", float: "a number", list: "an array"}
        return kind.get(type(value), "an object")
    return repr(value if len(value) <= 40 else value[:40] + "…")


def _describe(key: Key) -> str:
    if isinstance(key, ECKey | OKPKey):
        return f"an {key.key_type} {key.curve_name} key"
    return "an RSA key"


def _weakness(entry: dict[str, object], kty: str) -> str | None:
    """Why this key is too weak to sign with, from its public members; None if it is not."""
    if kty == "RSA":
        n = entry.get("n")
        if not isinstance(n, str):
            return "not a valid RSA public key"
        try:
            bits = base64_to_int(n).bit_length()  # joserfc's own decoding: one reading of n
        except (ValueError, TypeError):
            return "not a valid RSA public key"
        if bits < MIN_RSA_BITS:
            return (
                f"RSA key of {bits} bits is too small "
                f"(RFC 7518 §3.3 requires at least {MIN_RSA_BITS})"
            )
        return None
    crv = entry.get("crv")
    if kty == "EC" and crv not in _EC_CURVES:
        return f"EC curve {_show(crv)} is not allowed (RFC 7518 §3.4: P-256, P-384 or P-521)"
    if kty == "OKP" and crv not in _OKP_CURVES:
        return f"OKP curve {_show(crv)} is not a signature curve (RFC 8037 §3.1: Ed25519 or Ed448)"
    return None


def _alg_problem(declared: str | None, key: Key) -> str | None:
    """Why the key's own ``alg`` makes it unusable; None if it fits (or there is none)."""
    if declared is None:
        return None
    if declared not in ASYMMETRIC_ALGORITHMS:
        return (
            f"alg {_show(declared)} is not an asymmetric signature algorithm proxyd accepts "
            f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
        )
    if not _compatible(declared, key):
        fits = [a for a in _ALG_KEY_TYPE if _compatible(a, key)]
        return f"alg {_show(declared)} does not fit {_describe(key)} (it takes {', '.join(fits)})"
    return None


def parse_jwks(raw: bytes, configured_algorithms: frozenset[str]) -> KeySet:
    """Parse a JWKS; unusable keys are skipped or rejected, an empty result is an error.

    Pure: rejected keys are returned (``KeySet.rejected``, or ``KeySetError.rejected`` when
    nothing usable is left), never logged here.
    """
    try:
        doc = json.loads(raw)
    # RecursionError: deeply nested JSON must be "invalid", not escape the fetch task.
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise KeySetError("JWKS is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySetError('JWKS must be an object with a "keys" array')
    by_kid: dict[str, VerifyKey] = {}
    anonymous: list[VerifyKey] = []
    rejected: list[RejectedKey] = []
    unused = 0
    for index, entry in enumerate(doc["keys"]):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kty = entry.get("kty")
        if kty not in ("RSA", "EC", "OKP"):
            continue  # "oct" (shared secrets) can never verify an IdP token
        declared = entry.get("alg")
        if isinstance(declared, str) and declared.startswith(_ENCRYPTION_ALG_PREFIXES):
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        # Checked before import: joserfc would accept a 512-bit modulus (with a warning only).
        problem = _weakness(entry, kty)
        if problem is None and declared is not None and not isinstance(declared, str):
            problem = f"alg is {_show(declared)}, not a string (RFC 7517 §4.4)"
        if problem is None:
            public = {k: v for k, v in entry.items() if k not in _PRIVATE_MEMBERS}
            try:
                key = import_key(public)
            except (JoseError, ValueError, TypeError):
                # The library's message may quote the key's members: report only the type.
                problem = f"not a valid {kty} public key"
            else:
                problem = _alg_problem(declared if isinstance(declared, str) else None, key)
        if problem is not None:
            rejected.append(RejectedKey(index=index, kid=kid, reason=problem))
            continue
        if isinstance(declared, str):
            algs = {declared}
            if configured_algorithms:
                algs &= configured_algorithms
        else:
            algs = {a for a in configured_algorithms if _compatible(a, key)}
        if not algs:
            unused += 1  # a sound key, but no algorithm of this config's applies to it
            continue
        vk = VerifyKey(kid=kid, key=key, algorithms=frozenset(algs))
        if kid is None:
            anonymous.append(vk)
        elif kid not in by_kid:
            by_kid[kid] = vk
    result = KeySet(by_kid=by_kid, anonymous=tuple(anonymous), rejected=tuple(rejected))
    if not len(result):
        if rejected and not unused:
            message = f"JWKS has no usable signing key ({len(rejected)} rejected)"
        else:
            message = (
                "JWKS has no usable signing key (asymmetric keys with an 'alg', or set "
                "jwt.algorithms for keys without one)"
            )
            if rejected:
                message += f"; {len(rejected)} rejected"
        raise KeySetError(message, result.rejected)
    return result
