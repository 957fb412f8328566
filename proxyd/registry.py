"""Apps and their servers; the choice of server for new work.

New work goes to a random server among the available ones (healthy per the active checker,
not ejected by passive checks), with an injected RNG; Teleport shuffles healthy app servers
the same way. Work pinned to a server (an MCP session) never comes through ``pick``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from proxyd.config import AppSettings
from proxyd.errors import ServiceUnavailable
from proxyd.health import HealthBook


@dataclass(frozen=True, slots=True)
class App:
    name: str
    labels: Mapping[str, str]
    servers: tuple[str, ...]
    # [apps.upstream_auth]: the header (name, value) every request to its servers carries.
    # Never shown: a secret must not reach a repr, a log line or an error body.
    upstream_auth: tuple[str, str] | None = field(default=None, repr=False, compare=False)


class Registry:
    def __init__(
        self,
        apps: Iterable[AppSettings],
        rng: random.Random,
        health: HealthBook,
        credentials: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        creds = credentials or {}
        self._apps = {
            a.name: App(a.name, dict(a.labels), a.servers, creds.get(a.name)) for a in apps
        }
        self._rng = rng
        self.health = health

    def get(self, name: str) -> App | None:
        return self._apps.get(name)

    def names(self) -> list[str]:
        return sorted(self._apps)

    def serves(self, app: App, server: str) -> bool:
        """The server still belongs to the app and may take requests."""
        return server in app.servers and self.health.available(app.name, server)

    def pick(self, app: App, exclude: Collection[str] = ()) -> str:
        candidates = [
            s for s in app.servers if s not in exclude and self.health.available(app.name, s)
        ]
        if not candidates:
            raise ServiceUnavailable(
                f"no healthy server for app {app.name}; try again shortly",
                reason="no_healthy_upstream",
            )
        if len(candidates) == 1:
            return candidates[0]
        return self._rng.choice(candidates)
