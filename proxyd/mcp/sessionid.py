"""Self-routing MCP session ids: what a client holds instead of the upstream's Mcp-Session-Id.

In the 2025-era transport a session lives on the ONE app server that minted it, so every later
request must go back there — from any proxyd instance, without shared state. The id handed to
the client carries, sealed with AES-256-GCM, the app, the app server, the upstream session id
and the caller's identity (issuer + username: identity, not token bytes, so a refreshed token
keeps the session; toolhive#5306). A key ring rotates keys: the first seals, all open
(agentgateway #2397 asked for exactly this).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxyd.auth.keyring import KeyRing

PREFIX = "pxs1."
# Mcp-Session-Id must be visible ASCII (MCP transport §Session Management); ids above this
# length are not ours and are refused before any crypto.
MAX_ID_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class Pin:
    app: str
    server: str
    upstream_id: str
    issuer: str
    username: str


class SessionIdCodec:
    def __init__(
        self, keys: Sequence[bytes], random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._ring = KeyRing(keys, random_bytes)

    def seal(self, pin: Pin) -> str:
        plain = json.dumps(
            [pin.app, pin.server, pin.upstream_id, pin.issuer, pin.username],
            separators=(",", ":"),
        ).encode()
        raw = self._ring.seal(plain, _aad)
        return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def open(self, session_id: str) -> Pin | None:
        """The pin inside a proxyd session id, or None: not ours, forged, or from a removed key."""
        if not session_id.startswith(PREFIX) or len(session_id) > MAX_ID_LENGTH:
            return None
        body = session_id[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            return None
        plain = self._ring.open(raw, _aad)
        try:
            fields = json.loads(plain) if plain is not None else None
        except ValueError:
            return None
        if not (
            isinstance(fields, list)
            and len(fields) == 5
            and all(isinstance(f, str) for f in fields)
        ):
            return None
        return Pin(*fields)


def _aad(kid: bytes) -> bytes:
    return PREFIX.encode() + kid
