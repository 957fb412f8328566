"""SessionGate without HTTP: a fake clock, static keys, real tokens, milliseconds per test.

The decisions that matter most on the request path (issue 11): a cached session costs no
verification, one new token is verified once however many requests carry it, a changed app
auth config verifies again, a removed one ends the session, a config that no longer selects the
app refuses it, and the per-address limiter runs before any token work.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest

from proxyd.access import AccessRecord
from proxyd.auth.appauth import AppAuthStore, Authenticator, resource_url
from proxyd.auth.gate import SessionGate
from proxyd.auth.jwks import JwksCache
from proxyd.auth.session import Session, SessionStore
from proxyd.config import Settings, parse_settings
from proxyd.errors import (
    InsufficientScope,
    InvalidToken,
    MalformedToken,
    RateLimited,
    Unauthenticated,
)
from proxyd.mcp.audit import Auditor
from proxyd.metrics import Metrics
from proxyd.netaddr import ClientView
from proxyd.ratelimit import Limiter, Limits
from proxyd.registry import App
from tests.conftest import FakeClock
from tests.kit.issuer import TestIssuer

CLIENT = ClientView("198.51.100.7", "198.51.100.7", "http", "proxyd.test")
APP = App("a", {"env": "test"}, ("http://127.0.0.1:1/mcp",))
APP_B = App("b", {"env": "test"}, ("http://127.0.0.1:1/mcp",))
PUBLIC_URL = "https://mcp.example.com"


@dataclass
class Rig:
    gate: SessionGate
    store: AppAuthStore
    issuer: TestIssuer
    clock: FakeClock
    metrics: Metrics
    settings: Settings

    def verified(self) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "proxyd_auth_total", {"outcome": "success", "reason": "verified"}
            )
            or 0.0
        )

    async def session(self, token: str | None, app: App = APP) -> tuple[Session, AccessRecord]:
        record = AccessRecord()
        header = None if token is None else f"Bearer {token}"
        return await self.gate.session_for(app, header, CLIENT, record), record


def settings_for(issuer: TestIssuer, burst: int = 40) -> Settings:
    return parse_settings(
        {
            "apps": [
                {"name": "a", "labels": {"env": "test"}, "servers": ["http://127.0.0.1:1/mcp"]}
            ],
            "app_auth_configs": [
                {
                    "name": "idp",
                    "app_labels": {"env": "test"},
                    "jwt": {
                        "issuer": issuer.issuer,
                        "audience": issuer.audience,
                        "static_jwks": json.dumps(issuer.jwks()),
                    },
                }
            ],
            "limits": {"unauthenticated": {"average": 1, "period": "1h", "burst": burst}},
        }
    )


@pytest.fixture
async def rig(clock: FakeClock) -> AsyncIterator[Rig]:
    issuer = TestIssuer()
    issuer.add_key("k1", "ES256")
    settings = settings_for(issuer)
    store = AppAuthStore(settings.app_auth_configs)
    metrics = Metrics()
    async with aiohttp.ClientSession() as http:  # never used: the keys are static
        jwks = JwksCache(http, settings.jwks, clock.monotonic)
        limits = Limits(
            Limiter(settings.limits.unauthenticated, clock.monotonic),
            Limiter(settings.limits.per_user, clock.monotonic),
            metrics,
        )
        sessions = SessionStore(clock.wall, 12 * 3600)
        gate = SessionGate(
            sessions,
            Authenticator(store, jwks, clock.wall, PUBLIC_URL),
            limits,
            metrics,
            Auditor(settings.audit),
            clock.clocks(),
        )
        try:
            yield Rig(gate, store, issuer, clock, metrics, settings)
        finally:
            await gate.close()
            await jwks.close()


async def test_a_new_token_is_verified_once_then_cached(rig: Rig) -> None:
    token = rig.issuer.token(rig.clock.wall())
    first, record = await rig.session(token)
    assert (first.username, record.session) == ("alice@example.com", "new")
    second, record = await rig.session(token)
    assert second is first and record.session == "cached"
    assert rig.verified() == 1


async def test_concurrent_requests_with_one_new_token_share_one_verification(rig: Rig) -> None:
    token = rig.issuer.token(rig.clock.wall())
    results = await asyncio.gather(*(rig.session(token) for _ in range(20)))
    assert len({id(session) for session, _ in results}) == 1
    assert rig.verified() == 1


async def test_a_changed_config_verifies_again_and_a_removed_one_ends_the_session(
    rig: Rig,
) -> None:
    token = rig.issuer.token(rig.clock.wall())
    await rig.session(token)
    config = rig.store.snapshot.configs[0]
    changed = replace(config, jwt=replace(config.jwt, leeway=config.jwt.leeway + 1))
    rig.store.swap((changed,))
    _, record = await rig.session(token)
    assert record.session == "new" and rig.verified() == 2
    rig.store.swap(())
    with pytest.raises(InvalidToken) as refused:
        await rig.session(token)
    assert refused.value.reason == "config_removed"


async def test_a_config_that_no_longer_selects_the_app_refuses_its_session(rig: Rig) -> None:
    token = rig.issuer.token(rig.clock.wall())
    await rig.session(token)
    relabelled = replace(APP, labels={"env": "prod"})
    with pytest.raises(InvalidToken) as refused:
        await rig.session(token, relabelled)
    assert refused.value.reason == "no_matching_config"


async def test_a_token_past_exp_within_the_leeway_opens_no_session(rig: Rig) -> None:
    now = int(rig.clock.wall())
    token = rig.issuer.token(now, exp=now - 10, iat=now - 600)
    with pytest.raises(InvalidToken) as refused:
        await rig.session(token)
    assert refused.value.reason == "expired"


async def test_the_session_ends_with_its_token(rig: Rig) -> None:
    now = int(rig.clock.wall())
    token = rig.issuer.token(now, exp=now + 120)
    await rig.session(token)
    rig.clock.advance(121)
    with pytest.raises(InvalidToken):  # the cache forgot it; verifying again finds it expired
        await rig.session(token)


@pytest.mark.parametrize("header", [None, "Basic x", "Bearer", "Bearer a b"])
async def test_no_usable_token_spends_a_limiter_token_first(rig: Rig, header: Any) -> None:
    limits = Limiter(replace(rig.settings.limits.unauthenticated, burst=2), rig.clock.monotonic)
    rig.gate.limits = Limits(limits, limits, rig.metrics)
    for _ in range(2):
        with pytest.raises((Unauthenticated, MalformedToken)):
            await rig.gate.session_for(APP, header, CLIENT, AccessRecord())
    with pytest.raises(RateLimited):
        await rig.gate.session_for(APP, header, CLIENT, AccessRecord())


async def test_guessed_tokens_are_turned_away_by_the_limiter_before_any_crypto(rig: Rig) -> None:
    limits = Limiter(replace(rig.settings.limits.unauthenticated, burst=3), rig.clock.monotonic)
    rig.gate.limits = Limits(limits, limits, rig.metrics)
    forged = [rig.issuer.tampered(rig.issuer.token(rig.clock.wall()), sub=str(i)) for i in range(5)]
    outcomes = []
    for token in forged:
        try:
            await rig.session(token)
        except (InvalidToken, RateLimited) as err:
            outcomes.append(type(err).__name__)
    assert outcomes == ["InvalidToken"] * 3 + ["RateLimited"] * 2
    failures = rig.metrics.registry.get_sample_value(
        "proxyd_auth_total", {"outcome": "failure", "reason": "bad_signature"}
    )
    assert failures == 3  # the two over the limit cost no signature check


# --- issue 12: resource audiences, scopes, username claims -----------------------------------


def jwt_changed(rig: Rig, **changes: Any) -> None:
    config = rig.store.snapshot.configs[0]
    rig.store.swap((replace(config, jwt=replace(config.jwt, **changes)),))


async def test_a_token_for_one_apps_resource_is_refused_on_another_app(rig: Rig) -> None:
    """One config selects both apps; the token names app a's resource URL (RFC 8707)."""
    token = rig.issuer.token(rig.clock.wall(), aud=resource_url(PUBLIC_URL, "a"))
    session, record = await rig.session(token)
    assert (session.username, record.session) == ("alice@example.com", "new")
    with pytest.raises(InvalidToken) as refused:
        await rig.session(token, APP_B)
    assert refused.value.reason == "wrong_audience"
    # The session of app a is untouched; app b's own resource URL works there.
    assert (await rig.session(token))[1].session == "cached"
    token_b = rig.issuer.token(rig.clock.wall(), aud=resource_url(PUBLIC_URL, "b"))
    assert (await rig.session(token_b, APP_B))[0].username == "alice@example.com"


