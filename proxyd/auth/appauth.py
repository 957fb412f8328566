"""App auth configs: which configs apply to an app, and verifying a token against them.

The store holds one immutable snapshot and swaps it whole (the watcher of issue 4 builds a new
snapshot and calls ``swap``), so a request sees the old set or the new one, never a mix.
Configs are only consulted when no session exists for a token (Teleport PR #64350).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxyd.auth.jwks import JwksCache, JwksUnavailable
from proxyd.auth.jwt import Identity, UnverifiedToken, peek, verify
from proxyd.auth.keys import KeySet, KeySetError, RejectedKey, parse_jwks
from proxyd.config import AppAuthConfig
from proxyd.errors import InsufficientScope, InvalidToken, ServiceUnavailable
from proxyd.labels import LabelSelector
from proxyd.log import get_logger

log = get_logger("proxyd.auth")


@dataclass(frozen=True, slots=True)
class AuthSnapshot:
    generation: int
    configs: tuple[AppAuthConfig, ...]  # sorted by name
    static_keys: Mapping[str, KeySet]  # config name → parsed static_jwks
    # config name → the generation in which it last changed. A session remembers the version
    # it was verified under: a different one means "verify again", none means "removed".
    versions: Mapping[str, int]
    # config name → fingerprint of what the config accepts: unlike a version (a counter of
    # this process), it means the same in every proxyd process, so a session shared through
    # Redis by another instance is trusted here only under an identical config.
    fingerprints: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def config(self, name: str) -> AppAuthConfig | None:
        for config in self.configs:
            if config.name == name:
                return config
        return None

    def for_labels(self, labels: Mapping[str, str]) -> tuple[AppAuthConfig, ...]:
        return tuple(c for c in self.configs if c.app_labels.matches(labels))

    def scopes_for(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        """The required scopes of the configs that select an app, in config order (RFC 9728
        scopes_supported, the challenge's scope=)."""
        scopes = (s for c in self.for_labels(labels) for s in c.jwt.required_scopes)
        return tuple(dict.fromkeys(scopes))


def build_snapshot(
    configs: tuple[AppAuthConfig, ...], generation: int, previous: AuthSnapshot | None = None
) -> AuthSnapshot:
    static: dict[str, KeySet] = {}
    versions: dict[str, int] = {}
    for config in configs:
        before = previous.config(config.name) if previous is not None else None
        unchanged = before is not None and _same(before, config)
        versions[config.name] = (
            previous.versions[config.name] if unchanged and previous else generation
        )
        if config.jwt.static_jwks is not None:
            static[config.name] = _static_keys(config, log_rejected=not unchanged)
    ordered = tuple(sorted(configs, key=lambda c: c.name))
    fingerprints = {c.name: fingerprint(c) for c in configs}
    return AuthSnapshot(generation, ordered, static, versions, fingerprints)


def _static_keys(config: AppAuthConfig, *, log_rejected: bool) -> KeySet:
    # Config validation (_check_static_jwks) makes a rejected static key a config error, so
    # this logs only for configs built without it; once per config version, not per reload.
    assert config.jwt.static_jwks is not None
    try:
        keyset = parse_jwks(config.jwt.static_jwks.encode(), config.jwt.algorithms)
    except KeySetError as exc:
        _log_rejected(config, exc.rejected)
        raise
    if log_rejected:
        _log_rejected(config, keyset.rejected)
    return keyset


def _log_rejected(config: AppAuthConfig, rejected: tuple[RejectedKey, ...]) -> None:
    for key in rejected:
        log.warning(  # kid and reason only: never key material
            "jwks_key_rejected",
            config=config.name,
            source=config.source,
            kid=key.kid,
            index=key.index,
            reason=key.reason,
        )


def fingerprint(config: AppAuthConfig) -> str:
    """A digest of what ``_same`` compares (name, app_labels, jwt), stable across processes."""
    jwt = config.jwt
    doc = [
        config.name,
        _selector_doc(config.app_labels),
        [
            jwt.issuer,
            list(jwt.audience),
            jwt.resource_audience,
            jwt.jwks_url,
            jwt.static_jwks,
            list(jwt.username_claim),
            sorted(jwt.algorithms),
            list(jwt.required_scopes),
            jwt.max_token_age,
            jwt.leeway,
        ],
    ]
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _selector_doc(selector: LabelSelector) -> list[object]:
    return [
        selector.match_all,
        [
            [key, sorted(m.exact), m.any_value, [p.pattern for p in m.patterns]]
            for key, m in selector.terms
        ],
    ]


def _same(a: AppAuthConfig, b: AppAuthConfig) -> bool:
    # Where a config is defined (main file or which file) is not part of what it accepts.
    return (a.name, a.app_labels, a.jwt) == (b.name, b.app_labels, b.jwt)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # added | updated | removed
    name: str
    source: str


def diff(before: AuthSnapshot, after: AuthSnapshot) -> list[Change]:
    old = {c.name: c for c in before.configs}
    new = {c.name: c for c in after.configs}
    changes = [Change("removed", n, old[n].source) for n in sorted(old.keys() - new.keys())]
    for name in sorted(new):
        if name not in old:
            changes.append(Change("added", name, new[name].source))
        elif after.versions[name] != before.versions[name]:
            changes.append(Change("updated", name, new[name].source))
    return changes


class AppAuthStore:
    def __init__(self, configs: tuple[AppAuthConfig, ...]) -> None:
        self._snapshot = build_snapshot(configs, 1)
        self.loaded_at = time.time()

    @property
    def snapshot(self) -> AuthSnapshot:
        return self._snapshot

    def swap(self, configs: tuple[AppAuthConfig, ...]) -> list[Change]:
        """Install a new set atomically; the changes, one per added/updated/removed config."""
        before = self._snapshot
        after = build_snapshot(configs, before.generation + 1, before)
        changes = diff(before, after)
        if changes:
            self._snapshot = after
            self.loaded_at = time.time()
        elif [c.source for c in after.configs] != [c.source for c in before.configs]:
            # Only where a config is defined moved (a file renamed): no change and no new
            # generation, but later log lines must name the file it now comes from.
            self._snapshot = dataclasses.replace(after, generation=before.generation)
        return changes


def resource_url(public_url: str, app: str) -> str:
    """An app's resource identifier: the ``resource`` of its protected resource metadata
    (RFC 9728), which RFC 8707 clients ask tokens for."""
    return f"{public_url}/mcp/apps/{app}"


class Authenticator:
    """Verifies a bearer token for an app against the matching app auth configs, in name order.

    ``public_url``: where the apps' resource URLs live; a config with ``resource_audience``
    accepts a token whose ``aud`` holds the app's (RFC 8707). None accepts configured
    audiences only."""

    def __init__(
        self,
        store: AppAuthStore,
        jwks: JwksCache,
        wall_clock: Callable[[], float],
        public_url: str | None = None,
    ) -> None:
        self._store = store
        self._jwks = jwks
        self._now = wall_clock
        self._public_url = public_url

    @property
    def store(self) -> AppAuthStore:
        return self._store

    async def authenticate(
        self, app: str, labels: Mapping[str, str], raw: str, resource: str | None = None
    ) -> Identity:
        """``resource``: the app's resource URL, when not the one ``public_url`` gives."""
        if resource is None and self._public_url is not None:
            resource = resource_url(self._public_url, app)
        snapshot = self._store.snapshot
        configs = snapshot.for_labels(labels)
        if not configs:
            raise InvalidToken("token not accepted for this app", reason="no_matching_config")
        token = peek(raw)
        failures: list[InvalidToken | InsufficientScope] = []
        unavailable: list[str] = []
        for config in configs:
            if config.jwt.issuer != token.issuer:
                continue  # cheap pre-filter: no key fetch for an unrelated identity provider
            try:
                keyset = await self._keys(snapshot, config, token)
                identity = verify(token, keyset, config.jwt, config.name, self._now(), resource)
            except (InvalidToken, InsufficientScope) as exc:
                exc.config = config.name
                failures.append(exc)
                log.info("app_auth_attempt_failed", app=app, config=config.name, reason=exc.reason)
                continue
            except JwksUnavailable as exc:
                unavailable.append(config.name)
                log.warning(
                    "app_auth_keys_unavailable", app=app, config=config.name, error=str(exc)
                )
                continue
            return dataclasses.replace(identity, config_version=snapshot.versions[config.name])
        if unavailable:
            # Some config that might accept this token could not be checked: "try again" is
            # the honest answer, not a definitive 401.
            raise ServiceUnavailable(
                "identity provider keys are unavailable; try again shortly",
                reason="jwks_unavailable",
            )
        # A token some config found valid but short of scope: 403 with the scopes to ask for
        # (the client can fix that by authorizing again), not another config's 401.
        short = [f for f in failures if isinstance(f, InsufficientScope)]
        if short:
            raise short[0]
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
