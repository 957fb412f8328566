"""The unauthenticated-request rate limiter and the per-user limit (issue 3, section 1).

Unit tests drive TokenBuckets / Limiter with the fake clock; HTTP tests run proxyd, a real IdP
(JWKS server) and a recording upstream on 127.0.0.1 with real tokens. Only time and randomness
are faked; every wait is on a condition, under a guard.
"""

from __future__ import annotations

import asyncio
import math
import random
import tomllib
import tracemalloc
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey

from proxyd.config import ConfigError, RateLimitSettings, parse_settings
from proxyd.errors import RateLimited
from proxyd.ratelimit import Limiter, TokenBuckets, address_key
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import MINTED, TestIssuer
from tests.kit.limits import RETRY_AFTER_RE, Flood, assert_401, assert_ok, limited, post
from tests.kit.proxy import Client, access_lines, bearer, config
from tests.kit.wait import GUARD, until

PEER = "127.0.0.1"  # every test client connects from here
DEFAULT_BURST = 40  # RateLimitSettings defaults: 20 per minute, burst 40


# --------------------------------------------------------------------------------------------
# Helpers


def limiter(clock: FakeClock, **settings: Any) -> Limiter:
    return Limiter(RateLimitSettings(**settings), clock.monotonic)


def buckets(clock: FakeClock, **settings: Any) -> TokenBuckets:
    return TokenBuckets(RateLimitSettings(**settings), clock.monotonic)


def retry_after(wait: float) -> int:
    """The Retry-After header proxyd would send for ``wait`` seconds."""
    value = RateLimited("slow down", wait).extra_headers()["Retry-After"]
    assert RETRY_AFTER_RE.fullmatch(value), value
    return int(value)


async def proxy(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    **sections: Any,
) -> tuple[Client, Echo]:
    echo = Echo()
    url = await upstreams.start(echo.app())
    client = await make_proxy(config(issuer, {"a": url}, tmp_path, **sections))
    return client, echo


def rogue_token(issuer: TestIssuer, clock: FakeClock, key: ECKey, kid: str) -> str:
    """Signed by a key the IdP never published, under ``kid``."""
    token = jwt.encode(
        {"alg": "ES256", "kid": kid}, issuer.claims(clock.wall()), key, algorithms=["ES256"]
    )
    MINTED.add(token)
    return token


# --------------------------------------------------------------------------------------------
# Unit: token buckets


def test_burst_then_refill_at_average_per_period(clock: FakeClock) -> None:
    b = buckets(clock, average=20, period=60.0, burst=40)
    assert [b.take("k") for _ in range(40)] == [0.0] * 40
    assert b.take("k") == pytest.approx(3.0)  # 20 per minute: one token every 3 s
    clock.advance(2.9)
    assert b.take("k") > 0
    clock.advance(0.1)
    assert b.take("k") == 0.0
    assert b.take("k") > 0
    # One period refills `average` tokens, not the burst.
    clock.advance(60)
    assert [b.take("k") for _ in range(20)] == [0.0] * 20
    assert b.take("k") > 0
    # A long idle time refills up to the burst and no further.
    clock.advance(86400)
    assert [b.take("k") for _ in range(40)] == [0.0] * 40
    assert b.take("k") > 0
    # Keys are independent.
    assert b.take("other") == 0.0


