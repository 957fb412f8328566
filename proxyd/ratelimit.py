"""Token buckets per key with an injected clock and bounded memory.

Two uses: the unauthenticated limiter per client address (every request that does not ride an
established session: no token, a new token, a rejected one — Teleport's
WithUnauthenticatedLimiter, 20/min burst 40) and an optional per-user limit on established
sessions. Memory stays bounded under a flood of distinct keys: a bucket idle long enough to
have refilled is indistinguishable from a new one and is dropped, and a hard cap evicts the
least recently used key.

With ``[state] backend = "redis"`` the buckets live in Redis (state.SharedBuckets) and every
proxyd instance spends the same ones; when Redis cannot answer, ``limiter_failure`` decides.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxyd.config import RateLimitSettings
from proxyd.errors import RateLimited, StateUnavailable
from proxyd.metrics import Metrics
from proxyd.state import DUE_SLACK, RedisState, SharedBuckets, StateDown


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float]) -> None:
        self._rate = settings.average / settings.period  # tokens per second
        self._burst = float(settings.burst)
        self._max_keys = settings.max_tracked
        self._clock = clock
        # A bucket untouched this long is full again: forgetting it changes nothing.
        self._forget_after = self._burst / self._rate
        # Ordered by last use (every use moves the key to the end), oldest first.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Spend one token for ``key``: 0.0 when allowed, else the seconds until one is due."""
        now = self._clock()
        self._forget_idle(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
            self._buckets.move_to_end(key)
        wait = (1.0 - bucket.tokens) / self._rate
        # Refills accumulate float error (20/min, 2.9 s + 0.1 s left 0.9999999999999997 tokens):
        # a token due within DUE_SLACK counts as here, and the wait is rounded to it, so that
        # Retry-After is exact on whole seconds (2.0000000000000004 s made it 3) and obeying it
        # always succeeds.
        if wait <= DUE_SLACK:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return 0.0
        return round(wait, 6)

    def _forget_idle(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if now - oldest.stamp < self._forget_after:
                return
            buckets.popitem(last=False)


def address_key(address: str, ipv6_prefix: int) -> str:
    """IPv4 addresses count alone; IPv6 ones by their /prefix (a host usually owns a /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        # Integer masking: building an IPv6Network per request cost ~47 µs, 5x this.
        shift = 128 - ipv6_prefix
        return f"{(int(ip) >> shift) << shift:032x}/{ipv6_prefix}"
    return address


class Limiter:
    """A TokenBuckets with an on/off switch and the keying of its use."""

    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float]) -> None:
        self.enabled = settings.enabled
        self._prefix = settings.ipv6_prefix
        self.buckets = TokenBuckets(settings, clock)

    def for_address(self, address: str) -> float:
        if not self.enabled:
            return 0.0
        return self.buckets.take(address_key(address, self._prefix))

    def for_user(self, issuer: str, username: str) -> float:
        if not self.enabled:
            return 0.0
        return self.buckets.take(f"{issuer}\x00{username}")


class SharedLimiter:
    """A Limiter whose buckets live in Redis, with the fallback of ``state.limiter_failure``
    while Redis cannot answer: open (allow), closed (503) or local (this process's buckets)."""

    def __init__(
        self, settings: RateLimitSettings, name: str, state: RedisState, local: Limiter
    ) -> None:
        self.enabled = settings.enabled
        self._prefix = settings.ipv6_prefix
        self.buckets = SharedBuckets(state, settings, name)
        self._state = state
        self._failure = state.settings.limiter_failure
        self.local = local

    async def for_address(self, address: str) -> float:
        if not self.enabled:
            return 0.0
        key = address_key(address, self._prefix)
        return await self._take(key, lambda: self.local.buckets.take(key))

    async def for_user(self, issuer: str, username: str) -> float:
        if not self.enabled:
            return 0.0
        # Hashed: bounded key length, and no user names in Redis key listings.
        key = hashlib.sha256(f"{issuer}\x00{username}".encode()).hexdigest()[:32]
        return await self._take(key, lambda: self.local.for_user(issuer, username))

    async def _take(self, key: str, local: Callable[[], float]) -> float:
        try:
            return await self.buckets.take(key)
        except StateDown:
            if self._failure == "open":
                return 0.0
            if self._failure == "local":
                return local()
            raise StateUnavailable(
                "the rate limiter's shared state is unavailable; try again shortly",
                max(1.0, self._state.retry_in()),
            ) from None


class Limits:
    """The two rate limits of the request path, answering 429 with Retry-After.

    ``unauthenticated`` is awaited on the way to token verification. The per-user limit runs
    on every request of an established session: with in-memory buckets it stays a plain call
    (``per_user``), with shared ones the handler awaits ``shared_per_user`` instead."""

    def __init__(
        self,
        unauthenticated: Limiter | SharedLimiter,
        per_user: Limiter | SharedLimiter,
        metrics: Metrics,
    ) -> None:
        self._unauthenticated = unauthenticated
        self._per_user = per_user
        # The plain-call path: in-memory buckets, or a disabled shared limiter's own (disabled,
        # so free) local ones — no isinstance per request.
        self._per_user_local = per_user.local if isinstance(per_user, SharedLimiter) else per_user
        self.per_user_is_shared = isinstance(per_user, SharedLimiter) and per_user.enabled
        self._limited_unauthenticated = metrics.rate_limited.labels("unauthenticated")
        self._limited_user = metrics.rate_limited.labels("per_user")

    async def unauthenticated(self, address: str) -> None:
        limiter = self._unauthenticated
        if isinstance(limiter, SharedLimiter):
            wait = await limiter.for_address(address)
        else:
            wait = limiter.for_address(address)
        if wait:
            self._limited_unauthenticated.inc()
            raise RateLimited("too many unauthenticated requests; slow down", wait)

    def per_user(self, issuer: str, username: str) -> None:
        wait = self._per_user_local.for_user(issuer, username)
        if wait:
            self._limited_user.inc()
            raise RateLimited("too many requests for this user; slow down", wait)

    async def shared_per_user(self, issuer: str, username: str) -> None:
        limiter = self._per_user
        assert isinstance(limiter, SharedLimiter)
        wait = await limiter.for_user(issuer, username)
        if wait:
            self._limited_user.inc()
            raise RateLimited("too many requests for this user; slow down", wait)
