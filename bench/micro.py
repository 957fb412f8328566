"""Per-request cost of the MCP-aware steps (issue 5), measured in-process with timeit.

What a tools/list filter costs (JSON answer of 40 tools, and the same answer as an SSE event
behind two progress notifications), what the audit record of a tools/call costs (with the
audit file on), and the cached policy decision for a tools/call. Prints microseconds per
request; `make bench` runs it after bench/run.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
import timeit
from pathlib import Path
from types import SimpleNamespace

from proxyd.config import AuditSettings, parse_settings
from proxyd.log import configure
from proxyd.mcp.audit import AuditContext, Auditor
from proxyd.mcp.filter import ToolsListFilter
from proxyd.mcp.policy import Policy

TOOLS = [
    {"name": f"tool_{i}", "description": "x" * 80, "inputSchema": {"type": "object"}}
    for i in range(40)
]
ANSWER = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"tools": TOOLS}}).encode()
PROGRESS = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
SSE = PROGRESS * 2 + b"event: message\ndata: " + ANSWER + b"\n\n"


def per_call_us(fn: object, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def main() -> int:
    settings = parse_settings(
        {
            "roles": [
                {
                    "name": "dev",
                    "users": ["*"],
                    "app_labels": {"*": "*"},
                    "mcp": {"tools": ["tool_1*", "^tool_[2-3]$"]},
                    "deny": {"mcp": {"tools": ["tool_13"]}},
                }
            ]
        }
    )
    policy = Policy(settings.roles)
    identity = SimpleNamespace(
        username="alice@example.com", issuer="https://idp", claims={}, username_claim="email"
    )
    access = policy.access("proxyd-jwt:abc", identity, "app", {})  # type: ignore[arg-type]
    results: dict[str, float] = {}
    results["policy decision, tools/call (cached)"] = per_call_us(
        lambda: policy.access("proxyd-jwt:abc", identity, "app", {}).tool_allowed("tool_12"),  # type: ignore[arg-type]
        20000,
    )
    results["tools/list filter, JSON, 40 tools"] = per_call_us(
        lambda: ToolsListFilter(access, request_id=7, strict=True).json_body(ANSWER), 2000
    )

    def sse() -> None:
        events = ToolsListFilter(access, request_id=7, strict=True).sse()
        for i in range(0, len(SSE), 1400):  # typical TCP segments
            events.feed(SSE[i : i + 1400])
        events.finish()

    results["tools/list filter, SSE, 40 tools + 2 notifications"] = per_call_us(sse, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        configure("info", "json", open(Path(tmp) / "log", "w"))  # noqa: SIM115
        auditor = Auditor(AuditSettings(file=str(Path(tmp) / "audit.jsonl")))
        session = SimpleNamespace(key="proxyd-jwt:" + "a" * 64, identity=identity)
        exchange = SimpleNamespace(
            client_id=None,
            kind="request",
            method="tools/call",
            message={"id": 3},
            param=lambda name: {"name": "tool_12", "arguments": {"q": "x" * 50}}.get(name),
        )
        outcome = SimpleNamespace(upstream="http://127.0.0.1:3001/mcp")
        app = SimpleNamespace(name="app")
        client = SimpleNamespace(address="127.0.0.1")

        def audit() -> None:
            AuditContext(auditor, app, session, client, 0.0).exchange(
                "POST", exchange, 200, outcome, True
            )

        results["audit record of a tools/call (log + file)"] = per_call_us(audit, 5000)
        auditor.close()
    width = max(len(k) for k in results)
    print(f"{'MCP step':<{width}}  µs/request")
    for name, value in results.items():
        print(f"{name:<{width}}  {value:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
