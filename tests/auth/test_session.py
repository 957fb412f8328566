"""The local session tier (issue 15: a dict with our own expiry check, swept as it grows)."""

from __future__ import annotations

from proxyd.auth.jwt import Identity
from proxyd.auth.session import Session, SessionStore, session_key
from tests.conftest import FakeClock


def identity(expires_at: float) -> Identity:
    return Identity(
        username="alice@example.com",
        issuer="https://idp.example",
        subject="alice",
        config="corp",
        expires_at=expires_at,
        issued_at=0.0,
        claims={},
    )


class RecordingShared:
    """A shared tier in memory: what was put, deleted, and what a get answers."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.deleted: list[str] = []

    async def get(self, key: str) -> Session | None:
        return self.sessions.get(key)

    async def put(self, session: Session) -> None:
        self.sessions[session.key] = session

    async def delete(self, key: str) -> None:
        self.deleted.append(key)
        self.sessions.pop(key, None)


async def test_a_session_lives_until_its_token_or_max_ttl_expires(clock: FakeClock) -> None:
    store = SessionStore(clock.wall, max_ttl=100.0)
    now = clock.wall()
    short = await store.create("k-short", "a", identity(now + 10))
    long = await store.create("k-long", "a", identity(now + 10_000))
    assert short.expires_at == now + 10 and long.expires_at == now + 100
    assert await store.get("k-short") is short
    clock.advance(10)
    assert await store.get("k-short") is None  # expired: gone, not served
    assert len(store) == 1
    assert await store.get("k-long") is long
    clock.advance(90)
    assert await store.get("k-long") is None
    assert len(store) == 0


async def test_an_expired_token_is_not_kept(clock: FakeClock) -> None:
    store = SessionStore(clock.wall, max_ttl=100.0)
    session = await store.create("k", "a", identity(clock.wall() - 1))
    assert session.expires_at <= clock.wall()
    assert await store.get("k") is None and len(store) == 0


async def test_expired_sessions_never_looked_up_again_are_swept_as_the_dict_grows(
    clock: FakeClock,
) -> None:
    store = SessionStore(clock.wall, max_ttl=60.0)
    for i in range(1000):
        await store.create(f"old-{i}", "a", identity(clock.wall() + 3600))
    clock.advance(61)  # all 1000 expired, none looked up again
    for i in range(5000):
        await store.create(f"new-{i}", "a", identity(clock.wall() + 3600))
    # Without a sweep 6000 would be held; the expired ones went at the first sweep.
    assert len(store) == 5000
    assert all([await store.get(f"old-{i}") is None for i in range(1000)])
    clock.advance(61)
    for i in range(20_000):
        await store.create(f"newer-{i}", "a", identity(clock.wall() + 3600))
    assert len(store) <= 20_000 + 2 * 5000  # bounded by twice what is live, not by history


async def test_the_shared_tier_fills_the_local_one_under_this_instances_max_ttl(
    clock: FakeClock,
) -> None:
    shared = RecordingShared()
    store = SessionStore(clock.wall, max_ttl=30.0, shared=shared)
    key = session_key("a", "token")
    shared.sessions[key] = Session(
        key=key, app="a", identity=identity(clock.wall() + 3600), expires_at=clock.wall() + 3600
    )
    got = await store.get(key)
    assert got is not None and got.expires_at == clock.wall() + 30
    shared.sessions.clear()
    assert await store.get(key) is got  # a local hit now
    await store.delete(key)
    assert shared.deleted == [key]
    assert await store.get(key) is None
    created = await store.create("k2", "a", identity(clock.wall() + 3600))
    assert shared.sessions["k2"] is created
