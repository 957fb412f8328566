"""The shared state backend (``[state] backend = "redis"``): one Redis connection pool, its
availability, and the atomic token bucket the rate limiters share.

With Redis, N proxyd processes (workers or hosts behind a load balancer) spend one set of
token buckets and reuse each other's verified sessions. Redis is a helper, never a
dependency of a request: every call is bounded by ``state.timeout``; a failure marks Redis
down (one log line, a metric) and callers take their fallback — the limiter its configured
direction, sessions the local cache and local verification. While down, Redis is left alone
for ``retry_interval``; then one request probes it (the others keep using the fallback) and
the first success logs the recovery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxyd.config import RateLimitSettings, StateSettings, redact_url
from proxyd.log import get_logger
from proxyd.metrics import Metrics

T = TypeVar("T")

log = get_logger("proxyd.state")

# Seconds: below any real clock's meaningful resolution here, far above float noise; a token due
# this close counts as here (ratelimit.TokenBuckets and the Lua bucket alike).
DUE_SLACK = 1e-6

# One atomic step of a token bucket: refill by elapsed time, spend a token if a whole one is
# there, else answer the seconds until one is due. Same arithmetic as ratelimit.TokenBuckets.
# The clock is Redis's TIME: one clock for every host, so hosts with skewed clocks neither
# mint nor lose tokens. ARGV[4] (a caller's clock) exists for the tests' exact model only.
# A bucket idle for burst/rate seconds is full again, so its key expires then (PEXPIRE):
# Redis keeps only the buckets in use, like the in-memory forgetting.
BUCKET_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 5: TIME then write
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local slack = tonumber(ARGV[3])
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens, stamp = burst, now
elseif now > stamp then
  -- a clock stepping back refills nothing (and keeps the later stamp)
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local wait = (1 - tokens) / rate
if wait <= slack then
  tokens = math.max(0, tokens - 1)
  wait = 0
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000))
return string.format('%.17g', wait)
"""


class StateDown(Exception):
    """Redis did not answer in time, or is in its back-off: use the fallback."""


class RedisState:
    """Owns the Redis client (created in app.py's cleanup context, closed at its end)."""

    def __init__(
        self, settings: StateSettings, clock: Callable[[], float], metrics: Metrics
    ) -> None:
        assert settings.url is not None  # config validation: required with backend = "redis"
        self.settings = settings
        self.url = redact_url(settings.url)
        password = urlsplit(settings.url).password
        self._password = unquote(password) if password else None
        self._clock = clock
        self.client: Redis = Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            # No retries inside redis-py (6+ retries 3 times with back-off by default): one
            # attempt per call, within state.timeout; the back-off here decides when to retry.
            retry=Retry(NoBackoff(), 0),
            client_name="proxyd",
        )
        self.up = True
        self._down_since = 0.0
        self._retry_at = 0.0
        self._probing = False
        self._errors = metrics.state_errors
        self._fallbacks = metrics.state_fallbacks
        self._up = metrics.state_up.labels("redis")
        self._up.set(1)

    async def start(self) -> None:
        """One PING so the log says at start whether Redis answers; never fails the start."""
        try:
            await self.run("ping", self.client.ping)
        except StateDown:
            return  # logged as state_backend_unavailable; requests use the fallbacks
        log.info("state_backend_connected", backend="redis", url=self.url)

    def retry_in(self) -> float:
        """Seconds until Redis is tried again (0 while it is up)."""
        return 0.0 if self.up else max(0.0, self._retry_at - self._clock())

    async def run(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` within the timeout; StateDown when it fails or Redis is left alone now."""
        probe = False
        if not self.up:
            if self._probing or self._clock() < self._retry_at:
                self._fallbacks.labels(op).inc()
                raise StateDown
            probe = self._probing = True  # this call probes; concurrent ones fall back
        try:
            async with asyncio.timeout(self.settings.timeout):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(op, exc)
            raise StateDown from None
        finally:
            if probe:
                self._probing = False
        if not self.up:
            self._recovered()
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        self._errors.labels(op).inc()
        self._fallbacks.labels(op).inc()
        now = self._clock()
        self._retry_at = now + self.settings.retry_interval
        if not self.up:
            return  # one line per transition, never one per request
        self.up = False
        self._down_since = now
        self._up.set(0)
        log.warning(
            "state_backend_unavailable",
            backend="redis",
            url=self.url,
            op=op,
            error=self._describe(exc),
            retry_in=self.settings.retry_interval,
            limiter_failure=self.settings.limiter_failure,
            detail="rate limits fall back to limiter_failure; sessions are verified locally",
        )

    def _recovered(self) -> None:
        self.up = True
        self._up.set(1)
        log.info(
            "state_backend_recovered",
            backend="redis",
            url=self.url,
            down_for=round(self._clock() - self._down_since, 3),
        )

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._password:
            text = text.replace(self._password, "[redacted]")
        return text[:300]

    async def close(self) -> None:
        await self.client.aclose()


class SharedBuckets:
    """Token buckets in Redis, one key per bucket under ``<key_prefix>rl:<name>:``."""

    def __init__(
        self,
        state: RedisState,
        settings: RateLimitSettings,
        name: str,
        now: Callable[[], float] | None = None,
    ) -> None:
        self._state = state
        # register_script: EVALSHA, and on NOSCRIPT (a restarted or flushed Redis) one
        # SCRIPT LOAD and EVALSHA again.
        self._script: Any = state.client.register_script(BUCKET_SCRIPT)
        self._prefix = f"{state.settings.key_prefix}rl:{name}:"
        rate = settings.average / settings.period
        self._args = [repr(rate), repr(float(settings.burst)), repr(DUE_SLACK)]
        self._now = now

    async def take(self, key: str) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until one is due; StateDown
        when Redis cannot answer."""
        args = self._args if self._now is None else [*self._args, repr(self._now())]
        keys = [self._prefix + key]
        raw = await self._state.run("limit", lambda: self._script(keys=keys, args=args))
        wait = float(raw)
        return round(wait, 6) if wait > 0 else 0.0
