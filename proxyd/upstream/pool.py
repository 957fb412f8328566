"""``UpstreamClient``: keep-alive pools per app server, connecting (TLS too) and the idle sweep."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping

from proxyd.errors import ConnectFailed, UpstreamConnectTimeout, UpstreamTlsFailed
from proxyd.log import get_logger
from proxyd.tls import client_context
from proxyd.upstream.connection import CLOSED, Connection
from proxyd.upstream.deadlines import Deadlines
from proxyd.upstream.tls import TlsProfile
from proxyd.upstream.wire import Origin

log = get_logger("proxyd.upstream")


class UpstreamClient:
    """Keep-alive pools per upstream origin; owned by app.py's cleanup context."""

    def __init__(
        self,
        *,
        keepalive_timeout: float = 4.0,
        max_idle: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(self.loop)  # the exchanges' idle timeouts (issue 15)
        self.keepalive_timeout = keepalive_timeout
        self.max_idle = max_idle
        self._ssl = ssl_context
        self._profiles: Mapping[str, TlsProfile] = {}  # origin key → [apps.tls] (issue 13 §2)
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, list[Connection]] = {}
        self._all: set[Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closing = False
        self._drained: asyncio.Future[None] | None = None

    def reconfigure(self, keepalive_timeout: float, max_idle: int) -> None:
        """A reload's upstream.keepalive_timeout and max_idle_connections: for connections
        going idle from now on (the pools and open connections stay)."""
        self.keepalive_timeout = keepalive_timeout
        self.max_idle = max_idle

    def set_tls(self, profiles: Mapping[str, TlsProfile]) -> None:
        """The ``[apps.tls]`` of this configuration, by origin key. Idle connections to an
        origin whose TLS settings changed are closed: none made under the old ones is reused."""
        old, self._profiles = self._profiles, dict(profiles)
        for key, idle in self._idle.items():
            if old.get(key) is not self._profiles.get(key):
                for conn in idle:
                    conn.close()
                idle.clear()

    def origin(self, target: str) -> Origin:
        origin = self._origins.get(target)
        if origin is None:
            if len(self._origins) > 4096:  # targets come from the config: a reload may change
                self._origins.clear()  # them, so keep the cache bounded
            origin = self._origins[target] = Origin.parse(target)
        return origin

    def pooled(self, origin: Origin) -> Connection | None:
        """An idle connection to ``origin`` that is still open, or None.

        A connection the upstream closed while idle was dropped when its close arrived; one
        found closing here is skipped before anything was written to it.
        """
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        oldest = self.loop.time() - self.keepalive_timeout
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            transport = conn.transport
            if conn.state is CLOSED or transport is None or transport.is_closing():
                continue
            if conn.idle_since < oldest:
                conn.close()
                continue
            return conn
        return None

    async def connect(self, origin: Origin, connect_timeout: float) -> Connection:
        """A new connection; ConnectFailed when none could be made (nothing was sent)."""
        if self._closing:
            raise ConnectFailed(f"upstream {origin.label} is unreachable: shutting down")
        tls: ssl.SSLContext | None = None
        server_name: str | None = None
        if origin.tls:
            profile = self._profiles.get(origin.key)
            tls = profile.context if profile is not None else self._tls()
            server_name = (profile.server_name if profile is not None else None) or origin.host
        try:
            async with asyncio.timeout(connect_timeout) as deadline:
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=server_name,
                )
        except TimeoutError:
            if deadline.expired():
                raise UpstreamConnectTimeout(f"upstream {origin.label} timed out") from None
            raise ConnectFailed(f"upstream {origin.label} is unreachable") from None
        except ssl.SSLError as exc:
            # Verification failed, or the server refused us: a 502, never a retry with less.
            reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            log.warning("upstream_tls_failed", server=origin.label, reason=reason)
            raise UpstreamTlsFailed(
                f"upstream {origin.label}: TLS handshake failed ({reason})"
            ) from None
        except OSError:  # refused, unreachable, DNS (gaierror)
            raise ConnectFailed(f"upstream {origin.label} is unreachable") from None
        if conn.state is CLOSED:
            raise ConnectFailed(f"upstream {origin.label} closed the connection at once")
        self._all.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.origin.key, [])
        if self._closing or len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive_timeout, self._expire)

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin.key)
        if idle and conn in idle:
            idle.remove(conn)
        if self._drained is not None and not self._all and not self._drained.done():
            self._drained.set_result(None)

    def _expire(self) -> None:
        # Idle connections past keepalive_timeout are closed in one sweep; the sweep runs
        # again while any are left, at the time the oldest of them expires.
        self._sweep = None
        now = self.loop.time()
        oldest = now - self.keepalive_timeout
        next_due: float | None = None
        for idle in self._idle.values():
            keep = [c for c in idle if c.idle_since >= oldest and c.state is not CLOSED]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            idle[:] = keep
            if keep:
                due = keep[0].idle_since + self.keepalive_timeout
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep = self.loop.call_at(next_due, self._expire)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            # aiohttp's default verification: the system's CAs and hostname checks.
            self._ssl = client_context()
        return self._ssl

    @property
    def open_connections(self) -> int:
        return len(self._all)

    def idle_connections(self, origin: Origin) -> int:
        return len(self._idle.get(origin.key, ()))

    async def close(self) -> None:
        """Close every connection, idle or not, and wait until each is gone."""
        self._closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle.clear()
        self.deadlines.close()  # no exchange is timed any more: each is aborted below
        if not self._all:
            return
        self._drained = self.loop.create_future()
        for conn in list(self._all):
            conn.abort()
        # Each abort reports its connection_lost on the next loop turns; bounded all the same,
        # so that a transport that never reports cannot hold up a shutdown.
        await asyncio.wait({self._drained}, timeout=5.0)
