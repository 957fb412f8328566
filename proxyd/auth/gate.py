"""SessionGate: a bearer token → the session it opens for an app (DESIGN.md steps 3-5).

The most security-critical decisions of the request path live here, testable without HTTP:
an established session costs a hash and a cache lookup (plus the per-user limit), a session
whose app auth config changed is verified again and one whose config is gone ends, a new token
first spends a token of the per-address limiter and is verified once however many requests
carry it at the same time (single flight).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from proxyd.access import AccessRecord
from proxyd.auth.appauth import Authenticator, AuthSnapshot
from proxyd.auth.bearer import bearer_token
from proxyd.auth.session import FOREIGN_VERSION, Session, SessionStore, session_key
from proxyd.clock import Clocks
from proxyd.errors import InvalidToken, ProxydError, Unauthenticated
from proxyd.log import get_logger
from proxyd.metrics import Metrics
from proxyd.netaddr import ClientView
from proxyd.ratelimit import Limits
from proxyd.registry import App
from proxyd.tracing import step

log = get_logger("proxyd.auth")


class AuditSink(Protocol):
    """Where app_auth.verify.* events go (proxyd.mcp.audit.Auditor), without importing it."""

    def emit(self, event: str, **fields: Any) -> None: ...


class SessionGate:
    def __init__(
        self,
        sessions: SessionStore,
        authenticator: Authenticator,
        limits: Limits,
        metrics: Metrics,
        auditor: AuditSink,
        clocks: Clocks,
    ) -> None:
        self.sessions = sessions
        self.authenticator = authenticator
        self.limits = limits
        self.metrics = metrics
        self.auditor = auditor
        self.clocks = clocks
        self._pending: dict[str, asyncio.Future[Session]] = {}
        # (snapshot generation, config, app) → whether the config selects the app. App labels
        # only change with a reload, which builds a new gate; the snapshot's generation moves
        # with every app auth config change: the hot path pays a dict lookup.
        self._covers: dict[tuple[int, str, str], bool] = {}

    async def session_for(
        self, app: App, authorization: str | None, client: ClientView, record: AccessRecord
    ) -> Session:
        """The session of the bearer token in ``authorization`` for ``app``; raises the
        ProxydError that answers the request otherwise (a 401 names the scopes the app's
        configs require, for the client's next authorization)."""
        try:
            return await self._session_for(app, authorization, client, record)
        except Unauthenticated as err:
            if not err.scope:
                err.scope = self.authenticator.store.snapshot.scopes_for(app.labels)
            raise

    async def _session_for(
        self, app: App, authorization: str | None, client: ClientView, record: AccessRecord
    ) -> Session:
        try:
            token = bearer_token(authorization)
        except ProxydError:
            await self.limits.unauthenticated(client.address)
            raise
        key = session_key(app.name, token)
        session = await self.sessions.get(key)
        charge = True
        if session is not None:
            identity = session.identity
            snapshot = self.authenticator.store.snapshot
            version = snapshot.versions.get(identity.config)
            # The config must still select this app: the fingerprint (shared sessions) and
            # version (local ones) cover the config, not the app's labels, which another
            # instance or a reload may set so that no config here accepts the token for it.
            covers = self._config_covers(snapshot, identity.config, app)
            if version == identity.config_version and covers:
                record.user, record.session = session.username, "cached"
                if self.limits.per_user_is_shared:
                    await self.limits.shared_per_user(identity.issuer, identity.username)
                else:
                    # In memory: no await on the hot path.
                    self.limits.per_user(identity.issuer, identity.username)
                return session
            # The app auth config this session came from changed or went away (issue 4):
            # removed ends the session, changed verifies the token again under the new one.
            # A session shared by another instance under a config that differs here
            # (FOREIGN_VERSION) is verified again too, even if this instance lacks the config.
            await self.sessions.delete(key)
            if version is None and identity.config_version != FOREIGN_VERSION:
                self.metrics.auth.labels("failure", "config_removed").inc()
                log.info(
                    "session_ended",
                    app=app.name,
                    user=identity.username,
                    config=identity.config,
                    reason="config_removed",
                )
                raise InvalidToken(
                    "the app auth config of this session was removed", reason="config_removed"
                )
            charge = False  # an established client, not an unauthenticated one
        pending = self._pending.get(key)
        if pending is None and charge:
            # Everything below costs crypto or a key fetch: the per-address limiter goes
            # first, so a flood of guessed tokens is turned away for a dict lookup.
            await self.limits.unauthenticated(client.address)
            # A shared limiter waits for Redis: another request with this token may have
            # started the verification meanwhile (in memory this never suspends).
            pending = self._pending.get(key)
        if pending is None:
            # Single flight: a client opening its GET stream and POSTs at once with a new
            # token pays one verification and one limiter token, not one per request.
            pending = asyncio.ensure_future(self._new_session(key, app, token, client))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        session = await asyncio.shield(pending)
        record.user, record.session = session.username, "new"
        return session

    def _config_covers(self, snapshot: AuthSnapshot, name: str, app: App) -> bool:
        memo = (snapshot.generation, name, app.name)
        covers = self._covers.get(memo)
        if covers is None:
            config = snapshot.config(name)
            covers = config is not None and config.app_labels.matches(app.labels)
            if len(self._covers) > 4096:  # older generations: never asked again
                self._covers.clear()
            self._covers[memo] = covers
        return covers

    def _settled(self, key: str, done: asyncio.Future[Session]) -> None:
        self._pending.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have gone away

    async def _new_session(self, key: str, app: App, token: str, client: ClientView) -> Session:
        try:
            # A span of the request that started it, when traced (a cached session has none).
            with step("proxyd.verify_token", {"proxyd.app": app.name}):
                identity = await self.authenticator.authenticate(app.name, app.labels, token)
                if identity.expires_at <= self.clocks.wall():
                    # Past exp, accepted only by the verification leeway: the session would
                    # have TTL 0 and the upstream an assertion expired at birth: it is over.
                    raise InvalidToken("token has expired", reason="expired")
        except ProxydError as err:
            self.metrics.auth.labels("failure", err.reason).inc()
            log.info("auth_rejected", app=app.name, client=client.address, reason=err.reason)
            self.auditor.emit(
                "app_auth.verify.failure",
                app=app.name,
                client=client.address,
                config=err.config,
                reason=err.reason,
            )
            raise
        self.metrics.auth.labels("success", "verified").inc()
        self.auditor.emit(
            "app_auth.verify.success",
            app=app.name,
            client=client.address,
            user=identity.username,
            username_claim=identity.username_claim,
            issuer=identity.issuer,
            config=identity.config,
        )
        session = await self.sessions.create(key, app.name, identity)
        log.info(
            "session_created",
            app=app.name,
            user=identity.username,
            config=identity.config,
            client=client.address,
            expires_in=round(session.expires_at - self.clocks.wall(), 1),
        )
        return session

    async def close(self) -> None:
        pending = list(self._pending.values())
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
