"""Roles and MCP tool policy (issue 5 §1 roles, §2 enforcement), end to end and in units.

The integration tests run the official MCP SDK as upstream server (JSON and SSE answer modes)
and as client (the 2025-11-25 session era and the stateless 2026-07-28 era) through proxyd on
127.0.0.1, with real tokens from the test IdP. ``up.calls`` is what reached the upstream's MCP
layer: a refused tool call must never appear there. Reload and the app auth config watcher are
driven directly (``reload()``, ``rescan()``), so no test waits on time.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from mcp import MCPError
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp_types import JSONRPCMessage

from proxyd.app import RUNTIME, WATCHER
from proxyd.auth.jwt import Identity
from proxyd.config import ConfigError, RoleSettings, Settings, parse_settings
from proxyd.labels import parse_selector
from proxyd.mcp.policy import ALLOW_ALL, Policy, Role, ToolMatcher
from proxyd.process.notify import Notifier
from tests.conftest import FakeClock, LogCapture, ProxyFactory, base_config
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import LEGACY, MODERN, McpClient, UpstreamServer, mcp_client, upstream_server
from tests.kit.tomltext import to_toml

Proxy = TestClient[web.Request, web.Application]

ALICE = "alice@example.com"  # the test IdP's default email claim (the username)
ALL_TOOLS = {"echo", "add", "progress", "stepped", "whoami"}
DENIED_CODE = -32602
# What proxyd answers for an app no role grants (errors.error_body of Forbidden app_denied).
APP_DENIED_BODY = {
    "jsonrpc": "2.0",
    "id": None,
    "error": {
        "code": -32600,
        "message": "access to this app is denied by proxyd policy",
        "data": {"status": 403, "reason": "app_denied"},
    },
}
ACCEPT = "application/json, text/event-stream"
GUARD = 10.0  # a failure guard on awaited conditions, never a timing assumption
_UNSET: Any = object()


# --------------------------------------------------------------------------------------------
# Helpers


def role(
    name: str,
    *,
    users: list[str] | None = None,
    claims: dict[str, Any] | None = None,
    app_labels: dict[str, Any] | None = _UNSET,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
) -> dict[str, Any]:
    """One ``[[roles]]`` entry as a config document; grants every test app unless told."""
    doc: dict[str, Any] = {"name": name}
    if users is not None:
        doc["users"] = users
    if claims is not None:
        doc["claims"] = claims
    labels = {"env": "test"} if app_labels is _UNSET else app_labels
    if labels is not None:
        doc["app_labels"] = labels
    if allow is not None:
        doc["mcp"] = {"tools": allow}
    if deny is not None:
        doc["deny"] = {"mcp": {"tools": deny}}
    return doc


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def only_mcp_error(exc: BaseException) -> MCPError:
    errors = [e for e in leaves(exc) if isinstance(e, MCPError)]
    assert len(errors) >= 1, f"no MCPError in {exc!r}"
    return errors[0]


def text_of(result: Any) -> str:
    content = result.content[0]
    assert content.type == "text"
    text: str = content.text
    return text


def answer_types(client: McpClient) -> dict[str, list[str]]:
    """Content-Type of every POST answer the client receives, by JSON-RPC method."""
    seen: dict[str, list[str]] = {}

    async def hook(response: httpx2.Response) -> None:
        request = response.request
        if request.method != "POST":
            return
        try:
            body = json.loads(request.content)
        except ValueError:
            return
        if isinstance(body, dict) and isinstance(body.get("method"), str):
            seen.setdefault(body["method"], []).append(response.headers.get("content-type", ""))

    client.http.event_hooks["response"].append(hook)
    return seen


@dataclass
class Env:
    up: UpstreamServer
    issuer: TestIssuer
    clock: FakeClock
    make_proxy: ProxyFactory
    tmp_path: Path

    def doc(self, roles: list[dict[str, Any]] | None, apps: tuple[str, ...] = ("a",)) -> Any:
        sections: dict[str, Any] = {} if roles is None else {"roles": roles}
        return base_config(
            self.issuer, {app: [self.up.url] for app in apps}, self.tmp_path, **sections
        )

    async def proxy(
        self, roles: list[dict[str, Any]] | None, apps: tuple[str, ...] = ("a",)
    ) -> Proxy:
        return await self.make_proxy(self.doc(roles, apps))

    def token(self, **claims: Any) -> str:
        return self.issuer.token(self.clock.wall(), **claims)


def url(proxy: Proxy, app: str = "a") -> str:
    return str(proxy.make_url(f"/mcp/apps/{app}"))


def headers(token: str, **more: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        **more,
    }


def call(name: Any, request_id: Any = 1) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": {"a": 1, "b": 2}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def listed(proxy: Proxy, token: str, mode: str = MODERN, app: str = "a") -> set[str]:
    """The tool names the SDK client sees in tools/list."""
    async with mcp_client(url(proxy, app), token, mode=mode) as c:
        return {t.name for t in (await c.list_tools()).tools}


async def refused(proxy: Proxy, token: str, mode: str = MODERN, app: str = "a") -> MCPError:
    """The error the SDK client gets when it tries to use an app (e.g. proxyd's 403)."""
    with pytest.raises((MCPError, BaseExceptionGroup)) as failure:
        async with mcp_client(url(proxy, app), token, mode=mode) as c:
            await c.list_tools()
    return only_mcp_error(failure.value)


@pytest.fixture(params=[False, True], ids=["sse", "json"])
async def env(
    request: pytest.FixtureRequest,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> AsyncIterator[Env]:
    async with upstream_server(json_response=request.param) as up:
        yield Env(up, issuer, clock, make_proxy, tmp_path)


# --------------------------------------------------------------------------------------------
# Enforcement inside the MCP stream (§2), with the SDK on both ends


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_role_allowing_echo_not_add_filters_list_and_refuses_call(
    env: Env, mode: str
) -> None:
    proxy = await env.proxy([role("echo-only", users=[ALICE], allow=["echo"])])
    async with mcp_client(url(proxy), env.token(), mode=mode) as c:
        types = answer_types(c)
        assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
        with pytest.raises(MCPError) as denied:
            await c.call_tool("add", {"a": 1, "b": 2})
        assert denied.value.code == DENIED_CODE
        assert "proxyd policy" in denied.value.message and "'add'" in denied.value.message
        assert text_of(await c.call_tool("echo", {"text": "héllo"})) == "héllo"
        # The session is still usable after a refusal, and the list stays filtered.
        assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
    assert [call.name for call in env.up.calls] == ["echo"]
    # The list did go upstream (all five tools there): proxyd filtered the answer.
    assert [r.method for r in env.up.rpcs].count("tools/list") >= 2
    expected = "application/json" if env.up.json_response else "text/event-stream"
    if mode == LEGACY:
        # The 2025 era answers tools/list in the upstream's mode: both filter paths are run.
        assert all(t.startswith(expected) for t in types["tools/list"]), types
    else:
        # The v2 SDK answers a silent modern request with JSON even in SSE mode.
        assert all(t.startswith("application/json") for t in types["tools/list"]), types


async def test_refused_call_is_200_with_the_same_id_and_never_forwarded(env: Env) -> None:
    proxy = await env.proxy([role("echo-only", users=[ALICE], allow=["echo"])])
    token = env.token()
    # Ids of every JSON-RPC type come back as sent; names differing only in case, padding or
    # type are other tools (or no tool) and refused.
    cases: list[tuple[Any, Any]] = [
        ("add", 7),
        ("add", "req-ä"),
        ("add", 0),
        ("Echo", 8),
        ("echo ", 9),
        (None, 10),
        (["echo"], 11),
    ]
    for name, request_id in cases:
        resp = await proxy.post("/mcp/apps/a", json=call(name, request_id), headers=headers(token))
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        body = await resp.json()
        assert body["jsonrpc"] == "2.0" and body["id"] == request_id
        assert body["error"]["code"] == DENIED_CODE
        assert "denied by proxyd policy" in body["error"]["message"]
        assert "result" not in body
    # The stateless era too: headers mirror the body, the call is still answered by proxyd.
    modern = headers(
        token, **{"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "add"}
    )
    resp = await proxy.post("/mcp/apps/a", json=call("add", 12), headers=modern)
    assert resp.status == 200 and (await resp.json())["error"]["code"] == DENIED_CODE
    assert env.up.requests == [], "a refused call reached the upstream"


async def test_tool_calls_are_counted_by_app_tool_and_decision_with_bounded_names(
    env: Env,
) -> None:
    """proxyd_mcp_tool_calls_total (issue 14 §2): allowed and denied calls by tool; names the
    client invents cannot mint series without bound."""
    proxy = await env.proxy([role("echo-only", users=[ALICE], allow=["echo", "get_*"])])
    registry = proxy.app[RUNTIME].core.metrics.registry
    token = env.token()

    def count(tool: str, decision: str) -> float:
        labels = {"app": "a", "tool": tool, "decision": decision}
        return registry.get_sample_value("proxyd_mcp_tool_calls_total", labels) or 0.0

    async def send(name: Any, request_id: int) -> None:
        more = {}
        if isinstance(name, str) and re.fullmatch(r"[\x21-\x7e]{1,128}", name):
            # The stateless era (headers mirror the body) where a header can carry the name.
            more = {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name}
        resp = await proxy.post(
            "/mcp/apps/a", json=call(name, request_id), headers=headers(token, **more)
        )
        body = await resp.read()
        if name != "echo":  # refused by proxyd: 200 with -32602 (echo is the app's to answer)
            assert resp.status == 200 and json.loads(body)["error"]["code"] == DENIED_CODE

    await send("echo", 1)
    await send("add", 2)
    await send("add", 3)
    # Names outside MCP's tool name rules, of every kind: one label for all of them.
    invalid: list[Any] = [
        "bad\nname",
        None,
        ["echo"],
        7,
        "",
        "a" * 129,
        "\uff45cho",
        "echo\u0000",
        "echo ",
        "e*",
    ]
    for i, name in enumerate(invalid):
        await send(name, 4 + i)
    assert count("echo", "allowed") == 1
    assert count("add", "denied") == 2
    assert count("_invalid", "denied") == len(invalid)
    # 64 invented names get their own label, then every further one is _other; a name the
    # roles name exactly always keeps its own.
    for i in range(70):
        await send(f"invented_{i}", 100 + i)
    labelled = {
        sample.labels["tool"]
        for family in registry.collect()
        if family.name == "proxyd_mcp_tool_calls"
        for sample in family.samples
        if sample.name == "proxyd_mcp_tool_calls_total"
    }
    assert count("_other", "denied") == 70 - 63  # "add" took one of the 64
    assert len([t for t in labelled if t.startswith("invented_")]) == 63
    await send("echo", 200)
    assert count("echo", "allowed") == 2
    assert len(env.up.requests) == 2  # only the allowed calls went up


@pytest.mark.parametrize("deny_first", [False, True], ids=["allow-first", "deny-first"])
async def test_deny_of_one_role_beats_allow_of_another(env: Env, deny_first: bool) -> None:
    everything = role("everything", users=["*"], allow=["*"])
    no_add = role("no-add", claims={"groups": ["eng"]}, deny=["add"])
    proxy = await env.proxy([no_add, everything] if deny_first else [everything, no_add])
    engineer = env.token(groups=["eng"])
    async with mcp_client(url(proxy), engineer, mode=MODERN) as c:
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS - {"add"}
        with pytest.raises(MCPError) as denied:
            await c.call_tool("add", {"a": 1, "b": 2})
        assert denied.value.code == DENIED_CODE
        assert text_of(await c.call_tool("echo", {"text": "ok"})) == "ok"
    assert [c.name for c in env.up.calls] == ["echo"]
    # The deny belongs to the role: someone it does not apply to keeps "add".
    async with mcp_client(url(proxy), env.token(groups=["ops"]), mode=MODERN) as c:
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS
        assert text_of(await c.call_tool("add", {"a": 40, "b": 2})) == "42"
    assert [c.name for c in env.up.calls] == ["echo", "add"]


async def test_deny_role_on_a_claim_still_applies_to_a_token_with_many_groups(env: Env) -> None:
    """Entra-style tokens carry hundreds of groups: more than the claims kept with a session."""
    everything = role("everything", users=["*"], allow=["*"])
    no_add = role("contractors", claims={"groups": ["contractors"]}, deny=["add"])
    proxy = await env.proxy([everything, no_add])
    assert await listed(proxy, env.token(groups=["contractors"])) == ALL_TOOLS - {"add"}
    groups = ["contractors", *(f"group-{i:04d}-{'x' * 16}" for i in range(250))]
    async with mcp_client(url(proxy), env.token(groups=groups), mode=MODERN) as c:
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS - {"add"}
        with pytest.raises(MCPError):
            await c.call_tool("add", {"a": 1, "b": 2})
    assert env.up.calls == []


@pytest.mark.parametrize("mcp", [None, {}, {"tools": []}], ids=["no-table", "no-key", "empty"])
async def test_role_without_tools_grants_the_app_but_no_tool(
    env: Env, mcp: dict[str, Any] | None
) -> None:
    grant = role("app-only", users=[ALICE])
    if mcp is not None:
        grant["mcp"] = mcp
    proxy = await env.proxy([grant])
    async with mcp_client(url(proxy), env.token(), mode=MODERN) as c:
        assert (await c.list_tools()).tools == []  # reachable (no 403), nothing to call
        with pytest.raises(MCPError) as denied:
            await c.call_tool("echo", {"text": "x"})
        assert denied.value.code == DENIED_CODE
    assert env.up.calls == [] and "tools/list" in {r.method for r in env.up.rpcs}


async def test_glob_and_regex_entries(env: Env) -> None:
    # allow: every name with an "s", echo and add by regex, whoami by a bracket glob;
    # deny: stepped by a "?" glob, whoami again by regex (deny wins).
    allow = ["*s*", "^(echo|add)$", "who[a-z]mi"]
    deny = ["st?pped", "^w.*i$"]
    proxy = await env.proxy([role("patterns", users=[ALICE], allow=allow, deny=deny)])
    async with mcp_client(url(proxy), env.token(), mode=MODERN) as c:
        assert {t.name for t in (await c.list_tools()).tools} == {"echo", "add", "progress"}
        for name in ("stepped", "whoami"):
            with pytest.raises(MCPError) as denied:
                await c.call_tool(name, {"steps": 1})
            assert denied.value.code == DENIED_CODE and repr(name) in denied.value.message
        assert text_of(await c.call_tool("add", {"a": 1, "b": 1})) == "2"
        result = await c.call_tool("progress", {"steps": 1, "delay": 0})
        assert text_of(result) == "done"
    assert [c.name for c in env.up.calls] == ["add", "progress"]


async def test_deny_of_a_role_without_app_labels_applies_to_every_app(env: Env) -> None:
    roles = [
        role("grant", users=["*"], allow=["*"]),
        # Grants no app at all, yet its deny applies wherever its user goes.
        role("no-echo-anywhere", users=[ALICE], app_labels=None, deny=["echo"]),
        # Denies only on the apps it selects: not this one.
        role("no-add-elsewhere", users=[ALICE], app_labels={"app": "other"}, deny=["add"]),
    ]
    proxy = await env.proxy(roles)
    async with mcp_client(url(proxy), env.token(), mode=MODERN) as c:
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS - {"echo"}
        with pytest.raises(MCPError) as denied:
            await c.call_tool("echo", {"text": "x"})
        assert denied.value.code == DENIED_CODE
        assert text_of(await c.call_tool("add", {"a": 2, "b": 3})) == "5"
    assert [c.name for c in env.up.calls] == ["add"]


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_claim_matched_role_grants_access(env: Env, mode: str) -> None:
    proxy = await env.proxy([role("eng", claims={"groups": ["eng"]}, allow=["*"])])
    async with mcp_client(url(proxy), env.token(groups=["eng", "x"]), mode=mode) as c:
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS
        assert text_of(await c.call_tool("add", {"a": 1, "b": 2})) == "3"
    seen = len(env.up.requests)
    assert seen > 0
    for token in (env.token(), env.token(groups=["x"]), env.token(groups="engineering")):
        error = await refused(proxy, token, mode)
        assert error.message == "access to this app is denied by proxyd policy"
        assert error.data == {"status": 403, "reason": "app_denied"}
    assert len(env.up.requests) == seen, "a request without the claim reached the upstream"


async def test_claims_of_other_json_types_match_their_text(env: Env) -> None:
    """Numbers and booleans in a token match the strings a TOML role must use."""
    roles = [role("cleared", claims={"clearance": "^[3-9]$", "admin": "true"}, allow=["echo"])]
    proxy = await env.proxy(roles)
    assert await listed(proxy, env.token(clearance=5, admin=True)) == {"echo"}
    for token in (
        env.token(clearance=2, admin=True),
        env.token(clearance=5, admin=False),
        env.token(clearance=5, admin=1),  # 1 is not true
        env.token(clearance=5),
    ):
        assert (await refused(proxy, token)).data == {"status": 403, "reason": "app_denied"}


async def test_users_exact_and_regex_entries(env: Env) -> None:
    users = ["bob@example.com", r"^[a-z]+@corp\.example$"]
    proxy = await env.proxy([role("people", users=users, allow=["*"])])
    for email in ("bob@example.com", "carol@corp.example"):
        assert await listed(proxy, env.token(email=email)) == ALL_TOOLS
    for email in (ALICE, "BOB@example.com", "carol@corp.example.evil", "x.carol@corp.example"):
        error = await refused(proxy, env.token(email=email))
        assert error.data == {"status": 403, "reason": "app_denied"}, email


async def test_app_no_role_grants_is_403_for_post_get_and_delete(env: Env) -> None:
    proxy = await env.proxy(
        [role("only-a", users=["*"], app_labels={"app": "a"}, allow=["*"])], ("a", "b")
    )
    token = env.token()
    assert await listed(proxy, token, app="a") == ALL_TOOLS
    before = len(env.up.requests)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    session = {"Mcp-Session-Id": "pxs1.whatever", "MCP-Protocol-Version": "2025-11-25"}
    answers = [
        await proxy.post("/mcp/apps/b", json=body, headers=headers(token)),
        await proxy.get("/mcp/apps/b", headers=headers(token, Accept="text/event-stream")),
        await proxy.delete("/mcp/apps/b", headers=headers(token, **session)),
    ]
    for resp in answers:
        assert resp.status == 403, resp.method
        assert resp.headers["Content-Type"].startswith("application/json")
        assert await resp.json() == APP_DENIED_BODY
    for mode in (LEGACY, MODERN):
        assert (await refused(proxy, token, mode, app="b")).data["reason"] == "app_denied"
    assert len(env.up.requests) == before, "a request to a denied app reached the upstream"


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_no_roles_allows_everything(env: Env, mode: str) -> None:
    proxy = await env.proxy(None)
    async with mcp_client(url(proxy), env.token(), mode=mode) as c:
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS
        assert text_of(await c.call_tool("add", {"a": 1, "b": 2})) == "3"
        assert text_of(await c.call_tool("whoami", {})) != ""
    assert [c.name for c in env.up.calls] == ["add", "whoami"]


@pytest.mark.parametrize(
    "batch",
    [
        [call("add")],
        [call("echo", 1), call("add", 2)],
        [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}],
        [],
    ],
    ids=["denied-call", "mixed", "list", "empty"],
)
@pytest.mark.parametrize("with_roles", [True, False], ids=["roles", "no-roles"])
async def test_batches_are_refused_with_400(
    env: Env, batch: list[dict[str, Any]], with_roles: bool
) -> None:
    roles = [role("echo-only", users=[ALICE], allow=["echo"])] if with_roles else None
    proxy = await env.proxy(roles)
    resp = await proxy.post("/mcp/apps/a", json=batch, headers=headers(env.token()))
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == -32600
    assert body["error"]["data"] == {"status": 400, "reason": "invalid_jsonrpc"}
    assert "batch" in body["error"]["message"]
    assert env.up.requests == []


async def test_filtered_list_answer_carries_the_sealed_session_id(env: Env) -> None:
    """A filtered tools/list answer must get the same Mcp-Session-Id treatment as any other:
    the client only ever sees proxyd's sealed id, never the upstream's own."""
    proxy = await env.proxy([role("echo-only", users=[ALICE], allow=["echo"])])
    ids: dict[str, set[str]] = {}

    async def hook(response: httpx2.Response) -> None:
        body = json.loads(response.request.content or b"null")
        method = body.get("method") if isinstance(body, dict) else response.request.method
        sid = response.headers.get("mcp-session-id")
        if sid is not None:
            ids.setdefault(str(method), set()).add(sid)

    async with mcp_client(url(proxy), env.token(), mode=LEGACY) as c:
        c.http.event_hooks["response"].append(hook)
        sealed = c.session_id
        assert sealed is not None and sealed.startswith("pxs1.")
        assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
        assert text_of(await c.call_tool("echo", {"text": "x"})) == "x"
    assert ids["tools/call"] == {sealed}
    assert ids.get("tools/list") == {sealed}, "the upstream's session id reached the client"


class MemoryEventStore(EventStore):
    """The SDK's resumability hook: every event kept, replayed after a Last-Event-ID."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = f"e{len(self.events) + 1}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: str, send_callback: EventCallback
    ) -> str | None:
        stream = next((s for e, s, _ in self.events if e == last_event_id), None)
        if stream is None:
            return None
        after = False
        for event_id, stream_id, message in list(self.events):
            if after and stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
            after = after or event_id == last_event_id
        return stream


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(id, data) of every complete event in an SSE text."""
    out: list[tuple[str | None, str]] = []
    for block in re.split(r"\r\n\r\n|\n\n|\r\r", text)[:-1]:
        event_id, data = None, []
        for line in re.split(r"\r\n|\n|\r", block):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
        out.append((event_id, "\n".join(data)))
    return out


async def test_resumed_stream_replays_tools_list_filtered(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """2025-11-25 resumability: a GET with Last-Event-ID replays the rest of a POST's stream,
    the tools/list answer included; it must be filtered there too."""
    up = UpstreamServer(name="resumable")
    # The kit builds the SDK app itself; hand it an event store so the server can resume.
    build = functools.partial(up.mcp.streamable_http_app, event_store=MemoryEventStore())
    setattr(up.mcp, "streamable_http_app", build)  # noqa: B010
    await up.start()
    try:
        roles = [role("echo-only", users=[ALICE], allow=["echo"])]
        proxy = await make_proxy(base_config(issuer, {"a": [up.url]}, tmp_path, roles=roles))
        token = issuer.token(clock.wall())
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        }
        resp = await proxy.post("/mcp/apps/a", json=init, headers=headers(token))
        assert resp.status == 200
        await resp.read()
        session = {"Mcp-Session-Id": resp.headers["Mcp-Session-Id"]}
        h = headers(token, **session, **{"MCP-Protocol-Version": "2025-11-25"})
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await proxy.post("/mcp/apps/a", json=initialized, headers=h)).status == 202
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        resp = await proxy.post("/mcp/apps/a", json=listing, headers=h)
        events = sse_events(await resp.text())
        (answer,) = [json.loads(d) for _, d in events if d]
        assert [t["name"] for t in answer["result"]["tools"]] == ["echo"]
        priming = events[0][0]
        assert priming is not None and events[0][1] == ""  # the cursor before the answer

        resume = {**h, "Accept": "text/event-stream", "Last-Event-ID": priming}
        get = await proxy.get("/mcp/apps/a", headers=resume)
        assert get.status == 200

        async def replayed() -> dict[str, Any]:
            seen = b""
            async for chunk in get.content.iter_any():
                seen += chunk
                for _, data in sse_events(seen.decode()):
                    message = json.loads(data) if data else None
                    if isinstance(message, dict) and message.get("id") == 2:
                        return message
            raise AssertionError("the stream ended without the replayed answer")

        try:
            again = await asyncio.wait_for(replayed(), GUARD)
        finally:
            get.close()
        assert [t["name"] for t in again["result"]["tools"]] == ["echo"], "unfiltered replay"
    finally:
        await up.close()


# --------------------------------------------------------------------------------------------
# Live sessions follow the roles in force (§1)


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_roles_change_on_reload_applies_to_live_sessions(
    env: Env, mode: str, logs: LogCapture
) -> None:
    def doc(roles: list[dict[str, Any]]) -> Any:
        return env.doc(roles)

    first = doc([role("r", users=[ALICE], allow=["echo"])])
    path = env.tmp_path / "proxyd.toml"
    path.write_text(to_toml(first))
    assert parse_settings(tomllib.loads(to_toml(first))) == parse_settings(first)
    proxy = await env.make_proxy(first)

    async def swap(roles: list[dict[str, Any]]) -> None:
        path.write_text(to_toml(doc(roles)))
        assert await proxy.app[RUNTIME].reload(str(path), Notifier(None)) is True

    async with mcp_client(url(proxy), env.token(), mode=mode) as c:
        assert {t.name for t in (await c.list_tools()).tools} == {"echo"}
        with pytest.raises(MCPError):
            await c.call_tool("add", {"a": 1, "b": 2})

        await swap([role("r", users=[ALICE], allow=["echo", "add"])])
        assert {t.name for t in (await c.list_tools()).tools} == {"echo", "add"}
        assert text_of(await c.call_tool("add", {"a": 1, "b": 2})) == "3"

        await swap([role("r", users=[ALICE], allow=["*"], deny=["echo"])])
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS - {"echo"}
        with pytest.raises(MCPError) as denied:
            await c.call_tool("echo", {"text": "x"})
        assert denied.value.code == DENIED_CODE

        await swap([role("r", users=[ALICE], app_labels={"app": "other"}, allow=["*"])])
        with pytest.raises(MCPError) as forbidden:
            await c.list_tools()
        assert forbidden.value.data == {"status": 403, "reason": "app_denied"}

        await swap([])  # no roles at all: everything again
        assert {t.name for t in (await c.list_tools()).tools} == ALL_TOOLS
        assert text_of(await c.call_tool("echo", {"text": "back"})) == "back"
    assert [c.name for c in env.up.calls] == ["add", "echo"]
    # One verification for the whole test: every decision came from the session's identity.
    assert len(logs.events("session_created")) == 1


async def test_reverified_session_is_judged_on_its_new_identity(env: Env, logs: LogCapture) -> None:
    """A session re-verified under a changed app auth config (here: another username claim)
    gets the decision of its new identity, not the one cached for the old."""
    config_dir = env.tmp_path / "app_auth.d"
    config_dir.mkdir()
    idp = config_dir / "idp.toml"

    def write(username_claim: str) -> None:
        idp.write_text(
            'name = "idp"\napp_labels = { env = "test" }\n[jwt]\n'
            f"issuer = {json.dumps(env.issuer.issuer)}\n"
            f"audience = {json.dumps(env.issuer.audience)}\n"
            f"jwks_url = {json.dumps(env.issuer.url)}\n"
            f"username_claim = {json.dumps(username_claim)}\n"
        )

    write("email")
    doc = env.doc([role("alice", users=[ALICE], allow=["*"])])
    del doc["app_auth_configs"]
    doc["app_auth"] = {"config_dir": str(config_dir)}
    proxy = await env.make_proxy(doc)
    token = env.token()  # email alice@example.com, sub u-123
    assert await listed(proxy, token) == ALL_TOOLS
    assert await listed(proxy, token) == ALL_TOOLS  # the decision is cached for the session
    write("sub")
    proxy.app[WATCHER].rescan()
    assert (await refused(proxy, token)).data == {"status": 403, "reason": "app_denied"}
    # Same token, same session key: it was verified again, as "u-123" (the sub claim).
    assert [e["user"] for e in logs.events("session_created")] == [ALICE, "u-123"]


# --------------------------------------------------------------------------------------------
# Units: ToolMatcher, Role.applies_to, Policy.access


@pytest.mark.parametrize(
    ("entries", "name", "expected"),
    [
        (["echo"], "echo", True),
        (["echo"], "echo2", False),
        (["echo"], "Echo", False),
        (["a.b"], "axb", False),  # an exact entry is not a regex
        (["a+b"], "a+b", True),
        (["search_*"], "search_docs", True),
        (["search_*"], "search_", True),
        (["search_*"], "xsearch_docs", False),
        (["search_*"], "Search_docs", False),
        (["a.b*"], "axbc", False),  # a glob's "." is a dot
        (["a.b*"], "a.bc", True),
        (["get_?"], "get_a", True),
        (["get_?"], "get_ab", False),
        (["tool_[ab]"], "tool_b", True),
        (["tool_[ab]"], "tool_c", False),
        (["^(echo|add)$"], "add", True),
        (["^(echo|add)$"], "addx", False),
        (["^(echo|add)$"], "xadd", False),
        (["^ad+$"], "addd", True),
        (["^a|b$"], "ab", False),  # alternation cannot escape the anchors
        (["^a|b$"], "b", True),
        (["^.*$"], "anything", True),
        (["*"], "anything", True),
        (["*"], "", True),
        ([], "echo", False),
        (["echo", "^add$", "s*"], "stepped", True),
    ],
)
def test_tool_matcher(entries: list[str], name: str, expected: bool) -> None:
    assert ToolMatcher(entries).matches(name) is expected


def test_tool_matcher_star_and_empty() -> None:
    assert ToolMatcher(["*"]).everything and ToolMatcher(["echo", "*"]).everything
    assert not ToolMatcher(["e*"]).everything and not ToolMatcher(["echo"]).everything
    assert ToolMatcher([]).empty and not ToolMatcher([]).everything
    assert not ToolMatcher(["x"]).empty and not ToolMatcher(["x*"]).empty


def identity(
    username: str = ALICE, *, config: str = "idp", version: int = 1, **claims: Any
) -> Identity:
    return Identity(
        username=username,
        issuer="https://idp.test",
        subject="u-123",
        config=config,
        expires_at=2e9,
        issued_at=1e9,
        claims={"email": username, **claims},
        config_version=version,
    )


def role_settings(
    name: str = "r",
    *,
    users: tuple[str, ...] = (),
    claims: dict[str, Any] | None = None,
    apps: dict[str, Any] | None = None,
    allow: tuple[str, ...] = (),
    deny: tuple[str, ...] = (),
) -> RoleSettings:
    return RoleSettings(
        name,
        users,
        parse_selector(claims) if claims is not None else None,
        parse_selector(apps) if apps is not None else None,
        allow,
        deny,
    )


@pytest.mark.parametrize(
    ("users", "username", "expected"),
    [
        (("alice@example.com",), ALICE, True),
        (("alice@example.com",), "alice@example.co", False),
        (("*",), "anyone", True),
        ((r"^.*@example\.com$",), ALICE, True),
        ((r"^.*@example\.com$",), "alice@example.com.evil", False),
        (("bob", r"^al.*$"), ALICE, True),
        (("al*",), ALICE, False),  # users has no globs: "al*" is a name
    ],
)
def test_role_applies_by_username(users: tuple[str, ...], username: str, expected: bool) -> None:
    assert Role.of(role_settings(users=users)).applies_to(identity(username)) is expected


@pytest.mark.parametrize(
    ("matchers", "claims", "expected"),
    [
        ({"groups": ["eng"]}, {"groups": ["x", "eng"]}, True),
        ({"groups": ["eng"]}, {"groups": ["x"]}, False),
        ({"groups": ["eng"]}, {"groups": []}, False),
        ({"groups": ["eng"]}, {"groups": "eng"}, True),
        ({"groups": ["eng"]}, {}, False),
        ({"groups": ["eng", "ops"]}, {"groups": ["ops"]}, True),
        ({"groups": "^team-.*$"}, {"groups": ["x", "team-a"]}, True),
        ({"groups": "*"}, {"groups": ["whatever"]}, True),
        ({"groups": "*"}, {}, False),  # "*" needs the claim to exist
        ({"level": "3"}, {"level": 3}, True),
        ({"level": "^[0-9]+$"}, {"level": 42}, True),
        ({"level": "3"}, {"level": "3"}, True),
        ({"admin": "true"}, {"admin": True}, True),
        ({"admin": "false"}, {"admin": False}, True),  # a falsy value still matches
        ({"admin": "true"}, {"admin": 1}, False),
        ({"admin": "true"}, {"admin": "True"}, False),
        ({"level": "1"}, {"level": True}, False),  # a bool is not the number 1
        ({"level": "0"}, {"level": 0}, True),
        ({"groups": ["eng"], "level": "3"}, {"groups": ["eng"], "level": 3}, True),
        ({"groups": ["eng"], "level": "3"}, {"groups": ["eng"], "level": 2}, False),
        ({"*": "*"}, {}, True),
    ],
)
def test_role_applies_by_claims(
    matchers: dict[str, Any], claims: dict[str, Any], expected: bool
) -> None:
    r = Role.of(role_settings(claims=matchers))
    assert r.applies_to(identity("nobody", **claims)) is expected


def test_role_applies_by_users_or_claims() -> None:
    r = Role.of(role_settings(users=("bob",), claims={"groups": ["eng"]}))
    assert r.applies_to(identity("bob"))
    assert r.applies_to(identity("carol", groups=["eng"]))
    assert not r.applies_to(identity("carol", groups=["ops"]))
    # A role with neither (the config refuses it) applies to no one.
    assert not Role.of(role_settings()).applies_to(identity("bob", groups=["eng"]))


LABELS_A = {"env": "test", "app": "a"}


def test_policy_without_roles_allows_everything() -> None:
    policy = Policy(())
    assert not policy.enabled
    access = policy.access("k", identity(), "a", LABELS_A)
    assert access is ALLOW_ALL and access.unrestricted and access.tool_allowed("anything")


def test_empty_allow_list_grants_the_app_but_no_tool() -> None:
    policy = Policy([role_settings(users=(ALICE,), apps={"env": "test"})])
    access = policy.access("k", identity(), "a", LABELS_A)
    assert access.app_allowed and not access.unrestricted
    assert not any(access.tool_allowed(name) for name in ALL_TOOLS | {"", "*"})


def test_star_tool_entry_is_unrestricted_until_something_is_denied() -> None:
    star = role_settings("star", users=(ALICE,), apps={"env": "test"}, allow=("*",))
    access = Policy([star]).access("k", identity(), "a", LABELS_A)
    assert access.unrestricted and access.tool_allowed("x")
    # Unrestricted access never asks (proxyd.handler), but a name outside the MCP naming
    # rules is never allowed by a pattern (issue 10).
    assert not access.tool_allowed("*") and not access.tool_allowed("x\x00")
    deny = role_settings("deny", users=(ALICE,), deny=("add",))
    access = Policy([star, deny]).access("k", identity(), "a", LABELS_A)
    assert not access.unrestricted  # every tools/call and tools/list must be checked
    assert access.tool_allowed("echo") and not access.tool_allowed("add")
    # A glob ending in "*" is not "*": it neither lifts the checks nor allows other names.
    prefix = Policy([role_settings(users=(ALICE,), apps={"env": "test"}, allow=("ab*",))])
    access = prefix.access("k", identity(), "a", LABELS_A)
    assert not access.unrestricted and access.tool_allowed("abc")
    assert not access.tool_allowed("xabc")


def test_roles_that_do_not_grant_the_app() -> None:
    roles = [
        role_settings("no-apps", users=(ALICE,), allow=("*",)),  # no app_labels: grants none
        role_settings("other", users=(ALICE,), apps={"app": "other"}, allow=("*",)),
        role_settings("bob", users=("bob",), apps={"env": "test"}, allow=("*",)),
    ]
    access = Policy(roles).access("k", identity(), "a", LABELS_A)
    assert not access.app_allowed and not access.unrestricted
    assert not access.tool_allowed("echo")


def test_deny_scope_follows_the_denying_role() -> None:
    roles = [
        role_settings("grant", users=("*",), apps={"env": "test"}, allow=("*",)),
        role_settings("everywhere", users=(ALICE,), deny=("echo",)),
        role_settings("elsewhere", users=(ALICE,), apps={"app": "b"}, deny=("add",)),
        role_settings("others", users=("bob",), deny=("whoami",)),
    ]
    policy = Policy(roles)
    on_a = policy.access("k", identity(), "a", LABELS_A)
    assert not on_a.tool_allowed("echo") and on_a.tool_allowed("add")
    assert on_a.tool_allowed("whoami")
    on_b = policy.access("k", identity(), "b", {"env": "test", "app": "b"})
    assert not on_b.tool_allowed("echo") and not on_b.tool_allowed("add")


def test_allow_comes_only_from_roles_granting_the_app() -> None:
    roles = [
        role_settings("a-echo", users=(ALICE,), apps={"app": "a"}, allow=("echo",)),
        role_settings("b-add", users=(ALICE,), apps={"app": "b"}, allow=("add",)),
    ]
    access = Policy(roles).access("k", identity(), "a", LABELS_A)
    assert access.tool_allowed("echo") and not access.tool_allowed("add")


def test_decisions_are_cached_per_session_and_policy() -> None:
    settings = [role_settings(users=(ALICE,), apps={"env": "test"}, allow=("echo",))]
    policy = Policy(settings)
    first = policy.access("k", identity(), "a", LABELS_A)
    assert policy.access("k", identity(), "a", LABELS_A) is first
    assert policy.access("k2", identity("bob"), "a", LABELS_A).app_allowed is False
    # A new Policy (a reload) decides afresh.
    changed = Policy([role_settings(users=("bob",), apps={"env": "test"}, allow=("echo",))])
    assert changed.access("k", identity(), "a", LABELS_A).app_allowed is False


def test_cached_decision_does_not_outlive_the_identity_it_was_made_for() -> None:
    """Same session key, new identity (re-verified under a changed app auth config)."""
    policy = Policy([role_settings(users=(ALICE,), apps={"env": "test"}, allow=("*",))])
    assert policy.access("k", identity(ALICE, version=1), "a", LABELS_A).app_allowed
    assert not policy.access("k", identity("u-123", version=2), "a", LABELS_A).app_allowed


@pytest.mark.parametrize(
    ("matchers", "claims", "expected"),
    [
        ({"scope": "tools.write"}, {"scope": "mcp tools.write"}, True),
        ({"scope": "tools.write"}, {"scope": "tools.write"}, True),
        ({"scope": "tools.write"}, {"scope": "mcp tools.writer"}, False),
        ({"scope": "tools.write"}, {"scope": "mcp"}, False),
        ({"scope": "tools.write"}, {}, False),
        ({"scope": "tools.write"}, {"scp": ["mcp", "tools.write"]}, True),  # Okta
        ({"scope": "tools.write"}, {"scp": "mcp tools.write"}, True),  # Entra
        ({"scope": ["a", "tools.write"]}, {"scope": "b a"}, True),
        ({"scope": "^tools\\..*$"}, {"scope": "mcp tools.read"}, True),
        ({"scope": "mcp tools.write"}, {"scope": "mcp tools.write"}, False),  # one token each
    ],
)
def test_scope_claim_matches_as_a_set_of_tokens(
    matchers: dict[str, Any], claims: dict[str, Any], expected: bool
) -> None:
    r = Role.of(role_settings(claims=matchers))
    assert r.applies_to(identity("nobody", **claims)) is expected


def scope_roles() -> list[RoleSettings]:
    return [
        role_settings("readers", claims={"scope": "mcp"}, apps={"env": "test"}, allow=("echo",)),
        role_settings(
            "writers", claims={"scope": "tools.write"}, apps={"env": "test"}, allow=("add",)
        ),
        role_settings("no-whoami", users=("*",), deny=("whoami",)),
    ]


def test_step_up_names_the_scope_that_would_allow_the_tool() -> None:
    policy = Policy(scope_roles())
    reader = policy.access("k", identity(scope="openid mcp"), "a", LABELS_A)
    assert reader.tool_allowed("echo") and not reader.tool_allowed("add")
    # The token's scopes and the one missing: authorizing again loses nothing.
    assert reader.step_up_scope("add") == ("openid", "mcp", "tools.write")
    assert reader.step_up_scope("whoami") is None  # denied whatever the scope
    assert reader.step_up_scope("unknown") is None  # no role allows it
    writer = policy.access("k2", identity(scope="openid mcp tools.write"), "a", LABELS_A)
    assert writer.tool_allowed("add") and writer.step_up_scope("add") is None


def test_step_up_for_an_app_no_role_grants_yet() -> None:
    policy = Policy(scope_roles())
    access = policy.access("k", identity(), "a", LABELS_A)
    assert not access.app_allowed
    assert access.step_up_scope(None) == ("mcp",)  # the first role (config order)
    elsewhere = policy.access("k", identity(), "z", {"env": "prod"})
    assert elsewhere.step_up_scope(None) is None  # no scope role grants that app


def test_no_step_up_without_scope_roles_or_for_patterns() -> None:
    plain = Policy([role_settings(users=(ALICE,), apps={"env": "test"}, allow=("echo",))])
    assert plain.access("k", identity(), "a", LABELS_A).step_up_scope("add") is None
    pattern = Policy(
        [role_settings(claims={"scope": "^tools\\..*$"}, apps={"env": "test"}, allow=("*",))]
    )
    # A pattern names no scope a client could ask for.
    assert pattern.access("k", identity(), "a", LABELS_A).step_up_scope("add") is None
    # Nor does a value no token can hold (and that must never reach a header).
    odd = Policy([role_settings(claims={"scope": 'a"\r\nb'}, apps={"env": "test"}, allow=("*",))])
    assert odd.access("k", identity(), "a", LABELS_A).step_up_scope("add") is None


# --------------------------------------------------------------------------------------------
# Configuration of roles


ROLES_TOML = r"""
[[roles]]
name = "engineers"
claims = { groups = ["eng", "^team-.*$"] }
app_labels = { env = ["dev", "prod"] }
[roles.mcp]
tools = ["echo", "search_*", "^get_[a-z]+$"]
[roles.deny.mcp]
tools = ["delete_*"]

[[roles]]
name = "admins"
users = ["root@example.com", "^.*@admin\\.example$", "*"]

[[roles]]
name = "deny-only"
users = ["mallory@example.com"]
deny = { mcp = { tools = ["*"] } }
"""


def settings_of(text: str) -> Settings:
    return parse_settings(tomllib.loads(text))


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as failure:
        settings_of(text)
    return failure.value.problems


def test_roles_parse() -> None:
    engineers, admins, deny_only = settings_of(ROLES_TOML).roles
    assert engineers == RoleSettings(
        "engineers",
        (),
        parse_selector({"groups": ["eng", "^team-.*$"]}),
        parse_selector({"env": ["dev", "prod"]}),
        ("echo", "search_*", "^get_[a-z]+$"),
        ("delete_*",),
    )
    assert admins == RoleSettings(
        "admins", ("root@example.com", r"^.*@admin\.example$", "*"), None, None, (), ()
    )
    assert deny_only.deny_tools == ("*",) and deny_only.allow_tools == ()
    assert settings_of("").roles == ()
    # What the config says is what the policy does.
    policy = Policy(settings_of(ROLES_TOML).roles)
    access = policy.access("k", identity("x", groups=["team-z"]), "a", {"env": "prod"})
    assert access.tool_allowed("search_docs") and access.tool_allowed("get_x")
    assert not access.tool_allowed("delete_all") and not access.tool_allowed("get_X")
    assert not policy.access("m", identity("mallory@example.com"), "a", {"env": "prod"}).app_allowed


def test_role_problems_are_reported_with_key_paths() -> None:
    text = r"""
[[roles]]
name = "bad-regex"
users = ["ok", "^(unclosed$"]
claims = { groups = "^[z-a]$" }
[roles.mcp]
tools = ["echo", "^(open$", ""]
[roles.deny.mcp]
tools = ["^*$"]

[[roles]]
name = "unknown-keys"
users = ["*"]
colour = "red"
[roles.mcp]
tool = ["echo"]
[roles.deny]
tools = ["add"]

[[roles]]
name = "nobody"
app_labels = { env = "test" }

[[roles]]
name = "bad-regex"
users = ["x"]

[[roles]]
users = [3]
claims = { admin = true }
"""
    problems = problems_of(text)
    expected = {
        "roles[0].users[1]",
        "roles[0].claims",
        "roles[0].mcp.tools[1]",
        "roles[0].mcp.tools[2]",
        "roles[0].deny.mcp.tools[0]",
        "roles[1].colour",
        "roles[1].mcp.tool",
        "roles[1].deny.tools",
        "roles[2]",
        "roles[3].name",
        "roles[4].name",
        "roles[4].users[0]",
        "roles[4].claims",
    }
    assert sorted(p.split(": ", 1)[0] for p in problems) == sorted(expected), problems
    by_path = {p.split(": ", 1)[0]: p.split(": ", 1)[1] for p in problems}
    assert "bad regular expression" in by_path["roles[0].users[1]"]
    assert "bad regular expression" in by_path["roles[0].claims"]
    assert "bad regular expression" in by_path["roles[0].mcp.tools[1]"]
    assert by_path["roles[0].mcp.tools[2]"] == "must not be empty"
    assert "bad regular expression" in by_path["roles[0].deny.mcp.tools[0]"]
    assert by_path["roles[1].colour"] == "unknown key"
    assert by_path["roles[1].mcp.tool"] == "unknown key"
    assert by_path["roles[1].deny.tools"] == "unknown key"
    assert '"users" or "claims"' in by_path["roles[2]"]
    assert by_path["roles[3].name"] == "duplicate role name 'bad-regex'"
    assert by_path["roles[4].name"] == "required"
    assert "must be strings" in by_path["roles[4].claims"]


@pytest.mark.parametrize(
    "who",
    ["users = []", "claims = {}", "users = []\nclaims = {}"],
    ids=["empty-users", "empty-claims", "both-empty"],
)
def test_role_that_can_apply_to_no_one_is_refused(who: str) -> None:
    problems = problems_of(f'[[roles]]\nname = "r"\n{who}\n[roles.mcp]\ntools = ["*"]\n')
    assert problems == ['roles[0]: a role needs "users" or "claims" to say whom it applies to']


def test_roles_must_be_an_array_of_tables() -> None:
    assert problems_of('roles = "admin"\n') == ["roles: expected an array of tables ([[...]])"]
    assert problems_of('[[roles]]\nname = "r"\nusers = ["x"]\nmcp = ["echo"]\n') == [
        "roles[0].mcp: expected a table"
    ]


async def test_denied_tool_call_sent_as_a_notification_is_202_and_dropped(env: Env) -> None:
    """A tools/call without an id gets no JSON-RPC answer (there is no id to answer)."""
    proxy = await env.proxy([role("echo-only", users=["*"], allow=["echo"])])
    note = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "add"}}
    resp = await proxy.post("/mcp/apps/a", json=note, headers=headers(env.token()))
    assert resp.status == 202
    assert await resp.read() == b""
    assert [c.name for c in env.up.calls] == []


