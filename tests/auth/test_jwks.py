"""JWKS fetching and caching (proxyd.auth.jwks) and the Authenticator (proxyd.auth.appauth).

A real JWKS endpoint on 127.0.0.1 and a real aiohttp client; only the monotonic clock is fake.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxyd.auth.appauth import AppAuthStore, Authenticator
from proxyd.auth.jwks import JwksCache, JwksUnavailable, ttl_from_cache_control
from proxyd.auth.jwt import Identity, peek, verify
from proxyd.auth.keys import KeySetError
from proxyd.config import AppAuthConfig, JwksSettings, JwtSettings
from proxyd.errors import InvalidToken, ServiceUnavailable
from proxyd.labels import parse_selector
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import TestIssuer, weak_rsa_key
from tests.kit.proxy import RPC, Client, bearer, config, rpc_error

ANY = frozenset[str]()
SETTINGS = JwksSettings()  # default_ttl 15m, min 1m, max 24h, refetch_interval 30s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


CacheFactory = Callable[..., JwksCache]


@pytest.fixture
async def make_cache(http: aiohttp.ClientSession, clock: FakeClock) -> AsyncIterator[CacheFactory]:
    caches: list[JwksCache] = []

    def factory(**changes: Any) -> JwksCache:
        cache = JwksCache(http, dataclasses.replace(SETTINGS, **changes), clock.monotonic)
        caches.append(cache)
        return cache

    yield factory
    for cache in caches:
        await cache.close()


def jwt_settings(issuer: TestIssuer, **changes: Any) -> JwtSettings:
    base = JwtSettings(
        issuer=issuer.issuer, audience=(issuer.audience,), jwks_url=issuer.url, static_jwks=None
    )
    if isinstance(changes.get("audience"), str):
        changes["audience"] = (changes["audience"],)
    return dataclasses.replace(base, **changes)


async def check(
    cache: JwksCache, issuer: TestIssuer, token: str, clock: FakeClock, algs: frozenset[str] = ANY
) -> Identity:
    unverified = peek(token)
    kid = unverified.header.get("kid")
    keys = await cache.keys(issuer.url, algs, kid)
    return verify(unverified, keys, jwt_settings(issuer), "idp", clock.wall())


async def rejected(cache: JwksCache, issuer: TestIssuer, token: str, clock: FakeClock) -> str:
    with pytest.raises(InvalidToken) as exc:
        await check(cache, issuer, token, clock)
    return exc.value.reason


class ControlledJwks:
    """A JWKS endpoint that holds each answer until released, and can answer in chunks."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.chunked = False
        self.requests = 0
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.server = TestServer(self._app(), host="127.0.0.1")

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.arrived.set()
        await self.release.wait()
        if not self.chunked:
            return web.Response(body=self.body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()  # no Content-Length: the cap must hold while reading
        await resp.prepare(request)
        for start in range(0, len(self.body), 1000):
            await resp.write(self.body[start : start + 1000])
        await resp.write_eof()
        return resp

    @property
    def url(self) -> str:
        return str(self.server.make_url("/jwks.json"))


@pytest.fixture
async def controlled(issuer: TestIssuer) -> AsyncIterator[ControlledJwks]:
    endpoint = ControlledJwks(json.dumps(issuer.jwks()).encode())
    await endpoint.server.start_server()
    yield endpoint
    endpoint.release.set()
    await endpoint.server.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/jwks.json"


# --- caching and single flight -----------------------------------------------------------------


async def test_one_fetch_serves_many_verifications(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    cache = make_cache()
    for _ in range(20):
        identity = await check(cache, issuer, issuer.token(clock.wall()), clock)
        assert identity.username == "alice@example.com"
    assert issuer.fetches == 1
    assert cache.fetches == 1


async def test_concurrent_callers_share_one_fetch(
    issuer: TestIssuer, make_cache: CacheFactory
) -> None:
    cache = make_cache()
    results = await asyncio.gather(*(cache.keys(issuer.url, ANY, "k1") for _ in range(50)))
    assert issuer.fetches == 1
    assert all(keys is results[0] for keys in results)
    assert results[0].find("k1") is not None


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(
    controlled: ControlledJwks, make_cache: CacheFactory
) -> None:
    cache = make_cache()
    first = asyncio.create_task(cache.keys(controlled.url, ANY, "k1"))
    second = asyncio.create_task(cache.keys(controlled.url, ANY, "k1"))
    await controlled.arrived.wait()  # the fetch is in flight, both callers wait on it
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    controlled.release.set()
    keys = await second
    assert keys.find("k1") is not None
    assert controlled.requests == 1
    # The completed fetch filled the cache: no second request.
    assert (await cache.keys(controlled.url, ANY, "k1")) is keys
    assert controlled.requests == 1


# --- key rotation (unknown kid) ----------------------------------------------------------------


async def test_unknown_kid_refetches_and_accepts_rotated_key(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    cache = make_cache()
    assert await check(cache, issuer, issuer.token(clock.wall()), clock)
    clock.advance(SETTINGS.refetch_interval)  # well inside the 600 s TTL
    issuer.add_key("k2")
    identity = await check(cache, issuer, issuer.token(clock.wall(), kid="k2"), clock)
    assert identity.username == "alice@example.com"
    assert issuer.fetches == 2
    # The old key still works from the same (new) key set, without another fetch.
    assert await check(cache, issuer, issuer.token(clock.wall(), kid="k1"), clock)
    assert issuer.fetches == 2


async def test_unknown_kid_refetch_is_rate_limited(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    cache = make_cache()
    assert await check(cache, issuer, issuer.token(clock.wall()), clock)
    clock.advance(SETTINGS.refetch_interval)
    issuer.add_key("k2")
    assert await check(cache, issuer, issuer.token(clock.wall(), kid="k2"), clock)
    assert issuer.fetches == 2

    issuer.add_key("k3")
    clock.advance(SETTINGS.refetch_interval - 1)
    for _ in range(10):  # a flood of unknown kids within the interval: no fetch at all
        token = issuer.token(clock.wall(), kid="k3")
        assert await rejected(cache, issuer, token, clock) == "unknown_kid"
    assert issuer.fetches == 2

    clock.advance(1)  # the interval has passed: the next unknown kid fetches again
    assert await check(cache, issuer, issuer.token(clock.wall(), kid="k3"), clock)
    assert issuer.fetches == 3


async def test_forged_kid_after_interval_costs_one_fetch_per_interval(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    cache = make_cache()
    await cache.keys(issuer.url, ANY, "k1")
    clock.advance(SETTINGS.refetch_interval)
    await asyncio.gather(*(cache.keys(issuer.url, ANY, f"forged-{i}") for i in range(20)))
    assert issuer.fetches == 2


# --- TTL from Cache-Control --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "ttl"),
    [
        (None, SETTINGS.default_ttl),
        ("", SETTINGS.default_ttl),
        ("public", SETTINGS.default_ttl),
        ("max-age=300", 300.0),
        ("public, max-age=300", 300.0),
        ("MAX-AGE=300, must-revalidate", 300.0),
        ('max-age="300"', 300.0),
        ("s-maxage=300", SETTINGS.default_ttl),  # shared-cache directive, not ours
        ("max-age=0", SETTINGS.min_ttl),
        ("max-age=5", SETTINGS.min_ttl),
        ("max-age=999999999", SETTINGS.max_ttl),
        ("no-store", SETTINGS.min_ttl),
        ("no-cache, max-age=300", SETTINGS.min_ttl),
        ("private, no-store", SETTINGS.min_ttl),
    ],
)
def test_ttl_from_cache_control(header: str | None, ttl: float) -> None:
    assert ttl_from_cache_control(header, SETTINGS) == ttl


@pytest.mark.parametrize(
    ("cache_control", "expected_ttl"),
    [
        ("max-age=120", 120.0),  # honoured
        ("max-age=5", 60.0),  # clamped up to min_ttl
        ("max-age=100000", 3600.0),  # clamped down to max_ttl
        (None, 900.0),  # default_ttl
    ],
)
async def test_cache_control_drives_refetch(
    issuer: TestIssuer,
    make_cache: CacheFactory,
    clock: FakeClock,
    cache_control: str | None,
    expected_ttl: float,
) -> None:
    issuer.behaviour.cache_control = cache_control
    cache = make_cache(max_ttl=3600.0)
    await cache.keys(issuer.url, ANY, "k1")
    clock.advance(expected_ttl - 1)
    await cache.keys(issuer.url, ANY, "k1")
    assert issuer.fetches == 1
    clock.advance(1)
    await cache.keys(issuer.url, ANY, "k1")
    assert issuer.fetches == 2


# --- failures ----------------------------------------------------------------------------------


def weak_only_jwks(bits: int = 512) -> bytes:
    """A JWKS whose only key is a (valid, but) weak RSA key: RFC 7518 §3.3 needs 2048 bits."""
    entry = {**weak_rsa_key(bits).as_dict(private=False), "kid": "weak", "alg": "RS256"}
    return json.dumps({"keys": [entry]}).encode()


TOO_SMALL = "RSA key of {bits} bits is too small (RFC 7518 §3.3 requires at least 2048)"


@pytest.mark.parametrize("failure", ["down", "http_500", "invalid_json", "no_keys", "weak_key"])
async def test_failure_after_good_fetch_keeps_serving_cached_keys(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock, logs: LogCapture, failure: str
) -> None:
    cache = make_cache()
    assert await check(cache, issuer, issuer.token(clock.wall()), clock)
    if failure == "down":
        issuer.behaviour.down = True
    elif failure == "http_500":
        issuer.behaviour.status = 500
    elif failure == "invalid_json":
        issuer.behaviour.body = b"<html>maintenance</html>"
    elif failure == "weak_key":
        issuer.behaviour.body = weak_only_jwks()
    else:
        issuer.behaviour.body = b'{"keys": []}'
    clock.advance(600)  # the cached set expired: the next call refetches and fails

    # (cache.fetches counts attempts: aiohttp retries a dropped keep-alive connection once, so
    # the server may see two requests for one attempt.)
    identity = await check(cache, issuer, issuer.token(clock.wall()), clock)
    assert identity.username == "alice@example.com"
    assert cache.fetches == 2
    [event] = logs.events("jwks_fetch_failed")
    assert event["url"] == issuer.url
    assert event["serving_cached"] is True

    # The failure is not retried on every request, only after refetch_interval.
    clock.advance(SETTINGS.refetch_interval - 1)
    assert await check(cache, issuer, issuer.token(clock.wall()), clock)
    assert cache.fetches == 2
    # Then the IdP is back and the next fetch succeeds.
    issuer.behaviour = type(issuer.behaviour)()
    clock.advance(1)
    assert await check(cache, issuer, issuer.token(clock.wall()), clock)
    assert cache.fetches == 3
    assert len(logs.events("jwks_fetch_failed")) == 1


@pytest.mark.parametrize(
    "failure", ["down", "http_500", "http_404", "invalid_json", "refused", "weak_key"]
)
async def test_unavailable_from_the_start(
    issuer: TestIssuer, make_cache: CacheFactory, logs: LogCapture, failure: str
) -> None:
    url = issuer.url
    if failure == "down":
        issuer.behaviour.down = True
    elif failure == "http_500":
        issuer.behaviour.status = 500
    elif failure == "http_404":
        issuer.behaviour.status = 404
    elif failure == "invalid_json":
        issuer.behaviour.body = b'{"keys": '
    elif failure == "weak_key":
        issuer.behaviour.body = weak_only_jwks()
    else:
        url = closed_port_url()
    cache = make_cache()
    with pytest.raises(JwksUnavailable):
        await cache.keys(url, ANY, "k1")
    [event] = logs.events("jwks_fetch_failed")
    assert event["serving_cached"] is False


@pytest.mark.parametrize("body", [b"[]", b'{"keys": {}}', b'"keys"', b'{"keys": ' * 4000])
async def test_structurally_invalid_jwks_rejected(
    issuer: TestIssuer, make_cache: CacheFactory, body: bytes
) -> None:
    issuer.behaviour.body = body
    with pytest.raises(JwksUnavailable):
        await make_cache().keys(issuer.url, ANY, "k1")


async def test_oversized_jwks_rejected(
    issuer: TestIssuer, make_cache: CacheFactory, logs: LogCapture
) -> None:
    jwks = issuer.jwks()
    jwks["padding"] = "x" * 5000
    issuer.behaviour.body = json.dumps(jwks).encode()
    with pytest.raises(JwksUnavailable):
        await make_cache(max_size=4096).keys(issuer.url, ANY, "k1")
    [event] = logs.events("jwks_fetch_failed")
    assert "larger than 4096 bytes" in event["error"]
    # The same document is fine under the default cap.
    assert (await make_cache().keys(issuer.url, ANY, "k1")).find("k1") is not None


async def test_oversized_chunked_jwks_rejected(
    issuer: TestIssuer, controlled: ControlledJwks, make_cache: CacheFactory, logs: LogCapture
) -> None:
    jwks = issuer.jwks()
    jwks["padding"] = "x" * 5000
    controlled.body = json.dumps(jwks).encode()
    controlled.chunked = True
    controlled.release.set()
    with pytest.raises(JwksUnavailable):
        await make_cache(max_size=4096).keys(controlled.url, ANY, "k1")
    [event] = logs.events("jwks_fetch_failed")
    assert "larger than 4096 bytes" in event["error"]
    assert (await make_cache().keys(controlled.url, ANY, "k1")).find("k1") is not None


async def test_keys_without_alg_usable_with_configured_algorithms(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    # Entra ID and others publish keys without "alg"; the config's `algorithms` makes them usable.
    issuer.behaviour.body = json.dumps(issuer.jwks(with_alg=False)).encode()
    cache = make_cache()
    token = issuer.token(clock.wall())
    identity = await check(cache, issuer, token, clock, frozenset({"ES256"}))
    assert identity.username == "alice@example.com"
    with pytest.raises(JwksUnavailable):  # a config without `algorithms` has no usable key
        await cache.keys(issuer.url, ANY, "k1")
    assert issuer.fetches == 1


# --- Authenticator -----------------------------------------------------------------------------


def auth_config(
    name: str, jwt: JwtSettings, labels: dict[str, object] | None = None
) -> AppAuthConfig:
    return AppAuthConfig(name=name, app_labels=parse_selector(labels or {"env": "test"}), jwt=jwt)


def authenticator(cache: JwksCache, clock: FakeClock, *configs: AppAuthConfig) -> Authenticator:
    return Authenticator(AppAuthStore(configs), cache, clock.wall)


APP_LABELS = {"env": "test"}


async def test_configs_tried_in_name_order_until_one_verifies(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    auth = authenticator(
        make_cache(),
        clock,
        auth_config("b-second", jwt_settings(issuer, audience="second-aud")),
        auth_config("a-first", jwt_settings(issuer, audience="first-aud")),
    )
    now = clock.wall()
    first = await auth.authenticate("app", APP_LABELS, issuer.token(now, aud="first-aud"))
    second = await auth.authenticate("app", APP_LABELS, issuer.token(now, aud="second-aud"))
    assert first.config == "a-first"
    assert second.config == "b-second"
    assert issuer.fetches == 1  # both configs share the URL's cache entry

    with pytest.raises(InvalidToken) as exc:
        await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall(), aud="third-aud"))
    assert exc.value.reason == "wrong_audience"


async def test_first_config_by_name_wins_when_several_verify(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    auth = authenticator(
        make_cache(),
        clock,
        auth_config("zeta", jwt_settings(issuer)),
        auth_config("alpha", jwt_settings(issuer)),
        auth_config("mid", jwt_settings(issuer)),
    )
    identity = await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall()))
    assert identity.config == "alpha"


async def test_only_configs_matching_app_labels_apply(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    auth = authenticator(
        make_cache(),
        clock,
        auth_config("prod-only", jwt_settings(issuer), {"env": "prod"}),
        auth_config("test-only", jwt_settings(issuer), {"env": "test"}),
    )
    identity = await auth.authenticate("app", {"env": "test"}, issuer.token(clock.wall()))
    assert identity.config == "test-only"
    with pytest.raises(InvalidToken) as exc:
        await auth.authenticate("app", {"env": "staging"}, issuer.token(clock.wall()))
    assert exc.value.reason == "no_matching_config"
    with pytest.raises(InvalidToken) as exc:
        await auth.authenticate("app", {}, issuer.token(clock.wall()))
    assert exc.value.reason == "no_matching_config"


async def test_issuer_of_no_config_is_wrong_issuer_without_fetching(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    auth = authenticator(make_cache(), clock, auth_config("idp", jwt_settings(issuer)))
    with pytest.raises(InvalidToken) as exc:
        await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall(), iss="https://other"))
    assert exc.value.reason == "wrong_issuer"
    assert issuer.fetches == 0  # the issuer pre-filter spares the key fetch


async def test_jwks_unavailable_is_503(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    issuer.behaviour.down = True
    auth = authenticator(make_cache(), clock, auth_config("idp", jwt_settings(issuer)))
    with pytest.raises(ServiceUnavailable) as exc:
        await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall()))
    assert exc.value.status == 503
    assert exc.value.reason == "jwks_unavailable"


async def test_static_jwks_config_needs_no_fetch(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    static = jwt_settings(issuer, jwks_url=None, static_jwks=json.dumps(issuer.jwks()))
    auth = authenticator(make_cache(), clock, auth_config("static", static))
    identity = await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall()))
    assert identity.config == "static"
    assert issuer.fetches == 0
    forged = issuer.hmac_with_public_key(clock.wall(), "k1")
    with pytest.raises(InvalidToken) as exc:
        await auth.authenticate("app", APP_LABELS, forged)
    assert exc.value.reason == "alg_not_allowed"


async def test_never_fetched_and_down_backs_off_then_recovers(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    """An IdP that is down from the start is asked once per refetch_interval, not per token."""
    issuer.behaviour.down = True
    cache = make_cache()
    with pytest.raises(JwksUnavailable):
        await cache.keys(issuer.url, ANY, "k1")
    for _ in range(5):
        with pytest.raises(JwksUnavailable):
            await cache.keys(issuer.url, ANY, "k1")
    assert cache.fetches == 1
    issuer.behaviour.down = False
    clock.advance(SETTINGS.refetch_interval)
    identity = await check(cache, issuer, issuer.token(clock.wall()), clock)
    assert identity.username == "alice@example.com"
    assert cache.fetches == 2


async def test_unverifiable_config_makes_503_even_if_another_rejected(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock
) -> None:
    """Config "a" rejects the token (audience); config "b" might accept it but its keys are
    unreachable: the answer is "try again" (503), not a definitive 401."""
    static = jwt_settings(
        issuer, jwks_url=None, static_jwks=json.dumps(issuer.jwks()), audience="other"
    )
    auth = authenticator(
        make_cache(),
        clock,
        auth_config("a", static),
        auth_config("b", jwt_settings(issuer, jwks_url=closed_port_url())),
    )
    with pytest.raises(ServiceUnavailable) as exc:
        await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall()))
    assert exc.value.reason == "jwks_unavailable"


