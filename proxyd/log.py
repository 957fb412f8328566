"""structlog setup: JSON lines on stdout (journald-friendly) or a console renderer on a TTY.

Event names are constant snake_case facts; data goes in keys. Access lines go to
``proxyd.access``, audit events to ``proxyd.audit``. Values under secret-looking keys are
dropped by the last processor before rendering, as a safety net: no token ever reaches a log.

Loggers are cached on first use (assembling a structlog logger per call showed up in the
profile of the hot path), so what ``configure`` may change later — level, format, stream —
lives in one routing object that the cached processors consult.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any, TextIO

import orjson
import structlog

AUDIT_LOGGER = "proxyd.audit"
SECRET_KEYS = frozenset(
    {"token", "authorization", "password", "secret", "private_key", "assertion", "bearer"}
)


def _fallback(value: Any) -> Any:
    # structlog's JSONRenderer fallback: an object's own __structlog__(), else its repr().
    hook = getattr(value, "__structlog__", None)
    return hook() if callable(hook) else repr(value)


# orjson: a line costs ~0.4 µs where the json module's encoder took ~3.2 (issue 15: three
# lines per tools/call). Dataclasses and datetimes go to the fallback, as structlog's
# JSONRenderer does; str and int subclasses are written as their values, as json does.
_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)
# What orjson refuses (an integer past 64 bits from a client's JSON-RPC id, a lone surrogate,
# nesting past 254) is still written, never lost: the json module, ASCII only, so a lone
# surrogate leaves escaped rather than failing the UTF-8 stream it is written to.
_SLOW = json.JSONEncoder(default=_fallback, separators=(",", ":"))


def encode_line(event: Any, default: Callable[[Any], Any] = _fallback) -> str:
    """One compact JSON object, without the newline."""
    try:
        return orjson.dumps(event, default=default, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        if default is _fallback:
            return _SLOW.encode(event)
        return json.JSONEncoder(default=default, separators=(",", ":")).encode(event)


def _json(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    return encode_line(event)


# A write of at most this many bytes (PIPE_BUF on Linux) to a pipe is atomic: the workers of a
# supervisor share one stdout, and their lines must never interleave mid-line.
_WRITE_MAX = 4096


class LineBatcher:
    """Whole lines, written together once per event-loop turn (issue 15): the access line and
    the audit record of each request were a write and a flush each, two system calls per
    request; a turn of the loop finishes several requests. Each write holds whole lines and at
    most _WRITE_MAX bytes (a longer line goes alone, as before). Outside a running loop a line
    is written at once; what is pending at exit is written by atexit (proxyd's own stream) or
    by the owner's flush() before it closes its file."""

    __slots__ = ("_target", "pending", "scheduled", "size")

    def __init__(self, target: Callable[[], IO[str] | None]) -> None:
        self._target = target
        self.pending: list[str] = []
        self.size = 0
        self.scheduled = False

    def add(self, line: str) -> None:
        self.pending.append(line)
        self.size += len(line)
        if self.size >= _WRITE_MAX:
            self.flush()
            return
        if not self.scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            loop.call_soon(self._turn_ended)
            self.scheduled = True

    def write_now(self, line: str) -> None:
        """``line`` now, after what is pending (order kept), with no end-of-turn callback."""
        self.pending.append(line)
        self.flush()

    def _turn_ended(self) -> None:
        self.scheduled = False  # only here: a flush in between leaves this callback pending
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        lines, self.pending, self.size = self.pending, [], 0
        stream = self._target()
        if stream is None:
            return
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > _WRITE_MAX:
                _write(stream, chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        _write(stream, chunk)


def _write(stream: IO[str], lines: list[str]) -> None:
    # One write and a flush per chunk: the chunk leaves in one system call (the stream's
    # buffer, 8 KiB, is larger than a chunk), never split across two.
    stream.write(lines[0] if len(lines) == 1 else "".join(lines))
    stream.flush()


def flush() -> None:
    """Write the lines still pending now (before a process exits or hands over its stdout,
    and for tests that read the stream)."""
    _lines.flush()


class _Routing:
    def __init__(self) -> None:
        self.level = logging.INFO
        self.stream: TextIO = sys.stdout
        self.renderer: Any = _json
        # Keys on every line of this process, e.g. {"worker": 2} under a supervisor.
        self.context: dict[str, Any] = {}

    # The file-like object structlog's WriteLogger writes to: a whole line per call. Only the
    # per-request records (access and audit, ``info`` below) wait for the end of the loop
    # turn; any other line is written at once, after those pending (order kept), because
    # something may act on it right away: a supervisor that reads a worker's state, a test
    # or an operator that sees READY=1 after "config_reloaded".
    def write(self, text: str) -> int:
        _lines.write_now(text)
        return len(text)

    def flush(self) -> None:
        pass  # written by write()


_routing = _Routing()
_lines = LineBatcher(lambda: _routing.stream)
atexit.register(_lines.flush)
_LEVELS = {name.lower(): number for name, number in logging.getLevelNamesMapping().items()}


def get_logger(name: str) -> Any:
    # Initial values on a lazy proxy (not .bind(), which would assemble the logger now, before
    # configure() ran).
    return structlog.wrap_logger(None, logger_name=name)


def is_enabled(level: int) -> bool:
    """Callers building costly fields can skip them for a level that is filtered out."""
    return level >= _routing.level


_LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # structlog's add_log_level mapping


class _Stamp:
    """ISO 8601 UTC timestamps as structlog's TimeStamper(fmt="iso", utc=True) writes them
    (``2026-01-02T03:04:05.678901Z``; no fraction when it is zero), with the date and time
    of day formatted once per second instead of once per line."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            moment = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
            self.prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
            self.second = second
        micro = int((now - second) * 1_000_000)
        return f"{self.prefix}.{micro:06d}Z" if micro else f"{self.prefix}Z"


_now_iso = _Stamp().now


def _finish(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    """The whole processor chain in one call (it was six, one call each per log line):
    level filter, ``level``, ``timestamp`` (ISO 8601, UTC), exception text, redaction, render.

    The keys and their order are what structlog's add_log_level, TimeStamper(fmt="iso",
    utc=True), format_exc_info and JSONRenderer produced, so the lines are unchanged.
    """
    # Audit events are records, not diagnostics: the log level never silences them.
    if event.get("logger_name") != AUDIT_LOGGER and _LEVELS.get(method, logging.INFO) < (
        _routing.level
    ):
        raise structlog.DropEvent
    event["level"] = _LEVEL_NAMES.get(method, method)
    event["timestamp"] = _now_iso()
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, method, event)
    # Values under secret-looking keys never reach the output, whatever the caller passed.
    for key in SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    if _routing.context:
        for key, value in _routing.context.items():
            event.setdefault(key, value)
    return _routing.renderer(logger, method, event)


def set_context(**keys: Any) -> None:
    """Keys added to every line from now on (a worker's index: one journal, N processes)."""
    _routing.context = dict(keys)


def info(logger: Any, name: str, event: str, fields: dict[str, Any]) -> None:
    """``logger.info(event, **fields)`` for ``logger = get_logger(name)``: the same line, but
    written straight when the output is JSON (the access and audit lines, once per request,
    spent a third of their cost in structlog's bound-logger calls and dict copies).

    The line is built exactly as ``_finish`` builds it: logger_name, the fields, event,
    level, timestamp; secret-looking keys redacted.
    """
    if _routing.renderer is not _json or not structlog.is_configured():
        logger.info(event, **fields)
        return
    if name != AUDIT_LOGGER and _routing.level > logging.INFO:
        return
    line = {"logger_name": name, **fields, "event": event, "level": "info"}
    line["timestamp"] = _now_iso()
    if _routing.context:
        for key, value in _routing.context.items():
            line.setdefault(key, value)
    for key in SECRET_KEYS.intersection(fields):
        line[key] = "[redacted]"
    _lines.add(encode_line(line) + "\n")


def set_level(level: str) -> None:
    """A reload changes the level in place; format and stream stay (they need a restart)."""
    _routing.level = _LEVELS[level.lower()]


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    _lines.flush()  # what was logged before goes where it was meant to go
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    _routing.level = _LEVELS[level.lower()]
    _routing.stream = out
    _routing.renderer = (
        structlog.dev.ConsoleRenderer(colors=out.isatty()) if fmt == "console" else _json
    )
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[_finish],
        # One write per line (message and newline together; PrintLogger writes them apart):
        # the workers of a supervisor share one stdout and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(_routing),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
