"""structlog setup: JSON lines on stdout (journald-friendly) or a console renderer on a TTY.

Event names are constant snake_case facts; data goes in keys. Access lines go to
``proxyd.access``, audit events to ``proxyd.audit``. Values under secret-looking keys are
dropped by the last processor before rendering, as a safety net: no token ever reaches a log.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

SECRET_KEYS = frozenset(
    {"token", "authorization", "password", "secret", "private_key", "assertion", "bearer"}
)


def get_logger(name: str) -> Any:
    # Initial values on a lazy proxy (not .bind(), which would freeze the logger with the
    # configuration of import time and ignore configure()).
    return structlog.wrap_logger(None, logger_name=name)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