# --------------------------------------------------------------------------------------------
# Roles granting by scope, and step-up authorization (issue 12 §2)


async def test_step_up_write_tool_needs_a_scope_tools_list_does_not(env: Env) -> None:
    """A token without the write scope lists tools, is refused the write tool with 403
    insufficient_scope naming the scopes to ask for, and with them the call goes through."""
    doc = env.doc(
        [
            role("readers", claims={"scope": "mcp"}, allow=["echo"]),
            role("writers", claims={"scope": "tools.write"}, allow=["add"]),
        ]
    )
    doc["app_auth_configs"][0]["jwt"]["required_scopes"] = ["mcp"]
    proxy = await env.make_proxy(doc)
    reader = env.token(scope="mcp")
    async with mcp_client(url(proxy), reader, mode=LEGACY) as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
    resp = await proxy.post("/mcp/apps/a", json=call("add", 5), headers=headers(reader))
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["data"] == {"status": 403, "reason": "insufficient_scope"}
    metadata = "http://127.0.0.1:0"  # base_config's public_url (from its listen address)
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_scope", scope="mcp tools.write", '
        f'resource_metadata="{metadata}/.well-known/oauth-protected-resource/mcp/apps/a", '
        "error_description=\"tool 'add' needs a scope the token lacks\""
    )
    # A tool no scope would allow is still proxyd's JSON-RPC denial.
    resp = await proxy.post("/mcp/apps/a", json=call("whoami", 6), headers=headers(reader))
    assert resp.status == 200 and (await resp.json())["error"]["code"] == DENIED_CODE
    assert env.up.calls == []
    writer = env.token(scope="mcp tools.write")
    async with mcp_client(url(proxy), writer, mode=LEGACY) as c:
        assert {t.name for t in (await c.list_tools()).tools} == {"echo", "add"}
        assert text_of(await c.call_tool("add", {"a": 2, "b": 3})) == "5"
    assert [c.name for c in env.up.calls] == ["add"]