# --- weak and ill-fitting keys (RFC 7518 §3.3, §3.4) -------------------------------------------


@pytest.mark.parametrize("bits", [512, 1024])
async def test_weak_key_in_fetched_jwks_dropped_with_one_log_line(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock, logs: LogCapture, bits: int
) -> None:
    issuer.add_key("weak", "RS256", bits=bits)
    cache = make_cache()
    keys = await cache.keys(issuer.url, ANY, "weak")  # unknown kid: at most one refetch
    assert keys.find("weak") is None
    assert keys.find("k1") is not None
    assert await rejected(cache, issuer, issuer.token(clock.wall(), kid="weak"), clock) == (
        "unknown_kid"
    )
    assert await check(cache, issuer, issuer.token(clock.wall()), clock)
    [event] = logs.events("jwks_key_rejected")
    assert event["url"] == issuer.url
    assert event["kid"] == "weak"
    assert event["index"] == 1
    assert event["reason"] == TOO_SMALL.format(bits=bits)
    assert event["level"] == "warning"
    assert not logs.events("jwks_fetch_failed")  # the other key keeps the JWKS usable
    # The same document fetched again (TTL) is not logged again; key material never is.
    clock.advance(600)
    await cache.keys(issuer.url, ANY, "k1")
    assert issuer.fetches == 2
    assert len(logs.events("jwks_key_rejected")) == 1
    modulus = str(issuer.keys["weak"][0].as_dict(private=False)["n"])
    assert modulus not in logs.text()