@pytest.mark.parametrize(
    ("average", "period", "burst"), [(20, 60.0, 40), (7, 13.0, 3), (1, 3600.0, 5), (1000, 1.0, 10)]
)
def test_retry_after_is_exact_and_honest(
    average: int, period: float, burst: int, clock: FakeClock
) -> None:
    """Against an exact model: allowed exactly when a whole token is there; the wait is the
    time until it is; Retry-After is that wait rounded up (>= 1) and waiting it always works."""
    b = buckets(clock, average=average, period=period, burst=burst)
    rng = random.Random(average)
    rate = Fraction(average) / Fraction(period)
    tokens = Fraction(burst)
    step = float(1 / rate)
    denied = 0
    for _ in range(3000):
        dt = Fraction(rng.uniform(0, 2 * step) if rng.random() < 0.3 else 0.0)
        clock.advance(float(dt))
        tokens = min(Fraction(burst), tokens + dt * rate)
        exact = (1 - tokens) / rate  # seconds until a whole token; <= 0: one is there
        wait = b.take("k")
        if abs(exact) < Fraction(1, 10**5):
            # A token due right now, give or take float noise: either answer is right.
            tokens = max(Fraction(0), tokens - 1) if wait == 0.0 else tokens
            continue
        if exact < 0:
            assert wait == 0.0
            tokens -= 1
            continue
        denied += 1
        assert wait == pytest.approx(float(exact), rel=1e-6, abs=1e-6)
        seconds = retry_after(wait)
        # Whole seconds rounded up, at least 1; exact when the wait is (nearly) whole.
        nearest = round(exact)
        if abs(exact - nearest) < Fraction(1, 10**5):
            assert seconds == max(1, nearest)
        else:
            assert seconds == max(1, math.ceil(exact))
        if rng.random() < 0.5:
            # Obeying Retry-After is always enough.
            clock.advance(seconds)
            tokens = min(Fraction(burst), tokens + Fraction(seconds) * rate)
            assert b.take("k") == 0.0
            tokens = max(Fraction(0), tokens - 1)
    assert denied > 100  # the scenario did exercise the limit


@pytest.mark.parametrize(
    ("wait", "header"), [(0.0, 1), (1e-9, 1), (0.2, 1), (1.0, 1), (1.01, 2), (2.5, 3), (3.0, 3)]
)
def test_retry_after_header_is_whole_seconds_at_least_one(wait: float, header: int) -> None:
    assert retry_after(wait) == header


def test_idle_buckets_are_forgotten_once_refilled(clock: FakeClock) -> None:
    b = buckets(clock, average=20, period=60.0, burst=40)  # full again after 120 s
    for _ in range(41):
        b.take("a")
    assert b.take("a") > 0
    clock.advance(60)
    b.take("b")
    assert len(b) == 2
    clock.advance(59.9)  # "a" last used 119.9 s ago: not full yet, must be kept
    b.take("b")
    assert len(b) == 2
    clock.advance(0.1)  # 120 s: "a" is full again
    b.take("c")
    assert len(b) == 2  # "a" gone; "b" (used 0.1 s ago) and "c" stay
    # Forgetting changed nothing: "a" has exactly its burst again.
    assert [b.take("a") for _ in range(40)] == [0.0] * 40
    assert b.take("a") > 0
    # Everything idle long enough is forgotten at the next use.
    clock.advance(121)
    b.take("z")
    assert len(b) == 1


