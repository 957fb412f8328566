"""The shared state backend: ``[state] backend = "redis"`` (rate-limit buckets and sessions).

Every test here runs a REAL ``redis-server`` (tests/kit/redisserver.py) and real proxyd instances
(create_app on 127.0.0.1) with a real IdP. Only time and randomness are faked: the fake clock
drives proxyd (sessions, the Redis back-off); Redis's own clock (TIME) runs for real, so the
bucket script is checked against the in-memory TokenBuckets through its test-only clock
argument, and on Redis time by burst, Retry-After bounds and a real refill.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxyd.app import RUNTIME
from proxyd.auth.jwt import Identity
from proxyd.auth.session import Session, session_key
from proxyd.auth.shared import RecordSealer, decode_record, encode_record
from proxyd.config import (
    RESTART_ONLY,
    ConfigError,
    RateLimitSettings,
    Settings,
    StateSettings,
    in_force,
    load_settings,
    parse_settings,
    redact_url,
)
from proxyd.metrics import Metrics
from proxyd.ratelimit import TokenBuckets
from proxyd.state import RedisState, SharedBuckets
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import MINTED, TestIssuer
from tests.kit.limits import Flood, assert_401, assert_ok, limited, post
from tests.kit.net import free_port
from tests.kit.proxy import Client, bearer, config, rpc_error
from tests.kit.redisserver import RedisServer
from tests.kit.wait import GUARD

MCP_KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()
DEFAULT_BURST = 40


# --------------------------------------------------------------------------------------------
# Fixtures: one Redis for the module (flushed per test), or a test's own to kill and restart


def _short_dir() -> Path:
    # A unix socket path must stay under ~100 bytes: pytest's tmp paths can be longer.
    return Path(tempfile.mkdtemp(prefix="proxyd-redis-"))


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    directory = _short_dir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis(module_redis: RedisServer) -> RedisServer:
    assert module_redis.command("FLUSHALL").startswith(b"+OK")
    return module_redis


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    directory = _short_dir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class BlackHole:
    """A TCP server that accepts and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        await reader.read()  # until the client gives up and closes

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def black_hole() -> AsyncIterator[BlackHole]:
    hole = BlackHole()
    yield hole
    await hole.close()


# --------------------------------------------------------------------------------------------
# Helpers


