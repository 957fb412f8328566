"""proxyd.log: the lines written straight (access, audit) are the lines structlog writes."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import re
from typing import Any

from proxyd.log import AUDIT_LOGGER, _Stamp, configure, flush, get_logger, info

FIELDS: dict[str, Any] = {
    "method": "POST",
    "path": "/mcp/apps/a",
    "status": 200,
    "duration_ms": 1.25,
    "client": "127.0.0.1",
    "user": "zoë@example.com",  # not ASCII: escaped the same way
    "allowed": True,
    "id": None,
    "arguments": {"b": [1, 2], "a": "x"},
    "odd": object(),  # rendered by the fallback, as structlog's JSONRenderer does
    "token": "secret-value",  # a secret-looking key: redacted
}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")


def _lines(stream: io.StringIO) -> list[str]:
    flush()
    return stream.getvalue().splitlines()


def _without_time(line: str) -> tuple[list[str], dict[str, Any]]:
    data = json.loads(line)
    assert ISO.match(data.pop("timestamp"))
    return list(data), data


def test_written_line_is_structlogs_line() -> None:
    stream = io.StringIO()
    configure("debug", "json", stream)
    for name in ("proxyd.access", AUDIT_LOGGER):
        logger = get_logger(name)
        fields = {**FIELDS, "odd": FIELDS["odd"]}
        logger.info("request", **fields)
        info(logger, name, "request", fields)
        by_structlog, written = _lines(stream)[-2:]
        assert _without_time(written) == _without_time(by_structlog)
        # Byte for byte, once the timestamps are set aside.
        strip = re.compile(r'"timestamp":"[^"]*"')
        assert strip.sub("", written) == strip.sub("", by_structlog)
        assert "secret-value" not in written
        assert json.loads(written)["token"] == "[redacted]"
        assert written.index('"logger_name"') < written.index('"method"')
        assert written.index('"event"') < written.index('"level"') < written.index('"timestamp"')


def test_written_line_follows_the_level_but_audit_ignores_it() -> None:
    stream = io.StringIO()
    configure("warning", "json", stream)
    info(get_logger("proxyd.access"), "proxyd.access", "request", {"status": 200})
    assert _lines(stream) == []
    info(get_logger(AUDIT_LOGGER), AUDIT_LOGGER, "mcp.session.request", {"status": 200})
    [line] = _lines(stream)
    assert json.loads(line)["event"] == "mcp.session.request"
    configure("debug", "json", io.StringIO())


def test_console_format_goes_through_structlog() -> None:
    stream = io.StringIO()
    configure("debug", "console", stream)
    try:
        info(get_logger("proxyd.access"), "proxyd.access", "request", {"status": 200})
        flush()
        text = stream.getvalue()
        assert "request" in text and "status" in text
        assert not text.startswith("{")
    finally:
        configure("debug", "json", io.StringIO())


def test_timestamps_match_datetime_isoformat() -> None:
    stamp = _Stamp()
    for _ in range(1000):
        before = datetime.datetime.now(datetime.UTC)
        text = stamp.now()
        after = datetime.datetime.now(datetime.UTC)
        assert ISO.match(text)
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        # Same clock, same format; a microsecond of rounding either way at most.
        slack = datetime.timedelta(microseconds=1)
        assert before - slack <= moment <= after + slack


class _Writes(io.StringIO):
    """A stream that records each write that reached it with a flush behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._unflushed = ""

    def write(self, text: str) -> int:
        self._unflushed += text
        return super().write(text)

    def flush(self) -> None:
        if self._unflushed:
            self.writes.append(self._unflushed)
            self._unflushed = ""


async def test_lines_of_one_loop_turn_leave_in_whole_line_writes_of_at_most_4096_bytes() -> None:
    stream = _Writes()
    configure("debug", "json", stream)
    try:
        logger = get_logger("proxyd.access")
        for i in range(40):  # ~100 bytes each: more than one write's worth
            info(logger, "proxyd.access", "request", {"i": i})
        get_logger("proxyd.test").info("structlog_line", n=1)
        info(logger, "proxyd.access", "big", {"blob": "x" * 5000})
        assert stream.writes == [] or all(w.endswith("\n") for w in stream.writes)
        await asyncio.sleep(0)  # the turn ends: everything pending is written
        assert stream._unflushed == ""
        assert all(w.endswith("\n") for w in stream.writes)
        lines = [json.loads(line) for w in stream.writes for line in w.splitlines()]
        assert [line.get("i") for line in lines[:40]] == list(range(40))
        assert lines[40]["event"] == "structlog_line" and lines[41]["event"] == "big"
        big = [w for w in stream.writes if "x" * 5000 in w]
        assert len(big) == 1 and big[0].count("\n") == 1  # a long line goes alone
        assert all(len(w) <= 4096 for w in stream.writes if w not in big)
        assert len(stream.writes) < 10  # batched: not a write per line
    finally:
        configure("debug", "json", io.StringIO())


def test_outside_a_loop_a_line_is_written_at_once() -> None:
    stream = _Writes()
    configure("debug", "json", stream)
    try:
        info(get_logger("proxyd.access"), "proxyd.access", "request", {"status": 200})
        assert len(stream.writes) == 1 and '"status":200' in stream.writes[0]
    finally:
        configure("debug", "json", io.StringIO())


async def test_any_other_line_is_written_at_once_after_the_pending_records() -> None:
    """Only access and audit records wait for the turn's end: a lifecycle line someone may act
    on at once (config_reloaded before READY=1) is written now, after them, in order."""
    stream = _Writes()
    configure("debug", "json", stream)
    try:
        access = get_logger("proxyd.access")
        info(access, "proxyd.access", "request", {"i": 1})
        info(access, "proxyd.access", "request", {"i": 2})
        assert stream.writes == []
        get_logger("proxyd.app").info("config_reloaded", generation=2)
        events = [json.loads(line)["event"] for w in stream.writes for line in w.splitlines()]
        assert events == ["request", "request", "config_reloaded"]
        assert len(stream.writes) == 1  # the pending pair and the line, in one write
    finally:
        configure("debug", "json", io.StringIO())
