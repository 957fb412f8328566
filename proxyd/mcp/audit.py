"""MCP audit events on their own logger (``proxyd.audit``) and, if configured, their own file.

Events (Teleport's MCP audit model): ``mcp.session.start`` (successful initialize),
``mcp.session.request``, ``mcp.session.notification``, ``mcp.session.listen_stream`` (GET),
``mcp.session.end`` (DELETE), ``mcp.invalid_request``, ``app_auth.verify.success`` /
``app_auth.verify.failure``. Each carries user, app, client address, session and upstream.
Never the token; tool arguments only as a hash unless ``audit.include_arguments``. List
methods and ping are recorded only when they fail, unless ``audit.list_methods``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import IO, Any

from proxyd.config import AuditSettings
from proxyd.log import AUDIT_LOGGER, LineBatcher, encode_line, get_logger, info

log = get_logger(AUDIT_LOGGER)

NOISY = frozenset(
    {"tools/list", "resources/list", "resources/templates/list", "prompts/list", "ping"}
)


# Built once: json.dumps builds a new encoder on every call with non-default options.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def arguments_hash(arguments: Any) -> str:
    canonical = _CANONICAL.encode(arguments)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class Auditor:
    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self._file: IO[str] | None = None
        if settings.file:
            fd = os.open(settings.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        # The file's lines leave with the others of the loop turn, a write each 4 KiB at most
        # (issue 15: a write per record was a system call per request); O_APPEND keeps the
        # whole-line writes of several workers apart. Flushed at close.
        self._lines = LineBatcher(lambda: self._file)

    def reconfigure(self, settings: AuditSettings) -> None:
        # audit.file is restart-only (the file stays open); the other keys apply at once.
        self.settings = settings

    def records(self, method: str | None, failed: bool) -> bool:
        return failed or self.settings.list_methods or method not in NOISY

    def emit(self, event: str, **fields: Any) -> None:
        self.record(event, fields)

    def record(self, event: str, fields: dict[str, Any]) -> None:
        info(log, AUDIT_LOGGER, event, fields)
        if self._file is not None:
            line = {"time": time.time(), "event": event, **fields}
            self._lines.add(encode_line(line, str) + "\n")

    def close(self) -> None:
        self._lines.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class AuditContext:
    """The audit fields of one request, and the events it produces."""

    def __init__(
        self,
        auditor: Auditor,
        app: Any,
        session: Any,
        client: Any,
        started: float,
        trace: Any = None,
    ) -> None:
        self._auditor = auditor
        self._started = started
        self._trace = trace  # proxyd.tracing.RequestTrace when [tracing] is on
        self._fields: dict[str, Any] = {
            "user": session.identity.username,
            "username_claim": session.identity.username_claim,
            "issuer": session.identity.issuer,
            "app": app.name,
            "client": client.address,
            # The session's key is a hash of app and token: it identifies, it cannot be replayed.
            "session": session.key.rsplit(":", 1)[-1][:16],
        }

    def invalid(self, request: Any, err: Any) -> None:
        fields = {**self._fields, "method": request.method, "reason": err.reason}
        fields["error"] = err.message
        if self._trace is not None:
            fields["trace_id"] = self._trace.trace_id
        self._auditor.record("mcp.invalid_request", fields)

    def exchange(
        self, http_method: str, exchange: Any, status: int, outcome: Any, allowed: bool
    ) -> None:
        fields = dict(self._fields)
        if outcome is not None:
            fields["upstream"] = outcome.upstream
        if exchange.client_id is not None:
            fields["mcp_session"] = hashlib.sha256(exchange.client_id.encode()).hexdigest()[:16]
        fields["status"] = status
        if self._trace is not None:
            fields["trace_id"] = self._trace.trace_id
        fields["latency_ms"] = round((time.perf_counter() - self._started) * 1000, 2)
        failed = status >= 400 or not allowed
        auditor = self._auditor
        if http_method == "GET":
            auditor.record("mcp.session.listen_stream", fields)
            return
        if http_method == "DELETE":
            auditor.record("mcp.session.end", fields)
            return
        method = exchange.method
        if exchange.kind == "notification":
            if auditor.records(method, failed):
                fields["mcp_method"] = method
                auditor.record("mcp.session.notification", fields)
            return
        if exchange.kind != "request":
            return
        if method == "initialize" and status < 400 and allowed:
            auditor.record("mcp.session.start", dict(fields))
        if not auditor.records(method, failed):
            return
        fields["mcp_method"] = method
        fields["id"] = exchange.message.get("id")
        fields["allowed"] = allowed
        name = exchange.param("uri") if method == "resources/read" else exchange.param("name")
        if isinstance(name, str):
            fields["name"] = name
        if method == "tools/call":
            arguments = exchange.param("arguments")
            fields["arguments_hash"] = arguments_hash(arguments)
            if auditor.settings.include_arguments:
                fields["arguments"] = arguments
        auditor.record("mcp.session.request", fields)
