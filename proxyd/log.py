"""structlog setup: JSON lines on stdout (journald-friendly) or a console renderer on a TTY.

Event names are constant snake_case facts; data goes in keys. Access lines go to
``proxyd.access``, audit events to ``proxyd.audit``. Values under secret-looking keys are
dropped by the last processor before rendering, as a safety net: no token ever reaches a log.

Loggers are cached on first use (assembling a structlog logger per call showed up in the
profile of the hot path), so what ``configure`` may change later — level, format, stream —
lives in one routing object that the cached processors consult.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

AUDIT_LOGGER = "proxyd.audit"
SECRET_KEYS = frozenset(
    {"token", "authorization", "password", "secret", "private_key", "assertion", "bearer"}
)


class _Routing:
    def __init__(self) -> None:
        self.level = logging.INFO
        self.stream: TextIO = sys.stdout
        self.renderer: Any = structlog.processors.JSONRenderer()
        # Keys on every line of this process, e.g. {"worker": 2} under a supervisor.
        self.context: dict[str, Any] = {}

    # The file-like object structlog's PrintLogger writes to.
    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


_routing = _Routing()
_LEVELS = {name.lower(): number for name, number in logging.getLevelNamesMapping().items()}


def get_logger(name: str) -> Any:
    # Initial values on a lazy proxy (not .bind(), which would assemble the logger now, before
    # configure() ran).
    return structlog.wrap_logger(None, logger_name=name)


def is_enabled(level: int) -> bool:
    """Callers building costly fields can skip them for a level that is filtered out."""
    return level >= _routing.level


def _filter(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Audit events are records, not diagnostics: the log level never silences them.
    if event.get("logger_name") == AUDIT_LOGGER:
        return event
    if _LEVELS.get(method, logging.INFO) < _routing.level:
        raise structlog.DropEvent
    return event


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def _context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in _routing.context.items():
        event.setdefault(key, value)
    return event


def set_context(**keys: Any) -> None:
    """Keys added to every line from now on (a worker's index: one journal, N processes)."""
    _routing.context = dict(keys)


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    return _routing.renderer(logger, method, event)


def set_level(level: str) -> None:
    """A reload changes the level in place; format and stream stay (they need a restart)."""
    _routing.level = _LEVELS[level.lower()]


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    _routing.level = _LEVELS[level.lower()]
    _routing.stream = out
    _routing.renderer = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            _filter,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _context,
            _redact,
            _render,
        ],
        # One write per line (message and newline together; PrintLogger writes them apart):
        # the workers of a supervisor share one stdout and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(_routing),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
