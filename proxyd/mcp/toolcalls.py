"""``proxyd_mcp_tool_calls_total{app, tool, decision}``: tools/call decisions as a metric
(issue 14 §2: the dashboard's tool calls allowed and denied by tool).

The tool name is the client's: labelled as it is, it would let any client mint series without
bound. So a name is its own label only when a role names it exactly (the tools a policy is
about), or while fewer than ``per_app`` other names have been seen for the app (the tools of an
unrestricted app are few); any later name is ``_other``, and a name outside MCP's tool name
rules (2025-11-25 "Tool names") is ``_invalid``. The audit record keeps every name.
"""

from __future__ import annotations

from prometheus_client import Counter

from proxyd.mcp.policy import TOOL_NAME
from proxyd.metrics import Children

OTHER = "_other"
INVALID = "_invalid"


class ToolCalls:
    def __init__(self, counter: Counter, named: frozenset[str], per_app: int = 64) -> None:
        self._counter = Children(counter)
        self._named = named
        self._per_app = per_app
        self._seen: dict[str, set[str]] = {}

    def count(self, app: str, name: object, decision: str) -> None:
        self._counter.get(app, self.label(app, name), decision).inc()

    def label(self, app: str, name: object) -> str:
        if not isinstance(name, str) or TOOL_NAME.fullmatch(name) is None:
            return INVALID
        if name in self._named:
            return name
        seen = self._seen.setdefault(app, set())
        if name in seen:
            return name
        if len(seen) < self._per_app:
            seen.add(name)
            return name
        return OTHER
