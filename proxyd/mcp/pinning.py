"""MCP session pinning (2025-era transport): a session goes back to the server that minted it.

The upstream's ``Mcp-Session-Id`` never reaches the client; the client holds a sealed proxyd id
(proxyd.mcp.sessionid) and every request presenting it is checked and translated back. An id
that is not ours, belongs to another user or app, or whose server is gone or unhealthy is a
404: the transport spec's signal for the client to start a new session.
"""

from __future__ import annotations

from multidict import CIMultiDict

from proxyd.auth.jwt import Identity
from proxyd.body import HeaderHook
from proxyd.errors import NotFound, UpstreamError
from proxyd.log import get_logger
from proxyd.mcp.sessionid import MAX_ID_LENGTH, Pin, SessionIdCodec
from proxyd.registry import App, Registry

log = get_logger("proxyd.mcp")

SESSION_HEADER = "Mcp-Session-Id"


class SessionPinning:
    def __init__(self, codec: SessionIdCodec, registry: Registry) -> None:
        self._codec = codec
        self._registry = registry

    def open(self, app: App, identity: Identity, session_id: str) -> Pin:
        pin = self._codec.open(session_id)
        if pin is None:
            reason = "unknown_mcp_session"
        elif (pin.app, pin.issuer, pin.username) != (app.name, identity.issuer, identity.username):
            reason = "foreign_mcp_session"
        elif pin.server not in app.servers:
            reason = "mcp_session_server_removed"
        elif not self._registry.serves(app, pin.server):
            reason = "mcp_session_server_unhealthy"
        else:
            return pin
        log.info(
            "mcp_session_refused",
            app=app.name,
            user=identity.username,
            reason=reason,
            server=pin.server if pin is not None and reason != "foreign_mcp_session" else None,
        )
        raise NotFound("MCP session not found; start a new session (initialize)", reason=reason)

    def unreachable(self, app: App, identity: Identity, pin: Pin, cause: str) -> NotFound:
        """The pinned server refused the connection: the session is gone with it.

        Another server cannot take the request (the session does not exist there), and a 502
        would leave the client retrying a dead session; a 404 makes it re-initialize, and
        ``pick`` then finds a server that answers. Nothing of the request was sent.
        """
        reason = "mcp_session_server_unreachable"
        log.warning(
            "mcp_session_refused",
            app=app.name,
            user=identity.username,
            reason=reason,
            server=pin.server,
            cause=cause,
        )
        return NotFound("MCP session not found; start a new session (initialize)", reason=reason)

    def response_hook(
        self, app: App, identity: Identity, server: str, pin: Pin | None, client_id: str | None
    ) -> HeaderHook:
        """Replace the upstream's session id in the answer by the client's sealed one."""

        def seal(headers: CIMultiDict[str]) -> None:
            upstream_id = headers.get(SESSION_HEADER)
            if upstream_id is None:
                return
            if pin is not None and client_id is not None and upstream_id == pin.upstream_id:
                headers[SESSION_HEADER] = client_id
                return
            sealed = self._codec.seal(
                Pin(app.name, server, upstream_id, identity.issuer, identity.username)
            )
            if len(sealed) > MAX_ID_LENGTH:
                # We could never open it again: the client would re-initialize forever.
                log.warning(
                    "mcp_session_id_too_long", app=app.name, server=server, length=len(upstream_id)
                )
                raise UpstreamError(
                    "the app server's session id is too long to route", reason="session_id_too_long"
                )
            headers[SESSION_HEADER] = sealed
            log.info("mcp_session_started", app=app.name, user=identity.username, server=server)

        return seal