async def test_rsa_2048_key_in_fetched_jwks_is_used(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock, logs: LogCapture
) -> None:
    issuer.add_key("rsa", "RS256", bits=2048)
    cache = make_cache()
    identity = await check(cache, issuer, issuer.token(clock.wall(), kid="rsa"), clock)
    assert identity.username == "alice@example.com"
    assert not logs.events("jwks_key_rejected")


async def test_weak_only_jwks_is_unavailable_and_logged_once_per_document(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock, logs: LogCapture
) -> None:
    issuer.behaviour.body = weak_only_jwks()
    cache = make_cache()
    with pytest.raises(JwksUnavailable) as exc:
        await cache.keys(issuer.url, ANY, "weak")
    assert "no usable signing key (1 rejected)" in str(exc.value)
    clock.advance(SETTINGS.refetch_interval)
    with pytest.raises(JwksUnavailable):
        await cache.keys(issuer.url, ANY, "weak")
    assert cache.fetches == 2
    # Every failed fetch is logged, the rejected key only when the document is new to us.
    assert [e["serving_cached"] for e in logs.events("jwks_fetch_failed")] == [False, False]
    assert "no usable signing key (1 rejected)" in logs.events("jwks_fetch_failed")[0]["error"]
    [event] = logs.events("jwks_key_rejected")
    assert (event["kid"], event["reason"]) == ("weak", TOO_SMALL.format(bits=512))


