"""Verified sessions shared between proxyd instances through Redis (aiocache's RedisCache).

A token verified by one instance is a session for all: a record under the session key (a
hash of app and token, never the token) holds the identity and a fingerprint of the app auth
config that accepted it. Another instance trusts the record only when its own config of that
name has the same fingerprint, and then gives it the local config version; otherwise it
verifies the token again (see handler.session_for and FOREIGN_VERSION).

Records are JSON (never pickle: whoever can write Redis would run code in proxyd) and sealed
with AES-256-GCM under a key derived from ``sessions.mcp_keys``, bound to their Redis key: a
Redis writer can neither mint a session nor move one to a token of their own, and readers of
Redis see no identities. A record that does not open, parse or match is a miss, never an error.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxyd.auth.appauth import AppAuthStore
from proxyd.auth.jwt import Identity
from proxyd.auth.keyring import AssociatedData, KeyRing
from proxyd.auth.session import FOREIGN_VERSION, Session
from proxyd.state import RedisState, StateDown

RECORD_PREFIX = "pxr1."
RECORD_VERSION = 1
# Separates this use of the MCP session keys from sealing MCP session ids (sessionid.py).
_HKDF_INFO = b"proxyd shared session record v1"
_MAX_RECORD = 64 * 1024  # far above a real record (claims are capped at 4 KiB)


def _derive(key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(key)


class RecordSealer:
    """Session records sealed over the ring of ``sessions.mcp_keys`` (rotation as for the MCP
    session ids), each bound to the Redis key it is stored under."""

    def __init__(
        self, keys: Sequence[bytes], random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._ring = KeyRing([_derive(k) for k in keys], random_bytes)

    def seal(self, plain: bytes, where: str) -> str:
        raw = self._ring.seal(plain, self._aad(where))
        return RECORD_PREFIX + base64.urlsafe_b64encode(raw).decode()

    def open(self, text: str, where: str) -> bytes | None:
        if not text.startswith(RECORD_PREFIX) or len(text) > _MAX_RECORD:
            return None
        try:
            raw = base64.urlsafe_b64decode(text[len(RECORD_PREFIX) :])
        except (binascii.Error, ValueError):
            return None
        return self._ring.open(raw, self._aad(where))

    @staticmethod
    def _aad(where: str) -> AssociatedData:
        # Bound to the session key: a record copied under another key does not open.
        return lambda kid: RECORD_PREFIX.encode() + kid + b"\x00" + where.encode()


def encode_record(session: Session, fingerprint: str) -> bytes:
    identity = session.identity
    doc = {
        "v": RECORD_VERSION,
        "app": session.app,
        "expires_at": session.expires_at,
        "username": identity.username,
        "username_claim": identity.username_claim,
        "issuer": identity.issuer,
        "subject": identity.subject,
        "config": identity.config,
        "fingerprint": fingerprint,
        "token_expires_at": identity.expires_at,
        "issued_at": identity.issued_at,
        "claims": dict(identity.claims),
        "dropped_claims": sorted(identity.dropped_claims),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def decode_record(plain: bytes) -> dict[str, Any] | None:
    """The record's fields when every one has its type; None otherwise."""
    try:
        doc = json.loads(plain)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("v") != RECORD_VERSION:
        return None
    strings = ("app", "username", "issuer", "config", "fingerprint")
    if not all(isinstance(doc.get(name), str) for name in strings):
        return None
    if doc.get("subject") is not None and not isinstance(doc["subject"], str):
        return None
    # Absent in records written before username_claim was kept (same record version).
    if not isinstance(doc.setdefault("username_claim", ""), str):
        return None
    numbers = ("expires_at", "token_expires_at", "issued_at")
    if any(_number(doc.get(name)) is None for name in numbers):
        return None
    dropped = doc.get("dropped_claims")
    if not isinstance(doc.get("claims"), dict) or not isinstance(dropped, list):
        return None
    if not all(isinstance(name, str) for name in dropped):
        return None
    return doc


class SharedSessions:
    """The Redis tier of SessionStore. Every Redis problem is a miss (or a skipped write)."""

    def __init__(
        self,
        cache: Any,
        state: RedisState,
        store: AppAuthStore,
        keys: Sequence[bytes],
        clock: Callable[[], float],
    ) -> None:
        self._cache = cache  # aiocache RedisCache, JSON serializer
        self._state = state
        self._store = store
        self._sealer = RecordSealer(keys)
        self._clock = clock

    def set_keys(self, keys: Sequence[bytes]) -> None:
        """sessions.mcp_keys changed on reload: seal with the new first key from now on."""
        self._sealer = RecordSealer(keys)

    async def get(self, key: str) -> Session | None:
        try:
            text = await self._state.run("session_get", lambda: self._cache.get(key))
        except StateDown:
            return None
        except ValueError:
            return None  # not JSON (or not UTF-8): not a record of ours
        if not isinstance(text, str):
            return None
        plain = self._sealer.open(text, key)
        doc = decode_record(plain) if plain is not None else None
        if doc is None:
            return None
        return self._session(key, doc)

    def _session(self, key: str, doc: Mapping[str, Any]) -> Session:
        snapshot = self._store.snapshot
        config = doc["config"]
        same = snapshot.fingerprints.get(config) == doc["fingerprint"]
        version = snapshot.versions[config] if same else FOREIGN_VERSION
        identity = Identity(
            username=doc["username"],
            issuer=doc["issuer"],
            subject=doc["subject"],
            config=config,
            expires_at=float(doc["token_expires_at"]),
            issued_at=float(doc["issued_at"]),
            claims=doc["claims"],
            config_version=version,
            dropped_claims=frozenset(doc["dropped_claims"]),
            username_claim=doc["username_claim"],
        )
        return Session(
            key=key, app=doc["app"], identity=identity, expires_at=float(doc["expires_at"])
        )

    async def put(self, session: Session) -> None:
        identity = session.identity
        snapshot = self._store.snapshot
        if snapshot.versions.get(identity.config) != identity.config_version:
            return  # the config changed while this token was verified: do not spread it
        fingerprint = snapshot.fingerprints[identity.config]
        ttl = session.expires_at - self._clock()
        if ttl < 0.001:  # Redis expiries are whole milliseconds
            return
        text = self._sealer.seal(encode_record(session, fingerprint), session.key)
        try:
            await self._state.run(
                "session_set", lambda: self._cache.set(session.key, text, ttl=ttl)
            )
        except StateDown:
            return  # this instance keeps it locally; others verify the token themselves

    async def delete(self, key: str) -> None:
        try:
            await self._state.run("session_delete", lambda: self._cache.delete(key))
        except StateDown:
            return