def test_memory_stays_bounded_under_100k_distinct_addresses(clock: FakeClock) -> None:
    # Default cap (100k): a flood of 100k distinct IPv4 addresses and 20k distinct IPv6 /64s.
    lim = limiter(clock)
    cap = RateLimitSettings().max_tracked
    for i in range(100_000):
        lim.for_address(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        assert len(lim.buckets) <= cap
    for i in range(20_000):
        lim.for_address(f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1")
        assert len(lim.buckets) <= cap
    assert len(lim.buckets) == cap
    # Spread over time, idle expiry alone keeps far fewer (full after 120 s; 10 ms apart).
    lim = limiter(clock)
    for i in range(30_000):
        clock.advance(0.01)
        lim.for_address(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(lim.buckets) <= 120 / 0.01 + 1
    # A small cap holds at every step, and memory stops growing with it.
    lim = limiter(clock, max_tracked=1000)
    settled = 0
    tracemalloc.start()
    try:
        for i in range(100_000):
            lim.for_address(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
            assert len(lim.buckets) <= 1000
            if i == 5_000:
                settled = tracemalloc.get_traced_memory()[0]
            elif i == 30_000:
                grown = tracemalloc.get_traced_memory()[0] - settled
                tracemalloc.stop()
    finally:
        tracemalloc.stop()
    assert len(lim.buckets) == 1000
    assert grown < 64 * 1024, grown


def test_hard_cap_evicts_the_least_recently_used(clock: FakeClock) -> None:
    b = buckets(clock, average=1, period=3600.0, burst=1, max_tracked=3)
    for key in ("a", "b", "c"):
        assert b.take(key) == 0.0  # each bucket now empty
    assert b.take("a") > 0  # "a" used again: now the most recent
    assert b.take("d") == 0.0  # evicts "b", the least recently used
    assert len(b) == 3
    assert b.take("a") > 0  # kept, with its state
    assert b.take("c") > 0  # kept
    assert b.take("b") == 0.0  # forgotten: a fresh bucket (evicting "d")
    assert b.take("a") > 0 and b.take("c") > 0
    assert len(b) == 3


@pytest.mark.parametrize(
    ("prefix", "same", "different"),
    [
        (
            64,
            ["2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2:0:0:0:9"],
            ["2001:db8:1:3::1", "2001:db8:2:2::1", "::1"],
        ),
        (
            48,
            ["2001:db8:1::1", "2001:db8:1:ffff::1", "2001:db8:1:2:3:4:5:6"],
            ["2001:db8:2::1", "2001:db9:1::1"],
        ),
        (
            128,
            ["2001:db8::1", "2001:DB8:0:0:0:0:0:1", "2001:0db8::0001"],
            ["2001:db8::2", "2001:db8::1:0"],
        ),
    ],
)
def test_ipv6_addresses_are_grouped_by_prefix(
    prefix: int, same: list[str], different: list[str], clock: FakeClock
) -> None:
    assert len({address_key(a, prefix) for a in same}) == 1
    keys = {address_key(a, prefix) for a in [same[0], *different]}
    assert len(keys) == 1 + len(different)
    lim = limiter(clock, average=1, period=3600.0, burst=len(same), ipv6_prefix=prefix)
    for address in same:
        assert lim.for_address(address) == 0.0
    for address in same:
        assert lim.for_address(address) > 0  # the group's burst is spent
    for address in different:
        assert lim.for_address(address) == 0.0


def test_default_ipv6_prefix_is_64(clock: FakeClock) -> None:
    lim = limiter(clock, average=1, period=3600.0, burst=1)
    assert lim.for_address("2001:db8:0:1::a") == 0.0
    assert lim.for_address("2001:db8:0:1:8000::b") > 0
    assert lim.for_address("2001:db8:0:2::a") == 0.0


def test_ipv4_counts_alone_and_ipv4_mapped_ipv6_counts_as_ipv4(clock: FakeClock) -> None:
    assert address_key("::ffff:192.0.2.1", 64) == address_key("192.0.2.1", 64)
    lim = limiter(clock, average=1, period=3600.0, burst=2)
    assert lim.for_address("::ffff:192.0.2.1") == 0.0
    assert lim.for_address("192.0.2.1") == 0.0
    assert lim.for_address("::ffff:c000:201") > 0  # the same address, spelled in hex
    assert lim.for_address("192.0.2.2") == 0.0  # IPv4 is never grouped
    # A mapped address is not lumped into the ::ffff:0:0/64 group of every IPv4 client.
    assert lim.for_address("::ffff:192.0.2.3") == 0.0


def test_disabled_limiter_never_limits(clock: FakeClock) -> None:
    lim = limiter(clock, average=1, period=3600.0, burst=1, enabled=False)
    for _ in range(10_000):
        assert lim.for_address("192.0.2.1") == 0.0
        assert lim.for_user("https://idp", "alice") == 0.0
    assert len(lim.buckets) == 0  # and tracks nothing
    on = limiter(clock, average=1, period=3600.0, burst=1)
    assert on.for_user("https://idp", "alice") == 0.0
    assert on.for_user("https://idp", "alice") > 0
    assert on.for_user("https://idp", "bob") == 0.0
    assert on.for_user("https://other-idp", "alice") == 0.0  # users are per issuer


# --------------------------------------------------------------------------------------------
# HTTP: the unauthenticated limiter in front of token work


@pytest.mark.parametrize("kind", ["forged", "garbage", "no_token", "malformed", "mixed"])
async def test_flood_gets_429_after_burst_while_established_session_keeps_working(
    kind: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, echo = await proxy(issuer, make_proxy, upstreams, tmp_path)
    good = bearer(issuer.token(clock.wall()))
    await assert_ok(client, good)  # a new token: spends one of the 40
    flood = Flood(issuer, clock, kind)
    served = 1
    for _ in range(DEFAULT_BURST - 1):
        await assert_401(client, flood.headers())
        await assert_ok(client, good)
        served += 1
    for _ in range(20):
        await limited(client, flood.headers(), retry=3)  # 20/min: the next token in 3 s
        await assert_ok(client, good)
        served += 1
    for _ in range(30):
        await assert_ok(client, good)
        served += 1
    assert served == 90
    # Even a valid new token from this address waits now: the limiter cannot tell.
    await limited(client, bearer(issuer.token(clock.wall(), jti="late")))
    assert len(echo.seen) == served  # no refused request reached the upstream
    reasons = [line.get("reason") for line in access_lines(logs)]
    assert reasons.count("rate_limited") == 21
    assert [line["status"] for line in access_lines(logs) if line.get("user")] == [200] * served


async def test_limiter_runs_before_any_jwks_work(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """Tokens naming unknown kids would each make proxyd refetch the JWKS (once per
    refetch_interval, 30 s, which the clock passes before every request); past the burst
    they are turned away before any of that."""
    burst = 5
    limits = {"unauthenticated": {"average": 1, "period": "1h", "burst": burst}}
    client, echo = await proxy(issuer, make_proxy, upstreams, tmp_path, limits=limits)
    rogue = ECKey.generate_key("P-256", private=True)

    def token(i: int) -> str:
        if i % 2 == 0:
            return rogue_token(issuer, clock, rogue, f"rotated-{i}")  # unknown kid
        return rogue_token(issuer, clock, rogue, "k1")  # known kid, a different key

    for i in range(burst):
        clock.advance(31)
        await assert_401(client, bearer(token(i)))
    unknown_kids = (burst + 1) // 2
    assert issuer.fetches == unknown_kids  # the setup does cost a fetch per unknown kid
    for i in range(burst, burst + 60):
        clock.advance(31)
        await limited(client, bearer(token(i)))
    assert issuer.fetches == unknown_kids
    assert len(logs.events("auth_rejected")) == burst  # nothing verified past the burst
    assert echo.seen == []


async def test_cached_session_never_spends_unauthenticated_tokens(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, echo = await proxy(issuer, make_proxy, upstreams, tmp_path)
    good = bearer(issuer.token(clock.wall()))
    for _ in range(200):
        await assert_ok(client, good)
    assert len(logs.events("session_created")) == 1
    # Exactly one token was spent (the session's first request): 39 remain.
    flood = Flood(issuer, clock, "garbage")
    for _ in range(DEFAULT_BURST - 1):
        await assert_401(client, flood.headers())
    await limited(client, flood.headers())
    await assert_ok(client, good)
    assert len(echo.seen) == 201


async def test_new_tokens_work_again_after_one_period(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, _ = await proxy(issuer, make_proxy, upstreams, tmp_path)
    n = 0

    def new_token() -> dict[str, str]:
        nonlocal n
        n += 1
        return bearer(issuer.token(clock.wall(), jti=f"t{n}"))

    for _ in range(DEFAULT_BURST):
        await assert_ok(client, new_token())
    await limited(client, new_token(), retry=3)
    clock.advance(2)
    await limited(client, new_token(), retry=1)
    clock.advance(1)  # Retry-After was honest
    await assert_ok(client, new_token())
    await limited(client, new_token(), retry=3)
    clock.advance(60)  # one period: `average` (20) new tokens
    for _ in range(20):
        await assert_ok(client, new_token())
    await limited(client, new_token())
    assert len(logs.events("session_created")) == DEFAULT_BURST + 1 + 20


async def test_disabled_unauthenticated_limiter_never_answers_429(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    limits = {"unauthenticated": {"burst": 1, "enabled": False}}
    client, _ = await proxy(issuer, make_proxy, upstreams, tmp_path, limits=limits)
    flood = Flood(issuer, clock, "mixed")
    for _ in range(60):
        await assert_401(client, flood.headers())
    await assert_ok(client, bearer(issuer.token(clock.wall())))


async def test_x_forwarded_for_from_untrusted_peer_is_ignored(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, _ = await proxy(issuer, make_proxy, upstreams, tmp_path)
    flood = Flood(issuer, clock, "mixed")
    for i in range(DEFAULT_BURST):
        await assert_401(client, {**flood.headers(), "X-Forwarded-For": f"198.51.100.{i}"})
    for i in range(30):
        spoof = f"203.0.113.{i}" if i % 2 else f"2001:db8:{i:x}::1, 192.0.2.{i}"
        await limited(client, {**flood.headers(), "X-Forwarded-For": spoof})
    assert {line["client"] for line in access_lines(logs)} == {PEER}


async def test_x_forwarded_for_from_trusted_peer_gives_each_client_its_bucket(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, _ = await proxy(
        issuer, make_proxy, upstreams, tmp_path, server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    flood = Flood(issuer, clock, "mixed")
    # Many distinct clients behind the proxy, more requests than one burst: none limited.
    for i in range(DEFAULT_BURST + 20):
        await assert_401(client, {**flood.headers(), "X-Forwarded-For": f"198.51.100.{i}"})
    # One client exhausts its own bucket (it already spent one above).
    victim = "192.0.2.7"
    for _ in range(DEFAULT_BURST):
        await assert_401(client, {**flood.headers(), "X-Forwarded-For": victim})
    await limited(client, {**flood.headers(), "X-Forwarded-For": victim})
    # What the client writes itself (left of the trusted hop) does not get it out.
    for i in range(10):
        xff = f"203.0.113.{i}, {victim}"
        await limited(client, {**flood.headers(), "X-Forwarded-For": xff})
    two_lines = [("X-Forwarded-For", "203.0.113.99"), ("X-Forwarded-For", victim)]
    await limited(client, [*two_lines, *flood.headers().items()])
    # Nor does spelling its address as IPv4-mapped IPv6.
    await limited(client, {**flood.headers(), "X-Forwarded-For": f"::ffff:{victim}"})
    # Trusted hops on the right are skipped: the right-most untrusted one is the client.
    await limited(client, {**flood.headers(), "X-Forwarded-For": f"{victim}, 127.0.0.9"})
    # Others are unaffected, the trusted peer itself (no XFF) included.
    await assert_401(client, {**flood.headers(), "X-Forwarded-For": "192.0.2.8"})
    await assert_401(client, flood.headers())
    limited_clients = {
        line["client"] for line in access_lines(logs) if line.get("reason") == "rate_limited"
    }
    assert limited_clients == {victim}  # every spelling is normalized to one address


@pytest.mark.parametrize(
    ("prefix", "group", "outside"),
    [
        (None, "2001:db8:0:1::{i:x}", "2001:db8:0:2::1"),
        (48, "2001:db8:1:{i:x}::1", "2001:db8:2::1"),
        (128, "2001:db8::{i:x}", "2001:db8::1"),
    ],
)
async def test_trusted_x_forwarded_for_groups_ipv6_clients_by_prefix(
    prefix: int | None,
    group: str,
    outside: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    unauth: dict[str, Any] = {"average": 1, "period": "1h", "burst": 5}
    if prefix is not None:
        unauth["ipv6_prefix"] = prefix
    client, _ = await proxy(
        issuer,
        make_proxy,
        upstreams,
        tmp_path,
        server={"trusted_proxies": ["127.0.0.0/8"]},
        limits={"unauthenticated": unauth},
    )
    flood = Flood(issuer, clock, "garbage")
    # /128: one address; otherwise distinct addresses within the group.
    addresses = [group.format(i=0x100 if prefix == 128 else i + 1) for i in range(8)]
    for address in addresses[:5]:
        await assert_401(client, {**flood.headers(), "X-Forwarded-For": address})
    for address in addresses[5:]:
        await limited(client, {**flood.headers(), "X-Forwarded-For": address})
    await assert_401(client, {**flood.headers(), "X-Forwarded-For": outside})


# --------------------------------------------------------------------------------------------
# HTTP: the per-user limit on established sessions


async def test_per_user_limit_is_off_by_default(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, echo = await proxy(issuer, make_proxy, upstreams, tmp_path)
    good = bearer(issuer.token(clock.wall()))
    # More than the per-user default burst (300) would allow if it were on.
    for _ in range(320):
        await assert_ok(client, good)
    assert len(echo.seen) == 320


async def test_per_user_limit_when_configured(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    limits = {"per_user": {"average": 5, "period": "1m", "burst": 5}}
    client, echo = await proxy(issuer, make_proxy, upstreams, tmp_path, limits=limits)
    alice = bearer(issuer.token(clock.wall()))
    bob = bearer(issuer.token(clock.wall(), sub="u-456", email="bob@example.com"))
    await assert_ok(client, alice)  # new sessions
    await assert_ok(client, bob)
    for _ in range(5):
        await assert_ok(client, alice)
    body = await limited(client, alice, retry=12)  # 5/min: one every 12 s
    assert "user" in body["error"]["message"]
    await limited(client, alice)
    # Another user is unaffected, and has a burst of his own.
    for _ in range(5):
        await assert_ok(client, bob)
    await limited(client, bob)
    clock.advance(12)
    await assert_ok(client, alice)
    await limited(client, alice)
    rate_limited = [line for line in access_lines(logs) if line.get("reason") == "rate_limited"]
    assert [line["user"] for line in rate_limited] == [
        "alice@example.com",
        "alice@example.com",
        "bob@example.com",
        "alice@example.com",
    ]
    assert len(echo.seen) == 2 + 5 + 5 + 1


async def test_concurrent_first_requests_share_one_verification_and_one_token(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """60 requests with one new token, all in flight before its verification can finish
    (the JWKS answer is held back until proxyd has dispatched every one): one verification,
    one limiter token, 60 answers — though the burst is 40."""
    gate, hit = asyncio.Event(), asyncio.Event()
    fetches = 0

    async def held_jwks(_: web.Request) -> web.StreamResponse:
        nonlocal fetches
        fetches += 1
        hit.set()
        await gate.wait()
        return web.json_response(issuer.jwks(), headers={"Cache-Control": "max-age=600"})

    jwks_app = web.Application()
    jwks_app.router.add_get("/mcp", held_jwks)
    jwks_url = await upstreams.start(jwks_app)
    echo = Echo()
    doc = config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path)
    doc["app_auth_configs"][0]["jwt"]["jwks_url"] = jwks_url
    client = await make_proxy(doc)
    assert client.server.runner is not None
    server = client.server.runner.server
    assert server is not None
    before = server.requests_count

    good = bearer(issuer.token(clock.wall()))
    tasks = [asyncio.ensure_future(post(client, good)) for _ in range(60)]
    try:
        await asyncio.wait_for(hit.wait(), GUARD)
        await until(lambda: server.requests_count >= before + 60, "60 requests counted", every=0)
        assert not any(task.done() for task in tasks)  # nobody answered yet (no 429s)
        gate.set()
        responses = await asyncio.wait_for(asyncio.gather(*tasks), GUARD)
    finally:
        gate.set()
        for task in tasks:
            task.cancel()
    assert [r.status for r in responses] == [200] * 60
    assert len(logs.events("session_created")) == 1
    assert fetches == 1
    assert len(echo.seen) == 60
    # One limiter token was spent for all 60: 39 remain.
    flood = Flood(issuer, clock, "garbage")
    for _ in range(DEFAULT_BURST - 1):
        await assert_401(client, flood.headers())
    await limited(client, flood.headers())


# --------------------------------------------------------------------------------------------
# Config


def limits_of(text: str) -> Any:
    return parse_settings(tomllib.loads(text)).limits


def test_limit_defaults() -> None:
    limits = limits_of("")
    u = limits.unauthenticated
    assert (u.average, u.period, u.burst, u.enabled, u.ipv6_prefix, u.max_tracked) == (
        20,
        60.0,
        40,
        True,
        64,
        100_000,
    )
    assert limits.per_user.enabled is False


def test_limit_keys_parse() -> None:
    limits = limits_of(
        """
        [limits.unauthenticated]
        average = 5
        period = "30s"
        burst = 7
        enabled = false
        ipv6_prefix = 56
        max_tracked = 1000

        [limits.per_user]
        average = 100
        period = "2m"
        burst = 50
        max_tracked = 500
        """
    )
    u, p = limits.unauthenticated, limits.per_user
    assert (u.average, u.period, u.burst, u.enabled, u.ipv6_prefix, u.max_tracked) == (
        5,
        30.0,
        7,
        False,
        56,
        1000,
    )
    assert (p.average, p.period, p.burst, p.enabled, p.max_tracked) == (100, 120.0, 50, True, 500)


@pytest.mark.parametrize(
    ("text", "enabled"),
    [
        ("", False),
        ("[limits.unauthenticated]\nburst = 10", False),
        ("[limits.per_user]\naverage = 5", True),
        ("[limits.per_user]\nenabled = false\naverage = 5", False),
        ("[limits.per_user]\nenabled = true", True),
        # Writing the section is the way to ask for it, even with every value defaulted.
        ("[limits.per_user]", True),
        ("[limits]\nper_user = {}", True),
    ],
)
def test_per_user_section_present_means_enabled(text: str, enabled: bool) -> None:
    assert limits_of(text).per_user.enabled is enabled


BAD_LIMITS: list[tuple[dict[str, Any], str, str]] = [
    (
        {"unauthenticated": {"ipv6_prefix": 129}},
        "limits.unauthenticated.ipv6_prefix",
        "at most 128",
    ),
    (
        {"unauthenticated": {"ipv6_prefix": 0}},
        "limits.unauthenticated.ipv6_prefix",
        "expected a positive integer",
    ),
    (
        {"unauthenticated": {"average": 0}},
        "limits.unauthenticated.average",
        "expected a positive integer",
    ),
    (
        {"unauthenticated": {"average": -20}},
        "limits.unauthenticated.average",
        "expected a positive integer",
    ),
    (
        {"unauthenticated": {"average": 2.5}},
        "limits.unauthenticated.average",
        "expected a positive integer",
    ),
    (
        {"unauthenticated": {"average": True}},
        "limits.unauthenticated.average",
        "expected a positive integer",
    ),
    (
        {"unauthenticated": {"burst": 0}},
        "limits.unauthenticated.burst",
        "expected a positive integer",
    ),
    (
        {"unauthenticated": {"period": "0s"}},
        "limits.unauthenticated.period",
        "must be greater than zero",
    ),
    ({"unauthenticated": {"period": "soon"}}, "limits.unauthenticated.period", "not a duration"),
    (
        {"unauthenticated": {"max_tracked": 0}},
        "limits.unauthenticated.max_tracked",
        "expected a positive integer",
    ),
    (
        {"unauthenticated": {"enabled": "yes"}},
        "limits.unauthenticated.enabled",
        "expected true or false",
    ),
    ({"unauthenticated": {"rate": 5}}, "limits.unauthenticated.rate", "unknown key"),
    ({"per_user": {"average": -1}}, "limits.per_user.average", "expected a positive integer"),
    ({"per_user": {"ipv6_prefix": 200}}, "limits.per_user.ipv6_prefix", "at most 128"),
    ({"per_user": {"burst": "lots"}}, "limits.per_user.burst", "expected a positive integer"),
    ({"per_user": 5}, "limits.per_user", "expected a table"),
    ({"per_ip": {}}, "limits.per_ip", "unknown key"),
]


@pytest.mark.parametrize(("limits", "path", "message"), BAD_LIMITS)
def test_bad_limit_values_are_reported_with_their_key_paths(
    limits: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"limits": limits})
    assert any(p.startswith(f"{path}: ") and message in p for p in caught.value.problems), (
        caught.value.problems
    )


def test_every_bad_limit_value_is_reported_at_once() -> None:
    doc = {
        "limits": {
            "unauthenticated": {"ipv6_prefix": 129, "average": 0, "period": "0s"},
            "per_user": {"burst": 0, "max_tracked": -1},
        }
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(doc)
    paths = sorted(p.split(":", 1)[0] for p in caught.value.problems)
    assert paths == [
        "limits.per_user.burst",
        "limits.per_user.max_tracked",
        "limits.unauthenticated.average",
        "limits.unauthenticated.ipv6_prefix",
        "limits.unauthenticated.period",
    ]


@pytest.mark.parametrize(
    "hop", ["198.51.100.7:5555", "198.51.100.7:6666", "[198.51.100.7]", " 198.51.100.7 "]
)
def test_forwarded_hop_spellings_are_one_client(hop: str) -> None:
    """A proxy appending source ports must not hand every connection a fresh bucket."""
    from ipaddress import ip_network

    from proxyd.netaddr import client_view

    view = client_view(
        "127.0.0.1",
        xff=hop,
        xfp=None,
        xfh=None,
        scheme="http",
        host="h",
        trusted=[ip_network("127.0.0.0/8")],
    )
    assert view.address == "198.51.100.7"


def test_ipv6_key_is_the_prefix() -> None:
    from proxyd.ratelimit import address_key

    a = address_key("2001:db8:1:2:aaaa::1", 64)
    assert a == address_key("2001:db8:1:2:bbbb::2", 64)
    assert a != address_key("2001:db8:1:3::1", 64)
    assert address_key("2001:db8:1:2::1", 128) != address_key("2001:db8:1:2::2", 128)