@pytest.mark.parametrize(
    ("alg", "published", "reason"),
    [
        ("ES256K", "ES256K", "EC curve 'secp256k1' is not allowed"),
        ("ES256K", "ES256", "EC curve 'secp256k1' is not allowed"),
        ("ES256K", None, "EC curve 'secp256k1' is not allowed"),
        ("RS256", "ES256", "alg 'ES256' does not fit an RSA key"),
        ("ES256", "ES384", "alg 'ES384' does not fit an EC P-256 key (it takes ES256)"),
        ("ES256", "RS256", "alg 'RS256' does not fit an EC P-256 key (it takes ES256)"),
    ],
)
async def test_ill_fitting_keys_in_fetched_jwks_are_rejected(
    issuer: TestIssuer,
    make_cache: CacheFactory,
    clock: FakeClock,
    logs: LogCapture,
    alg: str,
    published: str | None,
    reason: str,
) -> None:
    issuer.add_key("bad", alg)
    issuer.published_alg["bad"] = published
    cache = make_cache()
    keys = await cache.keys(issuer.url, frozenset({"ES256", "RS256"}), "bad")
    assert keys.find("bad") is None
    if alg != "ES256K":  # (an ES256K token is refused for its header alone)
        token = issuer.token(clock.wall(), kid="bad")
        assert await rejected(cache, issuer, token, clock) == "unknown_kid"
    [event] = logs.events("jwks_key_rejected")
    assert event["kid"] == "bad"
    assert event["reason"].startswith(reason), event["reason"]
    assert await check(cache, issuer, issuer.token(clock.wall()), clock)  # k1 unaffected


