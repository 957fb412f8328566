"""Apps and their servers; the choice of server for new work.

Issue 2 keeps it static and picks at random with an injected RNG (Teleport shuffles healthy
app servers per session); health and MCP session pinning (issue 3) plug in at ``pick``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxyd.config import AppSettings
from proxyd.errors import ServiceUnavailable


@dataclass(frozen=True, slots=True)
class App:
    name: str
    labels: Mapping[str, str]
    servers: tuple[str, ...]


class Registry:
    def __init__(self, apps: Iterable[AppSettings], rng: random.Random) -> None:
        self._apps = {a.name: App(a.name, dict(a.labels), a.servers) for a in apps}
        self._rng = rng

    def get(self, name: str) -> App | None:
        return self._apps.get(name)

    def names(self) -> list[str]:
        return sorted(self._apps)

    def pick(self, app: App) -> str:
        if not app.servers:
            raise ServiceUnavailable(f"app {app.name} has no server available")
        if len(app.servers) == 1:
            return app.servers[0]
        return self._rng.choice(app.servers)
