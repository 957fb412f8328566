"""What the MCP layer decided about one request before it goes upstream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxyd.body import RequestBody
from proxyd.mcp.sessionid import Pin


@dataclass(frozen=True, slots=True)
class Exchange:
    """What the MCP layer decided about one request before it goes upstream."""

    modern: bool  # 2026-07-28 era: stateless
    body: RequestBody
    pin: Pin | None = None  # 2025 era: the session's server and upstream id
    client_id: str | None = None  # the sealed session id the client presented
    message: Mapping[str, Any] | None = None  # a POST's JSON-RPC message
    kind: str | None = None  # request | notification | response

    @property
    def method(self) -> str | None:
        method = self.message.get("method") if self.message is not None else None
        return method if isinstance(method, str) else None

    def param(self, name: str) -> Any:
        params = self.message.get("params") if self.message is not None else None
        return params.get(name) if isinstance(params, dict) else None
