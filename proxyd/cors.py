"""CORS (Fetch standard): which browser origins may read proxyd's answers, and the preflight.

proxyd's policy is the only one (the upstream's ``Access-Control-*`` are dropped by
``forward.response_headers``):

- ``/mcp/apps/*``: an Origin in ``server.allowed_origins`` or ``public_url``'s own (the set
  ``McpHandler.check_origin`` accepts) gets its origin echoed, ``Vary: Origin`` and the MCP
  headers exposed on every answer, forwarded or proxyd's own (401 with ``WWW-Authenticate``,
  403, 404, 415, 429 with ``Retry-After``, 5xx). Preflights are answered for those origins, the
  MCP methods and the MCP request headers only; anything else is a 403 without CORS headers.
  Never ``Access-Control-Allow-Credentials``: tokens travel in ``Authorization``, not cookies.
- ``/.well-known/*`` (protected resource metadata, the identity JWKS): public documents a
  browser must read before it has a token, so any origin, ``*``.

Headers are stamped when an answer is prepared (``on_response_prepare``), not by a middleware
around the handler: a streamed answer (SSE, a large body) has sent its head before the handler
returns. An answer to a request without ``Origin`` costs one header lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web

from proxyd.config import ServerSettings
from proxyd.errors import Forbidden, MethodNotAllowed

MCP_PREFIX: Final = "/mcp/apps/"
PUBLIC_PATHS: Final = ("/.well-known/oauth-protected-resource/", "/.well-known/jwks.json")

ALLOW_METHODS: Final = ("POST", "GET", "DELETE")
ALLOW_HEADERS: Final = (
    "Authorization",
    "Content-Type",
    "Accept",
    "Mcp-Session-Id",
    "MCP-Protocol-Version",
    "Last-Event-ID",
    "Mcp-Method",
    "Mcp-Name",
)
EXPOSE_HEADERS: Final = (
    "Mcp-Session-Id",
    "WWW-Authenticate",
    "MCP-Protocol-Version",
    "Retry-After",
)
# How long a browser may cache a preflight. A constant: no config key (yet).
MAX_AGE: Final = 600

_ALLOWED_HEADER_NAMES: Final = frozenset(h.lower() for h in ALLOW_HEADERS)
_EXPOSE: Final = ", ".join(EXPOSE_HEADERS)
_PUBLIC_PREFLIGHT: Final = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET",
    "Access-Control-Allow-Headers": "*",  # no credentials: "*" is a wildcard (Fetch §3.2.3)
    "Access-Control-Max-Age": str(MAX_AGE),
}


def origin_of(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}".lower()


def allowed_origins(server: ServerSettings) -> frozenset[str]:
    """The browser origins accepted on ``/mcp/apps/*`` (lower case)."""
    return frozenset(server.allowed_origins) | {origin_of(server.public_url)}


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


class CorsPolicy:
    """``server`` gives the server settings in force (they change on reload)."""

    def __init__(self, server: Callable[[], ServerSettings]) -> None:
        self._server = server
        self._seen: ServerSettings | None = None
        self._allowed: frozenset[str] = frozenset()

    def allows(self, origin: str) -> bool:
        server = self._server()
        if server is not self._seen:
            self._allowed, self._seen = allowed_origins(server), server
        return origin.lower() in self._allowed

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer's CORS headers, just before its head is sent."""
        origin = request.headers.get("Origin")
        path = request.path
        if origin is None:
            # Not a browser's cross-origin request: the hot path stops here. The public
            # documents say "*" even so: a shared cache may hand this answer to a browser.
            if path.startswith(PUBLIC_PATHS):
                response.headers["Access-Control-Allow-Origin"] = "*"
            return
        if path.startswith(MCP_PREFIX):
            # A preflight's answer is complete as it is (a refused one has no CORS headers).
            if is_preflight(request) or not self.allows(origin):
                return
            headers = response.headers
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = _EXPOSE
            vary = headers.get("Vary")
            if vary is None:
                headers["Vary"] = "Origin"
            elif "origin" not in {v.strip().lower() for v in vary.split(",")}:
                headers["Vary"] = f"{vary}, Origin"
        elif path.startswith(PUBLIC_PATHS) and not is_preflight(request):
            response.headers["Access-Control-Allow-Origin"] = "*"

    async def mcp_options(self, request: web.Request) -> web.Response:
        """OPTIONS on ``/mcp/apps/{app}``: a preflight from an allowed origin, else refused."""
        origin = request.headers.get("Origin")
        if origin is None or not is_preflight(request):
            raise MethodNotAllowed("method OPTIONS not allowed", ALLOW_METHODS)
        if not self.allows(origin):
            raise Forbidden("origin not allowed", reason="origin_not_allowed")
        method = request.headers["Access-Control-Request-Method"]
        if method not in ALLOW_METHODS:
            raise Forbidden(f"CORS method {method} not allowed", reason="cors_method_not_allowed")
        requested = request.headers.get("Access-Control-Request-Headers", "")
        names = {n.strip().lower() for n in requested.split(",")} - {""}
        refused = sorted(names - _ALLOWED_HEADER_NAMES)
        if refused:
            raise Forbidden(
                f"CORS request headers not allowed: {', '.join(refused)}",
                reason="cors_headers_not_allowed",
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Vary": "Origin",
                "Access-Control-Allow-Methods": ", ".join(ALLOW_METHODS),
                "Access-Control-Allow-Headers": ", ".join(ALLOW_HEADERS),
                "Access-Control-Max-Age": str(MAX_AGE),
            },
        )

    async def public_options(self, request: web.Request) -> web.Response:
        """OPTIONS on the public documents: any origin may preflight them."""
        if is_preflight(request):
            return web.Response(status=204, headers=_PUBLIC_PREFLIGHT)
        return web.Response(status=204, headers={"Allow": "GET, OPTIONS"})
