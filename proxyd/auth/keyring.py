"""AES-256-GCM over a key ring: the first key seals, every key opens (rotation without a
flag day). Used by the self-routing MCP session ids (mcp/sessionid.py) and the sealed session
records in Redis (auth/shared.py); each binds its own associated data, which names the key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KID_LEN, NONCE_LEN = 4, 12  # kid: the first 4 bytes of the key's SHA-256 (public, no secret)

AssociatedData = Callable[[bytes], bytes]  # the kid → the AAD the sealed bytes are bound to


class KeyRing:
    def __init__(
        self, keys: Sequence[bytes], random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        if not keys:
            raise ValueError("the key ring needs at least one key")
        self._ring = [(hashlib.sha256(k).digest()[:KID_LEN], AESGCM(k)) for k in keys]
        self._by_kid = dict(reversed(self._ring))  # the first key wins a (2^-32) kid collision
        self._random = random_bytes

    def seal(self, plain: bytes, aad: AssociatedData) -> bytes:
        """kid + nonce + ciphertext, under the first key."""
        kid, aead = self._ring[0]
        nonce = self._random(NONCE_LEN)
        return kid + nonce + aead.encrypt(nonce, plain, aad(kid))

    def open(self, raw: bytes, aad: AssociatedData) -> bytes | None:
        """The plain bytes, or None: not sealed by a key of the ring, altered, or bound to
        other associated data."""
        kid, nonce = raw[:KID_LEN], raw[KID_LEN : KID_LEN + NONCE_LEN]
        aead = self._by_kid.get(kid)
        if aead is None or len(nonce) != NONCE_LEN:
            return None
        try:
            return aead.decrypt(nonce, raw[KID_LEN + NONCE_LEN :], aad(kid))
        except InvalidTag:
            return None