async def test_resource_audience_off_refuses_the_resource_url(rig: Rig) -> None:
    jwt_changed(rig, resource_audience=False)
    token = rig.issuer.token(rig.clock.wall(), aud=resource_url(PUBLIC_URL, "a"))
    with pytest.raises(InvalidToken) as refused:
        await rig.session(token)
    assert refused.value.reason == "wrong_audience"


async def test_a_401_names_the_required_scopes(rig: Rig) -> None:
    for header in (None, "Bearer not-a-jwt"):
        with pytest.raises(Unauthenticated) as refused:
            await rig.gate.session_for(APP, header, CLIENT, AccessRecord())
        assert refused.value.scope == ()
    jwt_changed(rig, required_scopes=("mcp", "tools.read"))
    for header in (None, "Bearer not-a-jwt"):
        with pytest.raises(Unauthenticated) as refused:
            await rig.gate.session_for(APP, header, CLIENT, AccessRecord())
        assert refused.value.scope == ("mcp", "tools.read")


async def test_a_token_short_of_scope_is_403_and_opens_no_session(rig: Rig) -> None:
    jwt_changed(rig, required_scopes=("mcp",))
    now = rig.clock.wall()
    with pytest.raises(InsufficientScope) as refused:
        await rig.session(rig.issuer.token(now, scope="openid"))
    assert (refused.value.status, refused.value.scope) == (403, ("mcp",))
    assert refused.value.config == "idp"
    assert rig.verified() == 0
    session, _ = await rig.session(rig.issuer.token(now, scope="openid mcp"))
    assert session.identity.claims["scope"] == "openid mcp"


async def test_requiring_a_scope_verifies_live_sessions_again(rig: Rig) -> None:
    token = rig.issuer.token(rig.clock.wall())  # no scope at all
    await rig.session(token)
    jwt_changed(rig, required_scopes=("mcp",))
    with pytest.raises(InsufficientScope):
        await rig.session(token)


async def test_username_claim_list_and_the_claim_kept(rig: Rig) -> None:
    jwt_changed(rig, username_claim=("email", "preferred_username", "sub"))
    now = rig.clock.wall()
    machine = rig.issuer.token(now, email=None, sub="ci-bot")
    session, _ = await rig.session(machine)
    assert (session.username, session.identity.username_claim) == ("ci-bot", "sub")
    person, _ = await rig.session(rig.issuer.token(now))
    assert person.identity.username_claim == "email"


async def test_changing_username_claim_verifies_again(rig: Rig) -> None:
    token = rig.issuer.token(rig.clock.wall(), preferred_username="alice")
    assert (await rig.session(token))[0].username == "alice@example.com"
    jwt_changed(rig, username_claim=("preferred_username",))
    session, record = await rig.session(token)
    assert (session.username, record.session) == ("alice", "new")
