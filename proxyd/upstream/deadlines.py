"""The upstream idle timeouts on shared loop timers (issue 15: memory per idle SSE stream).

A loop timer per exchange was ~530 bytes held by every open stream (uvloop's TimerHandle, its
libuv timer, a bound method, a context), and a ``call_at`` and a ``cancel`` per request. Here
a deadline is rounded up to the end of a slot and every exchange due in one slot shares its
timer, as a hashed timing wheel does (Varghese & Lauck; Netty's HashedWheelTimer). A slot is
at most 1/256 of the timeout wide, and 1/64 s to 1 s: a timeout fires up to that much late,
never early (the default 300 s: within 1 s).
"""

from __future__ import annotations

import asyncio
import math
from typing import Final, Protocol

_NARROWEST: Final = 1 / 64  # s; the widths are powers of two, so the slot ends are exact
_WIDEST: Final = 1.0
_SHARE: Final = 256  # a slot is at most this fraction of the timeout


class Timed(Protocol):
    def on_deadline(self) -> None: ...


def slot_width(timeout: float) -> float:
    width = _WIDEST
    while width > _NARROWEST and width * _SHARE > timeout:
        width /= 2
    return width


class Deadlines:
    """Callbacks due at a time, one loop timer per slot in use (module doc)."""

    __slots__ = ("_loop", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # A slot's end → its timer and the items due then. The end is the key: slots of
        # different widths that end at the same time are one slot.
        self._slots: dict[float, tuple[asyncio.TimerHandle, set[Timed]]] = {}

    def add(self, when: float, timeout: float, item: Timed) -> float:
        """Call ``item.on_deadline()`` at ``when`` or up to a slot later; returns the slot's
        end, for ``remove``."""
        width = slot_width(timeout)
        due = math.ceil(when / width) * width
        slot = self._slots.get(due)
        if slot is None:
            self._slots[due] = (self._loop.call_at(due, self._fire, due), {item})
        else:
            slot[1].add(item)
        return due

    def remove(self, due: float, item: Timed) -> None:
        slot = self._slots.get(due)
        if slot is None:
            return
        members = slot[1]
        members.discard(item)
        if not members:
            slot[0].cancel()
            del self._slots[due]

    def close(self) -> None:
        for handle, _ in self._slots.values():
            handle.cancel()
        self._slots.clear()

    def _fire(self, due: float) -> None:
        # Out of the table first: an item re-armed into a slot with the same end gets a new
        # one, and nothing removes from the set being walked.
        slot = self._slots.pop(due, None)
        if slot is None:
            return
        for item in slot[1]:
            try:
                item.on_deadline()
            except Exception as exc:  # noqa: BLE001 (one item's failure must not skip the rest)
                self._loop.call_exception_handler(
                    {"message": "upstream deadline callback failed", "exception": exc}
                )
