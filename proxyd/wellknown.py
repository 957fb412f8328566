"""Unauthenticated discovery documents: proxyd's identity keys and RFC 9728 resource metadata."""

from __future__ import annotations

from aiohttp import web

from proxyd.auth.appauth import AppAuthStore, resource_url
from proxyd.auth.assertion import AssertionSigner
from proxyd.errors import NotFound
from proxyd.registry import Registry


class WellKnown:
    def __init__(
        self, public_url: str, registry: Registry, store: AppAuthStore, signer: AssertionSigner
    ) -> None:
        self._public_url = public_url
        self._registry = registry
        self._store = store
        self._signer = signer

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self._signer.jwks(), headers={"Cache-Control": "max-age=300"})

    async def protected_resource(self, request: web.Request) -> web.Response:
        name = request.match_info["app"]
        app = self._registry.get(name)
        if app is None:
            raise NotFound("unknown app", reason="unknown_app")
        snapshot = self._store.snapshot
        issuers = sorted({c.jwt.issuer for c in snapshot.for_labels(app.labels)})
        # RFC 9728 §2 / §3.2; MCP authorization (2025-06-18+) reads authorization_servers,
        # and (2025-11-25 scope selection) scopes_supported when the 401 names no scope.
        doc: dict[str, object] = {
            "resource": resource_url(self._public_url, name),
            "authorization_servers": issuers,
            "bearer_methods_supported": ["header"],
            "resource_name": name,
        }
        scopes = snapshot.scopes_for(app.labels)
        if scopes:
            doc["scopes_supported"] = list(scopes)
        return web.json_response(doc)
