"""The signed identity assertion proxyd sends upstream (Teleport's Teleport-Jwt-Assertion).

A short-lived ES256 JWT (``aud`` = the app, ``exp`` ≤ 10 minutes and never past the session)
signed with a key generated on first start and kept in the state directory, or configured.
Apps verify it with ``/.well-known/jwks.json``. The client's own token never goes upstream
(MCP authorization spec: servers MUST NOT pass tokens through).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from proxyd.auth.session import Session
from proxyd.log import get_logger

log = get_logger("proxyd.identity")

KEY_FILE_NAME = "identity-key.pem"


class KeyFileError(Exception):
    pass


def load_or_create_key(key_file: str, state_dir: str) -> ECKey:
    """Load the configured key, or the state directory's, creating the latter on first start."""
    if key_file:
        return _load(Path(key_file))
    path = Path(state_dir) / KEY_FILE_NAME
    if path.exists():
        return _load(path)
    key = ECKey.generate_key("P-256", private=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: two processes starting together must not overwrite each other's key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load(path)
    except OSError as exc:
        raise KeyFileError(f"cannot create identity key in {state_dir}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.as_pem(private=True))
    log.info("identity_key_created", path=str(path))
    return key


def _load(path: Path) -> ECKey:
    try:
        key = ECKey.import_key(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read identity key {path}: {exc.strerror}") from None
    except (JoseError, ValueError) as exc:
        raise KeyFileError(f"identity key {path} is not an EC private key: {exc}") from None
    if not key.is_private or key.curve_name != "P-256":
        raise KeyFileError(f"identity key {path} must be a P-256 private key")
    return key


class AssertionSigner:
    def __init__(self, key: ECKey, issuer: str, ttl: float) -> None:
        self._key = key
        self._kid = key.thumbprint()
        self._issuer = issuer
        self._ttl = ttl

    @property
    def kid(self) -> str:
        return self._kid

    def jwks(self) -> dict[str, Any]:
        public = self._key.as_dict(private=False)
        return {"keys": [{**public, "kid": self._kid, "alg": "ES256", "use": "sig"}]}

    def assertion_for(self, session: Session, now: float) -> str:
        """The session's assertion, re-signed only when half of its lifetime has passed."""
        if session.assertion is None or now >= session.assertion_refresh_at:
            exp = min(now + self._ttl, session.expires_at)
            identity = session.identity
            claims = {
                "iss": self._issuer,
                "sub": identity.username,
                "username": identity.username,
                "aud": session.app,
                "app": session.app,
                "idp": identity.issuer,
                "auth_config": identity.config,
                "iat": int(now),
                "nbf": int(now) - 1,
                "exp": int(exp),
            }
            header = {"alg": "ES256", "kid": self._kid, "typ": "JWT"}
            session.assertion = jwt.encode(header, claims, self._key, algorithms=["ES256"])
            session.assertion_refresh_at = now + (exp - now) / 2
        return session.assertion
