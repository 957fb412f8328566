"""Waiting on a condition under a failure guard, never on a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

GUARD = 10.0  # seconds; a failure guard for awaited conditions, never a timing assumption


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str = "condition",
    within: float = GUARD,
    *,
    every: float = 0.02,
) -> float:
    """Check ``condition`` (sync or async) every ``every`` s until it holds; the seconds it took.

    ``every=0`` re-checks on each event loop turn (state that lives in this process and that
    nothing signals). Past ``within`` seconds it fails with ``what``.
    """
    started = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(every)
