"""The bearer token of a request (RFC 6750 §2.1), or the 401 that explains what is wrong."""

from __future__ import annotations

import re

from proxyd.errors import MalformedToken, Unauthenticated

# RFC 6750 §2.1 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def bearer_token(header: str | None) -> str:
    if header is None:
        raise Unauthenticated("missing bearer token (send 'Authorization: Bearer <token>')")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise MalformedToken("Authorization header must be 'Bearer <token>'")
    if not _B64TOKEN.fullmatch(token):
        raise MalformedToken("bearer token has characters RFC 6750 does not allow")
    return token