async def test_weak_static_key_logged_once_per_config_version(
    issuer: TestIssuer, make_cache: CacheFactory, clock: FakeClock, logs: LogCapture
) -> None:
    """Config validation refuses it; a store built without validation still drops and logs."""
    issuer.add_key("weak", "RS256", bits=512)
    static = jwt_settings(issuer, jwks_url=None, static_jwks=json.dumps(issuer.jwks()))
    store = AppAuthStore((auth_config("static", static),))
    auth = Authenticator(store, make_cache(), clock.wall)
    [event] = logs.events("jwks_key_rejected")
    assert (event["config"], event["kid"]) == ("static", "weak")
    assert event["reason"] == TOO_SMALL.format(bits=512)
    with pytest.raises(InvalidToken) as exc:
        await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall(), kid="weak"))
    assert exc.value.reason == "unknown_kid"
    assert (await auth.authenticate("app", APP_LABELS, issuer.token(clock.wall()))).config
    store.swap((auth_config("static", static),))  # unchanged: not logged again
    assert len(logs.events("jwks_key_rejected")) == 1
    only_weak = jwt_settings(issuer, jwks_url=None, static_jwks=weak_only_jwks().decode())
    with pytest.raises(KeySetError):
        AppAuthStore((auth_config("weak-only", only_weak),))
    assert logs.events("jwks_key_rejected")[-1]["config"] == "weak-only"


