"""App auth configs: which configs apply to an app, and verifying a token against them.

The store holds one immutable snapshot and swaps it whole (the watcher of issue 4 builds a new
snapshot and calls ``swap``), so a request sees the old set or the new one, never a mix.
Configs are only consulted when no session exists for a token (Teleport PR #64350).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxyd.auth.jwks import JwksCache, JwksUnavailable
from proxyd.auth.jwt import Identity, UnverifiedToken, peek, verify
from proxyd.auth.keys import KeySet, parse_jwks
from proxyd.config import AppAuthConfig
from proxyd.errors import InvalidToken, ServiceUnavailable
from proxyd.log import get_logger

log = get_logger("proxyd.auth")


@dataclass(frozen=True, slots=True)
class AuthSnapshot:
    generation: int
    configs: tuple[AppAuthConfig, ...]  # sorted by name
    static_keys: Mapping[str, KeySet]  # config name → parsed static_jwks

    def for_labels(self, labels: Mapping[str, str]) -> tuple[AppAuthConfig, ...]:
        return tuple(c for c in self.configs if c.app_labels.matches(labels))


def build_snapshot(configs: tuple[AppAuthConfig, ...], generation: int) -> AuthSnapshot:
    static = {
        c.name: parse_jwks(c.jwt.static_jwks.encode(), c.jwt.algorithms)
        for c in configs
        if c.jwt.static_jwks is not None
    }
    return AuthSnapshot(generation, tuple(sorted(configs, key=lambda c: c.name)), static)


class AppAuthStore:
    def __init__(self, configs: tuple[AppAuthConfig, ...]) -> None:
        self._snapshot = build_snapshot(configs, 1)

    @property
    def snapshot(self) -> AuthSnapshot:
        return self._snapshot

    def swap(self, configs: tuple[AppAuthConfig, ...]) -> AuthSnapshot:
        self._snapshot = build_snapshot(configs, self._snapshot.generation + 1)
        return self._snapshot


class Authenticator:
    """Verifies a bearer token for an app against the matching app auth configs, in name order."""

    def __init__(
        self, store: AppAuthStore, jwks: JwksCache, wall_clock: Callable[[], float]
    ) -> None:
        self._store = store
        self._jwks = jwks
        self._now = wall_clock

    async def authenticate(self, app: str, labels: Mapping[str, str], raw: str) -> Identity:
        snapshot = self._store.snapshot
        configs = snapshot.for_labels(labels)
        if not configs:
            raise InvalidToken("token not accepted for this app", reason="no_matching_config")
        token = peek(raw)
        failures: list[InvalidToken] = []
        unavailable: list[str] = []
        for config in configs:
            if config.jwt.issuer != token.issuer:
                continue  # cheap pre-filter: no key fetch for an unrelated identity provider
            try:
                keyset = await self._keys(snapshot, config, token)
                identity = verify(token, keyset, config.jwt, config.name, self._now())
            except InvalidToken as exc:
                failures.append(exc)
                log.info("app_auth_attempt_failed", app=app, config=config.name, reason=exc.reason)
                continue
            except JwksUnavailable as exc:
                unavailable.append(config.name)
                log.warning(
                    "app_auth_keys_unavailable", app=app, config=config.name, error=str(exc)
                )
                continue
            return identity
        if unavailable:
            # Some config that might accept this token could not be checked: "try again" is
            # the honest answer, not a definitive 401.
            raise ServiceUnavailable(
                "identity provider keys are unavailable; try again shortly",
                reason="jwks_unavailable",
            )
        if failures:
            raise failures[0]
        raise InvalidToken("token issuer is not accepted for this app", reason="wrong_issuer")

    async def _keys(
        self, snapshot: AuthSnapshot, config: AppAuthConfig, token: UnverifiedToken
    ) -> KeySet:
        static = snapshot.static_keys.get(config.name)
        if static is not None:
            return static
        assert config.jwt.jwks_url is not None  # config validation: exactly one key source
        kid = token.header.get("kid")
        return await self._jwks.keys(
            config.jwt.jwks_url, config.jwt.algorithms, kid if isinstance(kid, str) else None
        )
