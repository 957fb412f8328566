"""SIGHUP → one reload at a time, none while starting or draining, every task awaited on close.

The serving process and the supervisor both reload on SIGHUP; this is their one copy of the
rules. The handler stays installed until the process ends: with it removed at the start of a
drain, a SIGHUP then (default action: terminate) killed proxyd mid-drain, cutting the requests
it was letting finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Reloader:
    def __init__(
        self,
        reload: Callable[[], Awaitable[Any]],
        skip: Callable[[], str | None],
        log: Any,  # a structlog logger (proxyd.log.get_logger)
    ) -> None:
        """``skip``: why a SIGHUP now does nothing ("draining", "starting"), or None; ``log``:
        the process's logger, which says so."""
        self._reload = reload
        self._skip = skip
        self._log = log
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def on_hup(self) -> None:
        reason = self._skip()
        if reason is not None:
            self._log.info("reload_skipped", reason=reason)
            return
        task = asyncio.create_task(self._once(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _once(self) -> None:
        async with self._lock:  # two quick SIGHUPs: the second reads the file after the first
            await self._reload()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
