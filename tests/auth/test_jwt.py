"""Pure JWT verification (proxyd.auth.jwt): real signed tokens, a fixed ``now``, every reason."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

from proxyd.auth.jwt import (
    MAX_KEPT_CLAIMS_BYTES,
    MAX_TOKEN_BYTES,
    Identity,
    kept_claims,
    peek,
    token_scopes,
    verify,
)
from proxyd.auth.keys import KeySet, KeySetError, RejectedKey, parse_jwks
from proxyd.config import JwtSettings
from proxyd.errors import InsufficientScope, InvalidToken
from tests.kit.issuer import AUDIENCE, ISSUER, TestIssuer, b64url, weak_rsa_key

NOW = 1_700_000_000.0  # the fake "now" every token is minted and checked at

SETTINGS = JwtSettings(
    issuer=ISSUER, audience=(AUDIENCE,), jwks_url="https://idp.test/jwks.json", static_jwks=None
)


@pytest.fixture(scope="module")
def idp() -> TestIssuer:
    """One issuer with an ES256 (default), an ES384, an RS256 and a PS256 key."""
    issuer = TestIssuer()
    issuer.add_key("ec", "ES256")
    issuer.add_key("ec384", "ES384")
    issuer.add_key("rsa", "RS256")
    issuer.add_key("pss", "PS256")
    return issuer


def keyset_of(
    issuer: TestIssuer, algorithms: frozenset[str] = frozenset(), *, with_alg: bool = True
) -> KeySet:
    return parse_jwks(json.dumps(issuer.jwks(with_alg=with_alg)).encode(), algorithms)


def settings(**changes: Any) -> JwtSettings:
    return dataclasses.replace(SETTINGS, **changes)


def check(raw: str, keys: KeySet, cfg: JwtSettings = SETTINGS, now: float = NOW) -> Identity:
    return verify(peek(raw), keys, cfg, "test-idp", now)


def reason(raw: str, keys: KeySet, cfg: JwtSettings = SETTINGS, now: float = NOW) -> str:
    with pytest.raises(InvalidToken) as exc:
        check(raw, keys, cfg, now)
    return exc.value.reason


def forge(header: object, claims: object, signature: str = "c2ln") -> str:
    """A compact JWS built by hand from arbitrary JSON (no valid signature)."""
    head, body = b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{signature}"


# --- accepted tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["ec", "ec384", "rsa"])
def test_valid_token_accepted_for_es256_es384_rs256(idp: TestIssuer, kid: str) -> None:
    identity = check(idp.token(NOW, kid=kid), keyset_of(idp))
    assert identity.username == "alice@example.com"
    assert identity.subject == "u-123"
    assert identity.issuer == ISSUER
    assert identity.config == "test-idp"
    assert identity.issued_at == NOW
    assert identity.expires_at == NOW + 3600


def test_custom_username_claim(idp: TestIssuer) -> None:
    cfg = settings(username_claim=("preferred_username",))
    token = idp.token(NOW, preferred_username="alice", email=None)
    assert check(token, keyset_of(idp), cfg).username == "alice"
    assert reason(idp.token(NOW), keyset_of(idp), cfg) == "missing_username_claim"


# --- malformed tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "only.two",
        "a.b.c.d.e",  # JWE compact form
        "",
        "@@@@.e30.sig",  # header is not base64url at all
        f"{b64url(b'not json')}.e30.sig",
        f"{b64url(bytes([0xFF, 0xFE]))}.e30.sig",  # not UTF-8
    ],
)
def test_malformed_structure(idp: TestIssuer, raw: str) -> None:
    assert reason(raw, keyset_of(idp)) == "malformed_token"


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        ([1, 2], {"iss": ISSUER}),  # header not an object
        ({"alg": "ES256", "kid": "ec"}, ["claims"]),  # claims not an object
        ({"alg": "ES256", "kid": "ec"}, "a string"),
        ({"kid": "ec"}, {"iss": ISSUER}),  # no alg
        ({"alg": 256, "kid": "ec"}, {"iss": ISSUER}),  # alg not a string
        ({"alg": "ES256", "kid": 7}, {"iss": ISSUER}),  # kid not a string
        ({"alg": "ES256", "kid": "ec", "crit": ["exp"]}, {"iss": ISSUER}),
    ],
)
def test_malformed_header_or_claims(idp: TestIssuer, header: object, claims: object) -> None:
    assert reason(forge(header, claims), keyset_of(idp)) == "malformed_token"


def test_crit_header_rejected_even_when_signed(idp: TestIssuer) -> None:
    token = idp.token(NOW, header={"crit": ["b64"], "b64": True})
    assert reason(token, keyset_of(idp)) == "malformed_token"


def test_too_large_token(idp: TestIssuer) -> None:
    token = idp.token(NOW, padding="x" * MAX_TOKEN_BYTES)
    assert len(token) > MAX_TOKEN_BYTES
    assert reason(token, keyset_of(idp)) == "malformed_token"
    # Just under the limit is still a token.
    small = idp.token(NOW, padding="x" * (MAX_TOKEN_BYTES // 2))
    assert check(small, keyset_of(idp)).username == "alice@example.com"


def test_deeply_nested_json_is_malformed_not_a_crash(idp: TestIssuer) -> None:
    header = b64url(b"[" * 5000 + b"]" * 5000)
    raw = f"{header}.{b64url(b'{}')}.sig"
    assert len(raw) <= MAX_TOKEN_BYTES
    assert reason(raw, keyset_of(idp)) == "malformed_token"


# --- algorithms, keys and signatures -----------------------------------------------------------


def test_alg_none_rejected(idp: TestIssuer) -> None:
    assert reason(idp.unsigned_token(NOW), keyset_of(idp)) == "alg_not_allowed"


@pytest.mark.parametrize("kid", ["ec", "rsa"])
def test_hmac_keyed_with_public_key_rejected(idp: TestIssuer, kid: str) -> None:
    token = idp.hmac_with_public_key(NOW, kid)
    assert reason(token, keyset_of(idp)) == "alg_not_allowed"
    # Even a config that (wrongly) lists every asymmetric alg cannot enable HS256.
    cfg_keys = keyset_of(idp, frozenset({"RS256", "ES256"}), with_alg=False)
    assert reason(token, cfg_keys) == "alg_not_allowed"


def test_unknown_kid(idp: TestIssuer) -> None:
    other = TestIssuer()
    other.add_key("elsewhere")
    assert reason(other.token(NOW), keyset_of(idp)) == "unknown_kid"


def test_token_without_kid_uses_only_keys_without_kid(idp: TestIssuer) -> None:
    token = idp.token(NOW, kid="ec")
    unkidded = {"keys": [{k: v for k, v in e.items() if k != "kid"} for e in idp.jwks()["keys"]]}
    keys_no_kid = parse_jwks(json.dumps(unkidded).encode(), frozenset())
    head = {"alg": "ES256", "typ": "JWT"}
    no_kid = jose_jwt.encode(head, idp.claims(NOW), idp.keys["ec"][0], algorithms=["ES256"])
    assert check(no_kid, keys_no_kid).username == "alice@example.com"
    assert reason(no_kid, keyset_of(idp)) == "unknown_kid"  # every key there has a kid
    assert reason(token, keys_no_kid) == "unknown_kid"


def test_tampered_claims_bad_signature(idp: TestIssuer) -> None:
    token = idp.token(NOW)
    assert check(token, keyset_of(idp)).username == "alice@example.com"
    forged = idp.tampered(token, email="mallory@example.com")
    assert reason(forged, keyset_of(idp)) == "bad_signature"


def test_same_kid_other_key_bad_signature(idp: TestIssuer) -> None:
    impostor = TestIssuer()
    impostor.add_key("ec", "ES256")  # same kid and alg, different private key
    assert reason(impostor.token(NOW), keyset_of(idp)) == "bad_signature"


def test_header_alg_must_be_allowed_for_the_key(idp: TestIssuer) -> None:
    # ES384 claimed for the ES256 key (and re-signed with it, as joserfc refuses nothing).
    token = idp.token(NOW, kid="ec384", header={"kid": "ec"})
    assert reason(token, keyset_of(idp)) == "alg_not_allowed"


def test_key_without_alg_needs_configured_algorithms(idp: TestIssuer) -> None:
    with pytest.raises(KeySetError):
        keyset_of(idp, with_alg=False)
    keys = keyset_of(idp, frozenset({"ES256"}), with_alg=False)
    assert check(idp.token(NOW, kid="ec"), keys).username == "alice@example.com"
    # Algorithms not listed are still refused for those keys.
    assert reason(idp.token(NOW, kid="rsa"), keys) == "unknown_kid"  # RSA key unusable


def test_rs256_key_cannot_verify_ps256_unless_allowed(idp: TestIssuer) -> None:
    ps_with_rs_key = idp.token(NOW, kid="rsa", header={"alg": "PS256"})
    # The key declares alg RS256: PS256 is refused, even when the config lists PS256.
    assert reason(ps_with_rs_key, keyset_of(idp)) == "alg_not_allowed"
    both = frozenset({"RS256", "PS256"})
    assert reason(ps_with_rs_key, keyset_of(idp, both)) == "alg_not_allowed"
    # A key without alg: the config's list decides.
    assert reason(ps_with_rs_key, keyset_of(idp, frozenset({"RS256"}), with_alg=False)) == (
        "alg_not_allowed"
    )
    allowed = keyset_of(idp, frozenset({"PS256"}), with_alg=False)
    assert check(ps_with_rs_key, allowed).username == "alice@example.com"
    # And a key that declares PS256 verifies PS256 tokens.
    assert check(idp.token(NOW, kid="pss"), keyset_of(idp)).username == "alice@example.com"


def test_configured_algorithms_narrow_declared_ones(idp: TestIssuer) -> None:
    keys = keyset_of(idp, frozenset({"ES256"}))
    assert check(idp.token(NOW, kid="ec"), keys).username == "alice@example.com"
    assert reason(idp.token(NOW, kid="rsa"), keys) == "unknown_kid"  # RS256 key dropped


# --- key strength and key/alg fit (RFC 7518 §3.1, §3.3, §3.4; RFC 8037 §3.1) ------------------

ANY_ALG = frozenset[str]()
TOO_SMALL = "RSA key of {bits} bits is too small (RFC 7518 §3.3 requires at least 2048)"
RSA_ALGS = "RS256, RS384, RS512, PS256, PS384, PS512"


def jwks_bytes(*entries: object) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


def jwk(key: Key, kid: str, alg: str | None = None, **members: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {**key.as_dict(private=False), "kid": kid, **members}
    if alg is not None:
        entry["alg"] = alg
    return entry


def test_strong_keys_have_no_rejections(idp: TestIssuer) -> None:
    keys = keyset_of(idp)
    assert keys.rejected == ()
    assert len(keys) == 4  # ES256, ES384, RS256 (2048 bits), PS256 (2048 bits)


@pytest.mark.parametrize("bits", [512, 1024])
def test_weak_rsa_key_is_rejected_and_cannot_verify(bits: int) -> None:
    issuer = TestIssuer()
    issuer.add_key("ec", "ES256")
    issuer.add_key("weak", "RS256", bits=bits)
    keys = keyset_of(issuer)
    assert keys.rejected == (RejectedKey(index=1, kid="weak", reason=TOO_SMALL.format(bits=bits)),)
    assert keys.find("weak") is None
    # A token signed by the weak key (valid signature, right claims) is not accepted.
    assert reason(issuer.token(NOW, kid="weak"), keys) == "unknown_kid"
    assert check(issuer.token(NOW, kid="ec"), keys).username == "alice@example.com"
    # Without `alg`, a config that lists RS256 does not make it usable either.
    no_alg = keyset_of(issuer, frozenset({"RS256", "ES256"}), with_alg=False)
    assert [r.kid for r in no_alg.rejected] == ["weak"]


def test_jwks_whose_only_key_is_weak_has_no_usable_key() -> None:
    issuer = TestIssuer()
    issuer.add_key("weak", "RS256", bits=512)
    with pytest.raises(KeySetError) as exc:
        keyset_of(issuer)
    assert str(exc.value) == "JWKS has no usable signing key (1 rejected)"
    assert exc.value.rejected == (RejectedKey(0, "weak", TOO_SMALL.format(bits=512)),)


@pytest.mark.parametrize("published", ["ES256K", "ES256", None])
def test_ec_key_on_secp256k1_is_rejected(published: str | None) -> None:
    key = ECKey.generate_key("secp256k1", private=True)
    good = ECKey.generate_key("P-256", private=True)
    raw = jwks_bytes(jwk(good, "good", "ES256"), jwk(key, "k1", published))
    keys = parse_jwks(raw, frozenset({"ES256"}))
    assert keys.rejected == (
        RejectedKey(
            1, "k1", "EC curve 'secp256k1' is not allowed (RFC 7518 §3.4: P-256, P-384 or P-521)"
        ),
    )
    assert keys.find("k1") is None


def test_okp_keys_ed25519_verifies_x25519_is_rejected() -> None:
    ed = OKPKey.generate_key("Ed25519", private=True)
    x = OKPKey.generate_key("X25519", private=True)
    keys = parse_jwks(jwks_bytes(jwk(ed, "ed", "Ed25519"), jwk(x, "x")), ANY_ALG)
    assert keys.rejected == (
        RejectedKey(
            1, "x", "OKP curve 'X25519' is not a signature curve (RFC 8037 §3.1: Ed25519 or Ed448)"
        ),
    )
    token = jose_jwt.encode(
        {"alg": "Ed25519", "kid": "ed"}, TestIssuer().claims(NOW), ed, algorithms=["Ed25519"]
    )
    assert check(token, keys).username == "alice@example.com"


def _key(kind: str) -> Key:
    if kind == "RSA":
        return RSAKey.generate_key(2048, private=True)
    if kind == "Ed448":
        return OKPKey.generate_key("Ed448", private=True)
    return ECKey.generate_key(kind, private=True)


@pytest.mark.parametrize(
    ("kind", "alg", "expected"),
    [
        ("RSA", "ES256", f"alg 'ES256' does not fit an RSA key (it takes {RSA_ALGS})"),
        ("P-256", "ES384", "alg 'ES384' does not fit an EC P-256 key (it takes ES256)"),
        ("P-384", "ES256", "alg 'ES256' does not fit an EC P-384 key (it takes ES384)"),
        ("P-256", "RS256", "alg 'RS256' does not fit an EC P-256 key (it takes ES256)"),
        ("P-256", "EdDSA", "alg 'EdDSA' does not fit an EC P-256 key (it takes ES256)"),
        ("RSA", "EdDSA", f"alg 'EdDSA' does not fit an RSA key (it takes {RSA_ALGS})"),
        ("Ed448", "Ed25519", "alg 'Ed25519' does not fit an OKP Ed448 key (it takes EdDSA)"),
        ("RSA", "HS256", "alg 'HS256' is not an asymmetric signature algorithm proxyd accepts"),
        ("RSA", "none", "alg 'none' is not an asymmetric signature algorithm proxyd accepts"),
        ("RSA", 256, "alg is a number, not a string (RFC 7517 §4.4)"),
    ],
)
def test_alg_that_does_not_fit_the_key_is_rejected(kind: str, alg: object, expected: str) -> None:
    good = ECKey.generate_key("P-256", private=True)
    raw = jwks_bytes(jwk(good, "good", "ES256"), {**jwk(_key(kind), "bad"), "alg": alg})
    keys = parse_jwks(raw, ANY_ALG)
    [rejected] = keys.rejected
    assert (rejected.index, rejected.kid) == (1, "bad")
    assert rejected.reason.startswith(expected), rejected.reason
    assert keys.find("bad") is None


def test_rs256_token_of_a_key_published_as_es256_is_not_accepted() -> None:
    issuer = TestIssuer()
    issuer.add_key("ec", "ES256")
    issuer.add_key("rsa", "RS256")
    issuer.published_alg["rsa"] = "ES256"  # the JWKS says ES256 for an RSA key
    keys = keyset_of(issuer)
    assert [r.kid for r in keys.rejected] == ["rsa"]
    assert reason(issuer.token(NOW, kid="rsa"), keys) == "unknown_kid"


def test_invalid_key_is_rejected_without_quoting_it() -> None:
    good = ECKey.generate_key("P-256", private=True)
    off_curve = {**jwk(good, "bad", "ES256"), "y": jwk(ECKey.generate_key("P-256"), "x")["y"]}
    keys = parse_jwks(jwks_bytes(jwk(good, "good", "ES256"), off_curve), ANY_ALG)
    assert keys.rejected == (RejectedKey(1, "bad", "not a valid EC public key"),)


def test_keys_not_for_signature_verification_are_skipped_silently() -> None:
    good = ECKey.generate_key("P-256", private=True)
    weak = weak_rsa_key(512)
    x25519 = OKPKey.generate_key("X25519", private=True)
    raw = jwks_bytes(
        jwk(good, "good", "ES256"),
        jwk(weak, "enc-weak", use="enc"),  # an encryption key: not ours to judge
        jwk(RSAKey.generate_key(2048), "oaep", "RSA-OAEP-256"),  # no "use", but a JWE alg
        jwk(x25519, "ecdh", "ECDH-ES+A128KW"),
        {"kty": "oct", "k": b64url(b"a shared secret"), "kid": "hmac"},
        "not a key",
    )
    keys = parse_jwks(raw, ANY_ALG)
    assert keys.rejected == ()
    assert list(keys.by_kid) == ["good"]


# --- issuer and audience -----------------------------------------------------------------------


def test_wrong_issuer(idp: TestIssuer) -> None:
    assert reason(idp.token(NOW, iss="https://evil.test"), keyset_of(idp)) == "wrong_issuer"
    assert reason(idp.token(NOW, iss=None), keyset_of(idp)) == "wrong_issuer"
    # Exact match: no trailing-slash or case folding.
    assert reason(idp.token(NOW, iss=ISSUER + "/"), keyset_of(idp)) == "wrong_issuer"


@pytest.mark.parametrize("aud", ["someone-else", ["a", "b"], [], None, 42])
def test_wrong_audience(idp: TestIssuer, aud: object) -> None:
    assert reason(idp.token(NOW, aud=aud), keyset_of(idp)) == "wrong_audience"


def test_audience_list_containing_ours_accepted(idp: TestIssuer) -> None:
    token = idp.token(NOW, aud=["other", AUDIENCE])
    assert check(token, keyset_of(idp)).username == "alice@example.com"


# --- time claims -------------------------------------------------------------------------------


def test_expiry_leeway_boundary(idp: TestIssuer) -> None:
    token = idp.token(NOW, exp=int(NOW) + 100)
    keys = keyset_of(idp)
    assert check(token, keys, now=NOW + 100).username  # at exp
    assert check(token, keys, now=NOW + 159).username  # inside the 60 s leeway
    assert reason(token, keys, now=NOW + 160) == "expired"  # leeway used up
    assert reason(token, keys, now=NOW + 1000) == "expired"


def test_expired_with_custom_leeway(idp: TestIssuer) -> None:
    token = idp.token(NOW, exp=int(NOW) + 100)
    assert reason(token, keyset_of(idp), settings(leeway=0.0), now=NOW + 100) == "expired"
    assert check(token, keyset_of(idp), settings(leeway=0.0), now=NOW + 99).username


def test_not_yet_valid(idp: TestIssuer) -> None:
    keys = keyset_of(idp)
    assert check(idp.token(NOW, nbf=int(NOW) + 60), keys).username
    assert reason(idp.token(NOW, nbf=int(NOW) + 61), keys) == "not_yet_valid"


def test_issued_in_future(idp: TestIssuer) -> None:
    keys = keyset_of(idp)
    assert check(idp.token(NOW, iat=int(NOW) + 60), keys).username
    assert reason(idp.token(NOW, iat=int(NOW) + 61), keys) == "issued_in_future"


def test_too_old_default_30m(idp: TestIssuer) -> None:
    keys = keyset_of(idp)
    assert check(idp.token(NOW, iat=int(NOW) - 1800), keys).username
    assert reason(idp.token(NOW, iat=int(NOW) - 1801), keys) == "too_old"


def test_too_old_custom_max_token_age(idp: TestIssuer) -> None:
    token = idp.token(NOW, iat=int(NOW) - 61)
    assert check(token, keyset_of(idp)).username
    assert reason(token, keyset_of(idp), settings(max_token_age=60.0)) == "too_old"


def test_missing_exp_and_iat(idp: TestIssuer) -> None:
    assert reason(idp.token(NOW, exp=None), keyset_of(idp)) == "missing_exp"
    assert reason(idp.token(NOW, iat=None), keyset_of(idp)) == "missing_iat"


@pytest.mark.parametrize("exp", ["soon", True, [1], {"t": 1}])
def test_non_numeric_exp(idp: TestIssuer, exp: object) -> None:
    assert reason(idp.token(NOW, exp=exp), keyset_of(idp)) == "invalid_exp"


@pytest.mark.parametrize("exp", [float("inf"), float("nan"), 10**400], ids=["inf", "nan", "huge"])
def test_non_finite_or_huge_exp_rejected(idp: TestIssuer, exp: object) -> None:
    # NaN compares false with everything: such a token would never expire.
    assert reason(idp.token(NOW, exp=exp), keyset_of(idp)) == "invalid_exp"


def test_non_numeric_nbf_and_iat(idp: TestIssuer) -> None:
    assert reason(idp.token(NOW, nbf="later"), keyset_of(idp)) == "invalid_nbf"
    assert reason(idp.token(NOW, iat="now"), keyset_of(idp)) == "invalid_iat"


# --- username claim ----------------------------------------------------------------------------


@pytest.mark.parametrize("email", [None, "", "   ", 42, ["alice@example.com"]])
def test_username_claim_must_be_non_empty_string(idp: TestIssuer, email: object) -> None:
    assert reason(idp.token(NOW, email=email), keyset_of(idp)) == "missing_username_claim"


# --- claims kept with the session --------------------------------------------------------------


def test_kept_claims_are_scalars_and_string_lists() -> None:
    kept, dropped = kept_claims(
        {"sub": "u", "n": 3, "ok": True, "groups": ["a", "b"], "nested": {"x": 1}, "mixed": [1]}
    )
    assert kept == {"sub": "u", "n": 3, "ok": True, "groups": ["a", "b"]}
    assert dropped == frozenset()  # unusable shapes are not "dropped for size"


def test_kept_claims_are_bounded() -> None:
    claims: dict[str, Any] = {"huge": "x" * 10_000, "groups": ["admins"]}
    claims.update({f"c{i}": "y" * 100 for i in range(200)})
    kept, dropped = kept_claims(claims)
    assert "huge" not in kept and "huge" in dropped
    assert len(json.dumps(kept)) <= MAX_KEPT_CLAIMS_BYTES
    assert 0 < len(kept) < len(claims)
    assert kept["groups"] == ["admins"]  # one oversized claim does not starve the rest


# --- RFC 8707 audiences, scopes, username claims (issue 12) ------------------------------------

RESOURCE_A = "https://mcp.example.com/mcp/apps/a"
RESOURCE_B = "https://mcp.example.com/mcp/apps/b"


def check_for(raw: str, keys: KeySet, cfg: JwtSettings, resource: str | None) -> Identity:
    return verify(peek(raw), keys, cfg, "test-idp", NOW, resource)


def test_audience_list_any_of_them_accepted(idp: TestIssuer) -> None:
    cfg = settings(audience=("first", "second"))
    assert check(idp.token(NOW, aud="second"), keyset_of(idp), cfg).username
    assert check(idp.token(NOW, aud=["x", "first"]), keyset_of(idp), cfg).username
    assert reason(idp.token(NOW, aud=AUDIENCE), keyset_of(idp), cfg) == "wrong_audience"


def test_resource_url_accepted_as_audience_for_its_app_only(idp: TestIssuer) -> None:
    keys = keyset_of(idp)
    for aud in (RESOURCE_A, [RESOURCE_A], ["other", RESOURCE_A]):
        token = idp.token(NOW, aud=aud)
        assert check_for(token, keys, SETTINGS, RESOURCE_A).username == "alice@example.com"
        with pytest.raises(InvalidToken) as exc:
            check_for(token, keys, SETTINGS, RESOURCE_B)  # app A's token on app B
        assert exc.value.reason == "wrong_audience"
        # Without a resource (no request context) only configured audiences count.
        assert reason(token, keys) == "wrong_audience"


def test_resource_audience_exact_match(idp: TestIssuer) -> None:
    keys = keyset_of(idp)
    for aud in (RESOURCE_A + "/", RESOURCE_A.upper(), "https://mcp.example.com/mcp/apps"):
        with pytest.raises(InvalidToken):
            check_for(idp.token(NOW, aud=aud), keys, SETTINGS, RESOURCE_A)


def test_resource_audience_off_accepts_configured_audiences_only(idp: TestIssuer) -> None:
    cfg = settings(resource_audience=False)
    keys = keyset_of(idp)
    with pytest.raises(InvalidToken) as exc:
        check_for(idp.token(NOW, aud=RESOURCE_A), keys, cfg, RESOURCE_A)
    assert exc.value.reason == "wrong_audience"
    assert check_for(idp.token(NOW), keys, cfg, RESOURCE_A).username


def test_no_configured_audience_accepts_the_resource_url_only(idp: TestIssuer) -> None:
    cfg = settings(audience=())
    keys = keyset_of(idp)
    assert check_for(idp.token(NOW, aud=RESOURCE_A), keys, cfg, RESOURCE_A).username
    with pytest.raises(InvalidToken):
        check_for(idp.token(NOW), keys, cfg, RESOURCE_A)  # aud = "proxyd"


def test_username_claims_tried_in_order(idp: TestIssuer) -> None:
    cfg = settings(username_claim=("email", "preferred_username", "sub"))
    keys = keyset_of(idp)
    identity = check(idp.token(NOW), keys, cfg)
    assert (identity.username, identity.username_claim) == ("alice@example.com", "email")
    # Empty and non-string values are skipped, not accepted.
    token = idp.token(NOW, email="", preferred_username=["x"], sub="svc-123")
    identity = check(token, keys, cfg)
    assert (identity.username, identity.username_claim) == ("svc-123", "sub")
    token = idp.token(NOW, email=None, preferred_username="alice")
    assert check(token, keys, cfg).username_claim == "preferred_username"
    token = idp.token(NOW, email=None, sub=None)
    assert reason(token, keys, cfg) == "missing_username_claim"


def test_client_credentials_token_with_the_example_default(idp: TestIssuer) -> None:
    """A machine client's token: no email, no preferred_username; sub is its client id."""
    cfg = settings(username_claim=("email", "preferred_username", "sub"))
    token = idp.token(NOW, email=None, sub="reporting-bot", client_id="reporting-bot")
    identity = check(token, keyset_of(idp), cfg)
    assert (identity.username, identity.username_claim) == ("reporting-bot", "sub")
    # The code default stays `email`: such a token is refused without the list.
    assert reason(token, keyset_of(idp)) == "missing_username_claim"


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": "mcp tools.read"},
        {"scope": "openid  mcp tools.read "},  # repeated and trailing spaces
        {"scp": ["tools.read", "mcp"]},  # Okta
        {"scp": "mcp tools.read"},  # Entra
        {"scope": "mcp", "scp": ["tools.read"]},
    ],
)
def test_required_scopes_held(idp: TestIssuer, claims: dict[str, Any]) -> None:
    cfg = settings(required_scopes=("mcp", "tools.read"))
    assert check(idp.token(NOW, **claims), keyset_of(idp), cfg).username


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"scope": "mcp"},
        {"scope": "mcp tools.readx"},
        {"scope": "MCP TOOLS.READ"},  # scopes are case-sensitive (RFC 6749 §3.3)
        {"scope": 42},
        {"scp": [["mcp"], "tools.read"]},
    ],
)
def test_missing_scope_is_insufficient_scope(idp: TestIssuer, claims: dict[str, Any]) -> None:
    cfg = settings(required_scopes=("mcp", "tools.read"))
    with pytest.raises(InsufficientScope) as exc:
        check(idp.token(NOW, **claims), keyset_of(idp), cfg)
    assert exc.value.status == 403
    assert exc.value.scope == ("mcp", "tools.read")


def test_invalid_token_is_401_before_scopes(idp: TestIssuer) -> None:
    cfg = settings(required_scopes=("mcp",))
    assert reason(idp.token(NOW, aud="other"), keyset_of(idp), cfg) == "wrong_audience"


def test_token_scopes_ignores_what_is_no_scope_token() -> None:
    claims = {"scope": 'a b\r\nSet-Cookie:x "q" c\\d a', "scp": ["e", 5, "f g"]}
    assert token_scopes(claims) == ("a", "e")
