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
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "pxs1."
_KID_LEN, _NONCE_LEN = 4, 12
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
        if not keys:
            raise ValueError("the key ring needs at least one key")
        self._ring = [(hashlib.sha256(k).digest()[:_KID_LEN], AESGCM(k)) for k in keys]
        self._by_kid = dict(reversed(self._ring))  # the first key wins a (2^-32) kid collision
        self._random = random_bytes

    def seal(self, pin: Pin) -> str:
        kid, aead = self._ring[0]
        nonce = self._random(_NONCE_LEN)
        plain = json.dumps(
            [pin.app, pin.server, pin.upstream_id, pin.issuer, pin.username],
            separators=(",", ":"),
        ).encode()
        sealed = aead.encrypt(nonce, plain, PREFIX.encode() + kid)
        return PREFIX + base64.urlsafe_b64encode(kid + nonce + sealed).rstrip(b"=").decode()

    def open(self, session_id: str) -> Pin | None:
        """The pin inside a proxyd session id, or None: not ours, forged, or from a removed key."""
        if not session_id.startswith(PREFIX) or len(session_id) > MAX_ID_LENGTH:
            return None
        body = session_id[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            return None
        kid, nonce, sealed = (
            raw[:_KID_LEN],
            raw[_KID_LEN : _KID_LEN + _NONCE_LEN],
            raw[_KID_LEN + _NONCE_LEN :],
        )
        aead = self._by_kid.get(kid)
        if aead is None or len(nonce) != _NONCE_LEN:
            return None
        try:
            plain = aead.decrypt(nonce, sealed, PREFIX.encode() + kid)
            fields = json.loads(plain)
        except (InvalidTag, ValueError):
            return None
        if not (
            isinstance(fields, list)
            and len(fields) == 5
            and all(isinstance(f, str) for f in fields)
        ):
            return None
        return Pin(*fields)
