"""Flow control for one upstream connection, both directions (uvicorn's ``flow_control.py``).

Read side: llhttp hands body bytes over as they arrive; past ``HIGH_WATER`` unread (the client
is slower than the upstream) reading from the upstream stops until the reader takes them.
Write side: the transport reports its buffer full and drained again (``pause_writing`` /
``resume_writing``); ``drain()`` waits for the latter. Request bodies go to the transport whole
today, so nothing waits on it yet; a streamed body would ``await drain()`` between writes.
"""

from __future__ import annotations

import asyncio
from typing import Final

# Read-side flow control: stop reading from the upstream while this much sits unread (the
# client is slower than the upstream), resume once the reader took it.
HIGH_WATER: Final = 256 * 1024


class FlowControl:
    """Whether reading and writing are paused on one transport; lives as long as it does."""

    __slots__ = ("_drain", "_transport", "read_paused", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None  # made only when someone waits

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._release()

    async def drain(self) -> None:
        """Return once the transport takes writes again (at once when it does now)."""
        if self.write_paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def connection_lost(self) -> None:
        # A writer waiting for a drain would wait forever: it is let go, and its next write
        # finds the connection closed.
        self._release()

    def _release(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
