"""Sessions derived from a bearer token: the hot path is a hash and a cache lookup.

The key is a fixed prefix + hex sha256 over the app name and the token (Teleport hashes the
token alone; binding the app means a token verified for app A is no session for app B, and the
prefix keeps this id space apart from any other).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxyd.auth.jwt import Identity

SESSION_PREFIX = "proxyd-jwt:"


def session_key(app: str, token: str) -> str:
    digest = hashlib.sha256(app.encode())
    digest.update(b"\x00")
    digest.update(token.encode())
    return SESSION_PREFIX + digest.hexdigest()


@dataclass(slots=True)
class Session:
    key: str
    app: str
    identity: Identity
    expires_at: float
    # The signed identity assertion for the upstream, reused until close to its expiry so an
    # established session pays no signature per request.
    assertion: str | None = None
    assertion_refresh_at: float = 0.0

    @property
    def username(self) -> str:
        return self.identity.username


def session_ttl(identity: Identity, now: float, max_ttl: float) -> float:
    return max(0.0, min(identity.expires_at - now, max_ttl))


class SessionStore:
    """An aiocache cache of verified sessions; expiry is also checked against our own clock
    so a session never outlives its token even if the cache's timer is late."""

    def __init__(self, cache: Any, clock: Callable[[], float], max_ttl: float) -> None:
        self._cache = cache
        self._clock = clock
        self.max_ttl = max_ttl

    async def get(self, key: str) -> Session | None:
        session: Session | None = await self._cache.get(key)
        if session is not None and session.expires_at <= self._clock():
            await self._cache.delete(key)
            return None
        return session

    async def create(self, key: str, app: str, identity: Identity) -> Session:
        now = self._clock()
        ttl = session_ttl(identity, now, self.max_ttl)
        session = Session(key=key, app=app, identity=identity, expires_at=now + ttl)
        if ttl > 0:
            await self._cache.set(key, session, ttl=ttl)
        return session

    async def delete(self, key: str) -> None:
        await self._cache.delete(key)

    async def close(self) -> None:
        await self._cache.clear()
        await self._cache.close()