def redis_doc(
    issuer: TestIssuer,
    upstream: str,
    tmp_path: Path,
    url: str,
    state: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    sessions = {"mcp_keys": [MCP_KEY], **sections.pop("sessions", {})}
    return config(
        issuer,
        {"a": upstream},
        tmp_path,
        state={"backend": "redis", "url": url, **(state or {})},
        sessions=sessions,
        **sections,
    )


async def start_pair(
    make_proxy: ProxyFactory, doc: dict[str, Any], doc_b: dict[str, Any] | None = None
) -> tuple[Client, Client]:
    a = await make_proxy(copy.deepcopy(doc))
    b = await make_proxy(copy.deepcopy(doc_b if doc_b is not None else doc))
    return a, b


def metric(client: Client, name: str, **labels: str) -> float:
    registry = client.app[RUNTIME].core.metrics.registry
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def errors(client: Client) -> float:
    ops = ("ping", "limit", "session_get", "session_set", "session_delete")
    return sum(metric(client, "proxyd_state_backend_errors_total", op=op) for op in ops)


def verified(client: Client) -> float:
    return metric(client, "proxyd_auth_total", outcome="success", reason="verified")


def up(client: Client) -> float:
    registry = client.app[RUNTIME].core.metrics.registry
    value = registry.get_sample_value("proxyd_state_backend_up", {"backend": "redis"})
    assert value is not None
    return value


def new_token(issuer: TestIssuer, clock: FakeClock, jti: str, **claims: Any) -> dict[str, str]:
    return bearer(issuer.token(clock.wall(), jti=jti, **claims))


def session_redis_key(token_headers: dict[str, str], app: str = "a") -> str:
    token = token_headers["Authorization"].removeprefix("Bearer ")
    return "proxyd:session:" + session_key(app, token)


def bulk(reply: bytes) -> bytes | None:
    """The payload of a RESP bulk-string reply ($-1 is None)."""
    head, _, rest = reply.partition(b"\r\n")
    assert head.startswith(b"$"), reply
    size = int(head[1:])
    return None if size < 0 else rest[:size]


def state_settings(url: str, **kwargs: Any) -> StateSettings:
    return StateSettings(backend="redis", url=url, **kwargs)


# --------------------------------------------------------------------------------------------
# The Lua token bucket


@pytest.mark.parametrize(
    ("average", "period", "burst"), [(20, 60.0, 40), (7, 13.0, 3), (1, 3600.0, 5), (1000, 1.0, 10)]
)
async def test_lua_bucket_answers_exactly_as_the_in_memory_bucket(
    average: int, period: float, burst: int, redis: RedisServer, clock: FakeClock
) -> None:
    """Same arithmetic, same doubles: on the same clock every answer is identical, so the
    exact-model tests of TokenBuckets (test_ratelimit) hold for the script too."""
    settings = RateLimitSettings(average=average, period=period, burst=burst)
    state = RedisState(state_settings(redis.url), clock.monotonic, Metrics())
    try:
        shared = SharedBuckets(state, settings, "model", now=clock.monotonic)
        local = TokenBuckets(settings, clock.monotonic)
        rng = random.Random(average)
        step = period / average
        denied = 0
        for i in range(600):
            if rng.random() < 0.3:
                clock.advance(rng.uniform(0, 2 * step))
            key = "k" if i % 7 else "other"
            want = local.take(key)
            assert await shared.take(key) == want, i
            denied += want > 0
        assert denied > 50
    finally:
        await state.close()


async def test_lua_bucket_on_redis_time_burst_retry_after_and_refill(
    redis: RedisServer, clock: FakeClock
) -> None:
    state = RedisState(state_settings(redis.url), clock.monotonic, Metrics())
    try:
        slow = SharedBuckets(state, RateLimitSettings(average=1, period=3600.0, burst=3), "slow")
        assert [await slow.take("k") for _ in range(3)] == [0.0] * 3
        wait = await slow.take("k")
        assert 3590 < wait <= 3600  # a whole token per hour; milliseconds went by
        assert await slow.take("other") == 0.0  # keys are independent
        # Idle keys expire once full again (burst / rate = 3 h): Redis keeps only live buckets.
        pttl = int(redis.command("PTTL", "proxyd:rl:slow:k")[1:].split(b"\r\n")[0])
        assert 3 * 3600 * 1000 - 60_000 < pttl <= 3 * 3600 * 1000
        # Refill on Redis's clock: obeying the advertised wait is enough.
        fast = SharedBuckets(state, RateLimitSettings(average=100, period=1.0, burst=2), "fast")
        assert [await fast.take("k") for _ in range(2)] == [0.0] * 2

        async def refill(times: int) -> None:
            done = 0
            while done < times:
                wait = await fast.take("k")
                if wait == 0.0:
                    continue  # a busy machine took long enough to refill one: spend it
                assert wait <= 0.01
                await asyncio.sleep(wait + 0.002)  # loop timers may fire a hair early
                assert await fast.take("k") == 0.0
                done += 1

        await asyncio.wait_for(refill(5), GUARD)
    finally:
        await state.close()


async def test_lua_bucket_survives_a_script_flush(redis: RedisServer, clock: FakeClock) -> None:
    """EVALSHA answered NOSCRIPT (a restarted or flushed Redis): loaded again, no error."""
    metrics = Metrics()
    state = RedisState(state_settings(redis.url), clock.monotonic, metrics)
    try:
        buckets = SharedBuckets(state, RateLimitSettings(average=1, period=3600.0, burst=2), "f")
        assert await buckets.take("k") == 0.0
        assert redis.command("SCRIPT", "FLUSH").startswith(b"+OK")
        assert await buckets.take("k") == 0.0
        assert await buckets.take("k") > 0
        assert state.up
        registry = metrics.registry
        assert registry.get_sample_value("proxyd_state_backend_errors_total", {"op": "limit"}) in (
            None,
            0.0,
        )
    finally:
        await state.close()


# --------------------------------------------------------------------------------------------
# Two instances, one limit, one set of sessions


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_two_instances_sharing_redis_enforce_one_unauthenticated_limit(
    transport: str,
    redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    url = redis.url if transport == "tcp" else redis.unix_url
    doc = redis_doc(issuer, await upstreams.start(echo.app()), tmp_path, url)
    a, b = await start_pair(make_proxy, doc)
    good = new_token(issuer, clock, "good")
    await assert_ok(a, good)  # spends one of the 40, on A
    flood = Flood(issuer, clock, "mixed")
    for i in range(DEFAULT_BURST - 1):
        await assert_401(b if i % 2 else a, flood.headers())  # split across both
    for i in range(10):
        await limited(a if i % 2 else b, flood.headers(), retry=3)
    # One limit for both: even a valid new token waits, on either instance.
    await limited(b, new_token(issuer, clock, "late-b"))
    await limited(a, new_token(issuer, clock, "late-a"))
    # The session verified on A rides on, on both instances, without spending anything.
    for client in (a, b, a, b):
        await assert_ok(client, good)
    assert len(echo.seen) == 5
    assert errors(a) == errors(b) == 0
    assert up(a) == up(b) == 1
    assert not logs.events("state_backend_unavailable")
    connected = logs.events("state_backend_connected")
    assert len(connected) == 2 and {line["url"] for line in connected} == {url}


async def test_a_session_verified_on_one_instance_is_used_by_the_other(
    redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    limits = {"unauthenticated": {"average": 1, "period": "1h", "burst": 2}}
    echo = Echo()
    doc = redis_doc(issuer, await upstreams.start(echo.app()), tmp_path, redis.url, limits=limits)
    a, b = await start_pair(make_proxy, doc)
    good = new_token(issuer, clock, "shared")
    await assert_ok(a, good)
    assert issuer.fetches == 1 and verified(a) == 1
    for _ in range(5):
        await assert_ok(b, good)
    # B verified nothing: no key fetch, no verification, no second session, no limiter token.
    assert issuer.fetches == 1
    assert verified(b) == 0
    assert len(logs.events("session_created")) == 1
    assert [line["session"] for line in logs.events("request")] == ["new"] + ["cached"] * 5
    await assert_401(b, Flood(issuer, clock, "garbage").headers())  # the second of burst 2
    await limited(b, Flood(issuer, clock, "garbage").headers())
    # In Redis: sealed JSON (never pickle), without the user's name, the token or its hash.
    raw = bulk(redis.command("GET", session_redis_key(good)))
    assert raw is not None
    value = json.loads(raw)
    assert isinstance(value, str) and value.startswith("pxr1.")
    assert b"alice" not in raw
    assert good["Authorization"].removeprefix("Bearer ").encode() not in raw
    # The upstream saw the same user from both instances.
    assert len(echo.seen) == 6


@pytest.mark.parametrize(
    "change", ["leeway", "renamed", "rejects", "username_claim", "audiences", "resource_audience"]
)
async def test_a_changed_app_auth_config_on_the_other_instance_verifies_again(
    change: str,
    redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    doc = redis_doc(issuer, await upstreams.start(echo.app()), tmp_path, redis.url)
    doc_b = copy.deepcopy(doc)
    auth = doc_b["app_auth_configs"][0]
    if change == "leeway":
        auth["jwt"]["leeway"] = "30s"  # same name, different content: another fingerprint
    elif change == "renamed":
        auth["name"] = "other-idp"  # B has no config of A's name: verify under B's own
    elif change == "username_claim":
        auth["jwt"]["username_claim"] = ["email", "sub"]  # issue 12's fields count too
    elif change == "audiences":
        auth["jwt"]["audience"] = [auth["jwt"]["audience"], "another"]
    elif change == "resource_audience":
        auth["jwt"]["resource_audience"] = False
    else:
        auth["jwt"]["audience"] = "someone-else"  # B's config refuses the token
    a, b = await start_pair(make_proxy, doc, doc_b)
    good = new_token(issuer, clock, "cfg")
    await assert_ok(a, good)
    if change == "rejects":
        resp = await post(b, good)
        body = await rpc_error(resp, 401)
        assert body["error"]["data"]["reason"] != "config_removed"
        assert verified(b) == 0
        await assert_ok(a, good)  # A's own config still accepts it
        # B deleted the record it could not use: its next attempt is a new token again.
        assert bulk(redis.command("GET", session_redis_key(good))) is None
        return
    await assert_ok(b, good)
    assert verified(b) == 1  # verified again under B's config, not trusted blindly
    for _ in range(3):
        await assert_ok(b, good)
        await assert_ok(a, good)
    assert verified(a) == verified(b) == 1  # each instance once, then its local cache
    sessions = [line["config"] for line in logs.events("session_created")]
    assert sessions == ["test-idp", "other-idp" if change == "renamed" else "test-idp"]


async def test_a_record_is_no_session_for_an_app_the_config_does_not_cover_here(
    redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    # Same app auth config (same fingerprint) on both, but on B app "a" has other labels: the
    # config does not select it, so B refuses the token for it. A session A wrote to Redis
    # must not open app "a" on B all the same.
    doc = redis_doc(issuer, await upstreams.start(Echo().app()), tmp_path, redis.url)
    doc_b = copy.deepcopy(doc)
    doc_b["apps"][0]["labels"]["env"] = "prod"
    a, b = await start_pair(make_proxy, doc, doc_b)
    good = new_token(issuer, clock, "labels")
    await assert_ok(a, good)
    body = await rpc_error(await post(b, good), 401)
    assert body["error"]["data"]["reason"] == "no_matching_config"
    await assert_ok(a, good)


async def test_a_forged_or_moved_record_in_redis_is_no_session(
    redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """Whoever can write Redis can neither mint a session nor reuse one for another token."""
    echo = Echo()
    doc = redis_doc(issuer, await upstreams.start(echo.app()), tmp_path, redis.url)
    a, b = await start_pair(make_proxy, doc)
    good = new_token(issuer, clock, "victim")
    await assert_ok(a, good)
    record = bulk(redis.command("GET", session_redis_key(good)))
    assert record is not None
    guesses = [f"forged-{i}" for i in range(4)]
    for guess in guesses:
        MINTED.add(guess)
    # 1: the victim's sealed record copied under the key of the attacker's token.
    redis.command("SET", session_redis_key(bearer(guesses[0])), record.decode())
    # 2: a plain JSON identity; 3: sealed under a key proxyd does not have; 4: not JSON.
    plain = json.dumps({"v": 1, "app": "a", "username": "root@example.com"})
    redis.command("SET", session_redis_key(bearer(guesses[1])), json.dumps(plain))
    foreign = RecordSealer([base64.b64decode(OTHER_KEY)])
    sealed = foreign.seal(plain.encode(), session_redis_key(bearer(guesses[2])))
    redis.command("SET", session_redis_key(bearer(guesses[2])), json.dumps(sealed))
    redis.command("SET", session_redis_key(bearer(guesses[3])), "\x80 not json")
    for guess in guesses:
        await assert_401(b, bearer(guess))
    assert len(echo.seen) == 1
    # The real record opens only under its own key.
    sealer = RecordSealer([base64.b64decode(MCP_KEY)])
    text = json.loads(record)
    prefix = len("proxyd:session:")
    assert decode_record(sealer.open(text, session_redis_key(good)[prefix:]) or b"")
    assert sealer.open(text, session_redis_key(bearer(guesses[0]))[prefix:]) is None


async def test_per_user_limit_is_shared_too(
    redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    limits = {"per_user": {"average": 1, "period": "1h", "burst": 3}}
    echo = Echo()
    doc = redis_doc(issuer, await upstreams.start(echo.app()), tmp_path, redis.url, limits=limits)
    a, b = await start_pair(make_proxy, doc)
    good = new_token(issuer, clock, "user")
    await assert_ok(a, good)  # a new session: the per-user limit counts established requests
    for client in (a, b, a):
        await assert_ok(client, good)
    await limited(b, good)
    await limited(a, good)
    other = new_token(issuer, clock, "bob", email="bob@example.com")
    await assert_ok(b, other)
    await assert_ok(a, other)  # bob has his own bucket


# --------------------------------------------------------------------------------------------
# Redis unavailable: requests are served; one line per transition; back again


async def test_redis_killed_mid_run_then_back(
    own_redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    burst = 4
    limits = {"unauthenticated": {"average": 1, "period": "1h", "burst": burst}}
    echo = Echo()
    doc = redis_doc(
        issuer, await upstreams.start(echo.app()), tmp_path, own_redis.url, limits=limits
    )
    a, b = await start_pair(make_proxy, doc)
    good = new_token(issuer, clock, "before")
    await assert_ok(a, good)
    own_redis.kill()
    await assert_ok(a, good)  # A's own cache: Redis not even asked
    await assert_ok(b, good)  # B cannot read the shared session: verifies the token itself
    assert verified(b) == 1
    # The limiter fails open (the default): a flood far past the burst gets 401, never 429,
    # and never an error caused by Redis.
    flood = Flood(issuer, clock, "mixed")
    for i in range(burst * 5):
        await assert_401(a if i % 2 else b, flood.headers())
    fresh = new_token(issuer, clock, "during")
    await assert_ok(a, fresh)
    await assert_ok(b, fresh)
    down = logs.events("state_backend_unavailable")
    assert len(down) == 2  # one per instance, not one per request
    assert all(line["level"] == "warning" and line["url"] == own_redis.url for line in down)
    # While down, Redis is left alone: one failed call per instance, the rest fell back.
    assert errors(a) == errors(b) == 1
    assert up(a) == up(b) == 0
    assert metric(a, "proxyd_state_backend_fallbacks_total", op="limit") >= burst
    assert not logs.events("state_backend_recovered")

    own_redis.start()  # empty: the buckets start full again
    await assert_401(a, flood.headers())  # still inside the back-off: not tried yet
    assert up(a) == 0
    clock.advance(StateSettings().retry_interval)
    await assert_401(a, flood.headers())  # probes, recovers, spends a token
    await assert_401(b, flood.headers())
    recovered = logs.events("state_backend_recovered")
    assert len(recovered) == 2
    assert up(a) == up(b) == 1
    # One global limit again: 2 spent, 2 left for both instances together.
    await assert_401(b, flood.headers())
    await assert_401(a, flood.headers())
    await limited(b, flood.headers())
    await limited(a, flood.headers())
    for client in (a, b):
        await assert_ok(client, good)
    assert len(logs.events("state_backend_unavailable")) == 2


async def test_limiter_failure_closed_answers_503_and_sessions_keep_working(
    own_redis: RedisServer,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    doc = redis_doc(
        issuer,
        await upstreams.start(echo.app()),
        tmp_path,
        own_redis.url,
        state={"limiter_failure": "closed"},
    )
    client = await make_proxy(doc)
    good = new_token(issuer, clock, "kept")
    await assert_ok(client, good)
    own_redis.kill()
    for headers in (new_token(issuer, clock, "refused"), {}, bearer("garbage")):
        resp = await post(client, headers)
        body = await rpc_error(resp, 503)
        assert body["error"]["data"] == {"status": 503, "reason": "state_unavailable"}
        assert resp.headers["Retry-After"] == "2"  # the back-off left before the next try
        assert "WWW-Authenticate" not in resp.headers
    MINTED.add("garbage")
    await assert_ok(client, good)  # an established session needs no limiter
    assert len(echo.seen) == 2


async def test_limiter_failure_local_limits_each_instance_alone(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    limits = {"unauthenticated": {"average": 1, "period": "1h", "burst": 3}}
    echo = Echo()
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: refused at once
    doc = redis_doc(
        issuer,
        await upstreams.start(echo.app()),
        tmp_path,
        nowhere,
        state={"limiter_failure": "local"},
        limits=limits,
    )
    client = await make_proxy(doc)
    flood = Flood(issuer, clock, "garbage")
    for _ in range(3):
        await assert_401(client, flood.headers())
    await limited(client, flood.headers())
    down = logs.events("state_backend_unavailable")
    assert len(down) == 1 and down[0]["op"] == "ping"  # found at start, said once


async def test_a_hung_redis_costs_one_timeout_per_retry_interval(
    black_hole: BlackHole,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    url = await black_hole.start()
    echo = Echo()
    doc = redis_doc(
        issuer, await upstreams.start(echo.app()), tmp_path, url, state={"timeout": "100ms"}
    )
    client = await make_proxy(doc)  # the start's PING times out: down from the start
    assert metric(client, "proxyd_state_backend_errors_total", op="ping") == 1
    good = new_token(issuer, clock, "hung")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(10):
        await assert_ok(client, good)
    assert loop.time() - started < GUARD
    assert errors(client) == 1  # nobody waited on Redis inside the back-off
    clock.advance(2.0)
    flood = Flood(issuer, clock, "garbage")
    await assert_401(client, flood.headers())  # this one probes: one more timeout
    await assert_401(client, flood.headers())
    assert errors(client) == 2
    assert metric(client, "proxyd_state_backend_errors_total", op="session_get") == 1
    assert len(logs.events("state_backend_unavailable")) == 1
    assert black_hole.connections >= 1


async def test_the_redis_password_is_used_and_never_logged(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    password = "s3cret-Pw-in-url"
    directory = _short_dir()
    server = RedisServer(directory, ["--requirepass", password])
    server.start()
    try:
        echo = Echo()
        upstream = await upstreams.start(echo.app())
        right = f"redis://:{password}@127.0.0.1:{server.port}/0"
        limits = {"unauthenticated": {"average": 1, "period": "1h", "burst": 1}}
        a = await make_proxy(redis_doc(issuer, upstream, tmp_path, right, limits=limits))
        await assert_401(a, bearer("nope-1"))
        await limited(a, bearer("nope-2"))  # Redis answered: authenticated
        assert errors(a) == 0
        wrong = f"redis://:wrong-{password}@127.0.0.1:{server.port}/0"
        b = await make_proxy(redis_doc(issuer, upstream, tmp_path, wrong))
        await assert_401(b, bearer("nope-3"))  # refused by Redis: served anyway (open)
        down = logs.events("state_backend_unavailable")
        assert len(down) == 1 and "Authentication" in down[0]["error"]
        MINTED.update({"nope-1", "nope-2", "nope-3"})
        text = logs.text()
        assert password not in text
        assert f"redis://:[redacted]@127.0.0.1:{server.port}/0" in text
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Configuration


def state_doc(**state: Any) -> dict[str, Any]:
    return {"state": state, "sessions": {"mcp_keys": [MCP_KEY]}}


def test_state_defaults_to_memory() -> None:
    settings = parse_settings({})
    assert settings.state == StateSettings()
    assert settings.state.backend == "memory" and not settings.state.shared
    full = parse_settings(
        state_doc(
            backend="redis",
            url="rediss://user:pw@redis.internal:6380/2?ssl_ca_certs=/etc/ca.pem",
            timeout="100ms",
            limiter_failure="closed",
            key_prefix="edge1:",
            retry_interval="5s",
        )
    )
    assert full.state == StateSettings(
        backend="redis",
        url="rediss://user:pw@redis.internal:6380/2?ssl_ca_certs=/etc/ca.pem",
        timeout=0.1,
        limiter_failure="closed",
        key_prefix="edge1:",
        retry_interval=5.0,
    )
    for url in ("redis://127.0.0.1", "unix:///run/redis/redis.sock?db=1", "redis://[::1]:6379"):
        assert parse_settings(state_doc(backend="redis", url=url)).state.url == url


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (state_doc(backend="etcd"), "state.backend: one of memory, redis"),
        (state_doc(backend="redis"), 'state.url: required with backend = "redis"'),
        (state_doc(url="redis://h"), 'state.url: only used with backend = "redis"'),
        (state_doc(backend="redis", url="http://h:6379"), "state.url: the scheme must be"),
        (state_doc(backend="redis", url="redis://:6379"), "state.url: missing host"),
        (state_doc(backend="redis", url="redis://h:99999"), "state.url: not a valid URL"),
        (state_doc(backend="redis", url="redis://h/x"), "state.url: the path must be a data"),
        (state_doc(backend="redis", url="redis://h?socket_timeout=9"), "state.url: query opt"),
        (state_doc(backend="redis", url="unix://h/s.sock"), "state.url: unix:// takes a socket"),
        (state_doc(backend="redis", url="rediss://h?ssl_cert_reqs=x"), "state.url: ssl_cert_reqs"),
        (state_doc(backend="redis", url="redis://h?ssl_ca_certs=/c"), "state.url: query option"),
        (state_doc(backend="redis", url="unix://"), "state.url: unix:// needs the socket's"),
        (state_doc(backend="redis", url=""), "state.url: expected a URL"),
        (state_doc(backend="redis", url="redis://h", timeout="soon"), "state.timeout: not a dur"),
        (state_doc(backend="redis", url="redis://h", timeout=0), "state.timeout: must be greater"),
        (state_doc(backend="redis", url="redis://h", timeout="1m"), "state.timeout: at most 10s"),
        (
            state_doc(backend="redis", url="redis://h", limiter_failure="maybe"),
            "state.limiter_failure: one of open, closed, local",
        ),
        (state_doc(backend="redis", url="redis://h", key_prefix="a b"), "state.key_prefix: at"),
        (state_doc(backend="redis", url="redis://h", retry="1s"), "state.retry: unknown key"),
        (
            {"state": {"backend": "redis", "url": "redis://h"}},
            'sessions.mcp_keys: required with state.backend = "redis"',
        ),
    ],
)
def test_state_config_errors(doc: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    assert any(p.startswith(problem) for p in exc.value.problems), exc.value.problems


def test_a_password_in_the_url_never_reaches_a_config_message() -> None:
    bad = "redis://:hunter2-pw@host:70000/0"
    with pytest.raises(ConfigError) as exc:
        parse_settings(state_doc(backend="redis", url=bad))
    assert "hunter2" not in str(exc.value)
    assert redact_url("redis://u:p%40ss@h:1/0") == "redis://u:[redacted]@h:1/0"
    assert redact_url("redis://:pw@h") == "redis://:[redacted]@h"
    assert redact_url("unix://:pw@/run/r.sock") == "unix://:[redacted]@/run/r.sock"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_state_is_restart_only() -> None:
    boot = parse_settings(state_doc(backend="redis", url="redis://a"))
    new = parse_settings(state_doc(backend="redis", url="redis://b", limiter_failure="closed"))
    assert RESTART_ONLY["state"](boot) != RESTART_ONLY["state"](new)
    kept: Settings = in_force(new, boot)
    assert kept.state == boot.state


async def test_memory_backend_touches_no_redis_metrics(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    await assert_ok(client, new_token(issuer, clock, "mem"))
    runtime = client.app[RUNTIME]
    assert runtime.resources.state is None and runtime.resources.shared_sessions is None
    registry = runtime.core.metrics.registry
    assert registry.get_sample_value("proxyd_state_backend_up", {"backend": "redis"}) is None


def test_the_example_config_shows_every_state_key_with_its_default() -> None:
    example = Path(__file__).resolve().parent.parent / "etc" / "proxyd" / "proxyd.toml"
    assert load_settings(str(example)).state == StateSettings()
    text = example.read_text(encoding="utf-8")
    section = text[text.index("[state]") : text.index("[upstream]")]
    for name in ("backend", "url", "timeout", "limiter_failure", "key_prefix", "retry_interval"):
        assert f"{name} = " in section, name


def test_a_shared_record_keeps_the_username_claim() -> None:
    identity = Identity(
        username="svc-reports",
        issuer="https://idp.test",
        subject="svc-reports",
        config="idp",
        expires_at=2e9,
        issued_at=1e9,
        claims={"sub": "svc-reports", "scope": "mcp"},
        username_claim="sub",
    )
    session = Session(key="proxyd-jwt:k", app="a", identity=identity, expires_at=2e9)
    doc = decode_record(encode_record(session, "fp"))
    assert doc is not None and doc["username_claim"] == "sub"
    # A record written before the field existed (same record version) still reads.
    older = json.loads(encode_record(session, "fp"))
    del older["username_claim"]
    doc = decode_record(json.dumps(older).encode())
    assert doc is not None and doc["username_claim"] == ""
    older["username_claim"] = 5
    assert decode_record(json.dumps(older).encode()) is None