# --- end to end through proxyd -----------------------------------------------------------------


async def proxy_for(
    issuer: TestIssuer, make_proxy: ProxyFactory, upstreams: Upstreams, tmp_path: Path
) -> tuple[Client, Echo]:
    echo = Echo()
    url = await upstreams.start(echo.app())
    return await make_proxy(config(issuer, {"a": url}, tmp_path)), echo


async def post(client: Client, token: str) -> aiohttp.ClientResponse:
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    await resp.read()
    return resp


@pytest.mark.parametrize("bits", [512, 1024])
async def test_proxy_refuses_token_of_weak_idp_key(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    logs: LogCapture,
    tmp_path: Path,
    bits: int,
) -> None:
    """The IdP publishes only a weak RSA key: like an unreachable IdP with nothing cached."""
    issuer.remove_key("k1")
    issuer.add_key("weak", "RS256", bits=bits)
    client, echo = await proxy_for(issuer, make_proxy, upstreams, tmp_path)
    token = issuer.token(clock.wall(), kid="weak")
    body = await rpc_error(await post(client, token), 503)
    assert body["error"]["data"]["reason"] == "jwks_unavailable"
    assert echo.seen == []
    [event] = logs.events("jwks_key_rejected")
    assert (event["kid"], event["url"]) == ("weak", issuer.url)
    assert event["reason"] == TOO_SMALL.format(bits=bits)
    [failed] = logs.events("jwks_fetch_failed")
    assert "no usable signing key" in failed["error"]
    assert str(issuer.keys["weak"][0].as_dict(private=False)["n"]) not in logs.text()


