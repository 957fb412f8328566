"""SIGHUP: re-read the main file and swap the configuration in force (``Runtime.reload``)."""

from __future__ import annotations

from aiohttp import web

from proxyd.app import RUNTIME
from proxyd.config import RESTART_ONLY, in_force
from proxyd.notify import Notifier

__all__ = ["RESTART_ONLY", "in_force", "reload"]


async def reload(app: web.Application, path: str, notifier: Notifier) -> bool:
    return await app[RUNTIME].reload(path, notifier)
