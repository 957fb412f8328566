"""The one error tree of proxyd and its mapping to HTTP answers (DESIGN.md "HTTP answers").

Handlers raise; ``error_response`` is the only place a ProxydError becomes a response. On the
MCP endpoint the body is a JSON-RPC error object so MCP clients show the message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from aiohttp import web

# JSON-RPC 2.0 §5.1 codes; -32020 is the MCP 2026-07-28 header/body mismatch (SEP-2243).
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020


class ProxydError(Exception):
    status = 500
    jsonrpc_code = INTERNAL_ERROR
    reason = "internal"
    config: str | None = None  # the app auth config that refused a token, when one did
    # The connection cannot carry another request (the client's body was left half read).
    closes_connection = False

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def extra_headers(self) -> Mapping[str, str]:
        return {}


class BadRequest(ProxydError):
    status = 400
    jsonrpc_code = INVALID_REQUEST
    reason = "bad_request"


class McpHeaderMismatch(BadRequest):
    jsonrpc_code = HEADER_MISMATCH
    reason = "header_mismatch"


class Unauthenticated(ProxydError):
    """No usable credentials (RFC 6750 §3.1: no error code when none were sent)."""

    status = 401
    jsonrpc_code = INVALID_REQUEST
    reason = "missing_token"
    oauth_error: str | None = None
    # The scopes the app's auth configs require, for the challenge's scope= (MCP 2025-11-25
    # scope selection); set by the session gate, which knows the app.
    scope: tuple[str, ...] = ()


class MalformedToken(Unauthenticated):
    reason = "malformed_header"
    oauth_error = "invalid_request"


class InvalidToken(Unauthenticated):
    """The token was presented and refused; ``reason`` is a stable snake_case code."""

    reason = "invalid_token"
    oauth_error = "invalid_token"


class Forbidden(ProxydError):
    status = 403
    jsonrpc_code = INVALID_REQUEST
    reason = "forbidden"


class InsufficientScope(Forbidden):
    """A valid token without the scope an operation needs (RFC 6750 §3.1): the client may
    authorize again asking for ``scope`` (MCP 2025-11-25 step-up authorization)."""

    reason = "insufficient_scope"

    def __init__(self, message: str, scope: tuple[str, ...]) -> None:
        super().__init__(message)
        self.scope = scope


class NotFound(ProxydError):
    status = 404
    jsonrpc_code = INVALID_REQUEST
    reason = "not_found"


class MethodNotAllowed(ProxydError):
    status = 405
    jsonrpc_code = INVALID_REQUEST
    reason = "method_not_allowed"

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow

    def extra_headers(self) -> Mapping[str, str]:
        return {"Allow": ", ".join(self.allow)}


class PayloadTooLarge(ProxydError):
    status = 413
    jsonrpc_code = INVALID_REQUEST
    reason = "body_too_large"


class UnsupportedMediaType(ProxydError):
    """A POST body proxyd cannot read exactly as the upstream will (issue 10)."""

    status = 415
    jsonrpc_code = INVALID_REQUEST
    reason = "unsupported_media_type"


class RequestTimeout(ProxydError):
    """The client stopped sending its request body (``server.body_timeout`` of silence)."""

    status = 408
    jsonrpc_code = INVALID_REQUEST
    reason = "body_timeout"
    closes_connection = True  # RFC 9110 §15.5.9: the server closes after a 408


class HeadersTooLarge(ProxydError):
    status = 431
    jsonrpc_code = INVALID_REQUEST
    reason = "headers_too_large"


class RetryAfter(ProxydError):
    """An answer that says when to come back (RFC 9110 §10.2.3)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def extra_headers(self) -> Mapping[str, str]:
        # delay-seconds is a non-negative integer; never advertise 0.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class RateLimited(RetryAfter):
    status = 429
    jsonrpc_code = INVALID_REQUEST
    reason = "rate_limited"


class UpstreamError(ProxydError):
    status = 502
    reason = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = "upstream_timeout"


class ConnectFailed(UpstreamError):
    """No connection to the upstream was made: nothing of the request reached it, so the
    caller may try another server."""


class UpstreamConnectTimeout(ConnectFailed):
    status = 504
    reason = "upstream_connect_timeout"


class UpstreamTlsFailed(ConnectFailed):
    """The TLS handshake with the app server failed (its certificate did not verify, or it
    refused ours): never a fallback to anything less verified (issue 13 §2)."""

    status = 502
    reason = "upstream_tls"


class ServiceUnavailable(ProxydError):
    status = 503
    reason = "unavailable"


class StateUnavailable(RetryAfter, ServiceUnavailable):
    """The shared rate limiter cannot decide (Redis down) and ``limiter_failure = "closed"``.

    503, not 429: the client did nothing wrong and exceeded no limit; the service cannot take
    the request right now, and says when to try again (RFC 9110 §15.6.4)."""

    reason = "state_unavailable"


def error_body(code: int, message: str, status: int, reason: str) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": code,
                "message": message,
                "data": {"status": status, "reason": reason},
            },
        },
        separators=(",", ":"),
    ).encode()


# RFC 6750 §3: error_description is limited to %x20-21 / %x23-5B / %x5D-7E.
_DESCRIPTION_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"}
_DESCRIPTION_MAX = 200


def _description(message: str) -> str:
    # Messages may quote attacker-controlled token fields (e.g. ``alg``): a CR/LF there made
    # aiohttp refuse to write the headers and drop the connection instead of answering 401.
    text = "".join(c if c in _DESCRIPTION_CHARS else "?" for c in message)
    return text[:_DESCRIPTION_MAX]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def error_response(err: ProxydError, *, resource_metadata: str | None = None) -> web.Response:
    headers: dict[str, str] = dict(err.extra_headers())
    if isinstance(err, Unauthenticated):
        # RFC 6750 §3 + RFC 9728 §5.1: point MCP clients at the protected resource metadata
        # so they can start OAuth against the right authorization server.
        params = []
        if resource_metadata:
            params.append(f"resource_metadata={_quote(resource_metadata)}")
        if err.scope:
            params.append(f"scope={_quote(' '.join(err.scope))}")
        if err.oauth_error:
            params.append(f"error={_quote(err.oauth_error)}")
            params.append(f"error_description={_quote(_description(err.message))}")
        headers["WWW-Authenticate"] = "Bearer" + (" " + ", ".join(params) if params else "")
    elif isinstance(err, InsufficientScope):
        # RFC 6750 §3.1 + MCP 2025-11-25 step-up: the scopes to authorize again with.
        params = ['error="insufficient_scope"', f"scope={_quote(' '.join(err.scope))}"]
        if resource_metadata:
            params.append(f"resource_metadata={_quote(resource_metadata)}")
        params.append(f"error_description={_quote(_description(err.message))}")
        headers["WWW-Authenticate"] = "Bearer " + ", ".join(params)
    response = web.Response(
        status=err.status,
        body=error_body(err.jsonrpc_code, err.message, err.status, err.reason),
        content_type="application/json",
        headers=headers,
    )
    if err.closes_connection:
        response.force_close()
    return response