async def test_proxy_refuses_weak_key_token_but_accepts_strong_ones(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    logs: LogCapture,
    tmp_path: Path,
) -> None:
    issuer.add_key("weak", "RS256", bits=512)
    issuer.add_key("rsa", "RS256", bits=2048)
    issuer.add_key("k256", "ES256K")  # secp256k1
    issuer.add_key("mismatch", "RS256")
    issuer.published_alg["mismatch"] = "ES256"
    client, echo = await proxy_for(issuer, make_proxy, upstreams, tmp_path)
    for kid in ("weak", "mismatch"):
        body = await rpc_error(await post(client, issuer.token(clock.wall(), kid=kid)), 401)
        assert body["error"]["data"]["reason"] == "unknown_kid", kid
    # secp256k1 signs as ES256K, which proxyd refuses by the token header already.
    body = await rpc_error(await post(client, issuer.token(clock.wall(), kid="k256")), 401)
    assert body["error"]["data"]["reason"] == "alg_not_allowed"
    assert echo.seen == []
    for kid in ("rsa", "k1"):  # RS256 with 2048 bits, ES256
        assert (await post(client, issuer.token(clock.wall(), kid=kid))).status == 200
    assert len(echo.seen) == 2
    events = {e["kid"]: e["reason"] for e in logs.events("jwks_key_rejected")}
    assert events == {
        "weak": TOO_SMALL.format(bits=512),
        "k256": "EC curve 'secp256k1' is not allowed (RFC 7518 §3.4: P-256, P-384 or P-521)",
        "mismatch": "alg 'ES256' does not fit an RSA key "
        "(it takes RS256, RS384, RS512, PS256, PS384, PS512)",
    }
    assert len(logs.events("jwks_key_rejected")) == 3  # one line each, whatever the traffic
    assert issuer.fetches == 1
