"""MCP sessions across app servers (2025-era transport): sealed ids, pinning, key ring.

Two real SDK upstream servers behind one or more proxyd instances on 127.0.0.1. The client
holds a sealed ``pxs1.`` id; proxyd opens it on every request and sends the request to the
one server that owns the session, with that server's own id — from any instance sharing the
key ring. Anything else (another user, another app, forged, a removed key, a dead or
unhealthy server) is a 404 that never reaches an upstream. Only time and randomness are faked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from mcp import MCPError
from multidict import CIMultiDict

from proxyd.config import ConfigError, parse_settings
from proxyd.mcp.sessionid import MAX_ID_LENGTH, PREFIX, Pin, SessionIdCodec
from tests.conftest import FakeClock, LogCapture, ProxyFactory, base_config
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import LEGACY, LEGACY_VERSION, SeenRequest, UpstreamServer, mcp_client
from tests.kit.proxy import Client
from tests.kit.sessions import (
    ACCEPT,
    KEY_OLD,
    SID,
    Answer,
    Rig,
    b64,
    call,
    initialize,
    marks,
    owner_index,
    rpc,
    sdk_servers,
    since,
    text_of,
    url_of,
    watched,
)

KEY_NEW = bytes(range(100, 132))
KEY_OTHER = hashlib.sha256(b"another ring").digest()


# --------------------------------------------------------------------------------------------
# Helpers of these tests alone (the rig and the legacy transport: tests/kit/sessions.py)


async def any_get_since(ups: Sequence[UpstreamServer], mark: Sequence[int]) -> None:
    """Wait until the SDK client's GET stream reached one of the upstreams."""
    waits = [
        asyncio.ensure_future(watched(up).wait_for(lambda r: r.method == "GET", m))
        for up, m in zip(ups, mark, strict=True)
    ]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def other_method(proxy: Client, token: str, method: str, sid: str, app: str = "a") -> Answer:
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "text/event-stream" if method == "GET" else ACCEPT,
        SID: sid,
        "MCP-Protocol-Version": LEGACY_VERSION,
    }
    async with proxy.request(method, f"/mcp/apps/{app}", headers=headers) as resp:
        if resp.status == 200 and method == "GET":
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            return Answer(resp.status, resp.headers, "")  # an open stream: leave it
        return Answer(resp.status, resp.headers, await resp.text())


def upstream_ids(seen: Iterable[SeenRequest]) -> set[str | None]:
    return {r.headers.get("mcp-session-id") for r in seen}


def refusals(logs: LogCapture) -> list[str]:
    return [line["reason"] for line in logs.events("mcp_session_refused")]


# --------------------------------------------------------------------------------------------
# A full session with the official SDK client, several times over two servers


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
async def test_sdk_sessions_stay_on_the_server_that_owns_them(
    json_response: bool,
    issuer: TestIssuer,
    clock: FakeClock,
    make_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:
    async with sdk_servers(json_response=json_response) as ups:
        rig = Rig(ups, issuer, clock, make_proxy, tmp_path)
        proxy = await rig.proxy()
        owners: list[int] = []
        for n in range(8):
            mark, calls = marks(ups), [len(up.calls) for up in ups]
            async with mcp_client(url_of(proxy), rig.token(), mode=LEGACY) as c:
                assert "echo" in {t.name for t in (await c.list_tools()).tools}
                for i in range(3):
                    echoed = await c.call_tool("echo", {"text": f"s{n} #{i}"})
                    assert echoed.content[0].text == f"s{n} #{i}"  # type: ignore[union-attr]
                added = await c.call_tool("add", {"a": n, "b": 100})
                assert added.content[0].text == str(n + 100)  # type: ignore[union-attr]
                await any_get_since(ups, mark)  # the SDK's standalone GET stream is open
            # -- leaving the client sent DELETE; only now is the session's traffic complete
            owner = owner_index(ups, mark)  # the other server saw nothing at all
            owners.append(owner)
            seen = since(ups, mark)[owner]
            sid = c.session_id
            assert sid is not None and sid.startswith(PREFIX)
            # initialize carried no id; everything after it the owner's own id, never ours
            assert seen[0].method == "POST" and "mcp-session-id" not in seen[0].headers
            [upstream_id] = upstream_ids(seen[1:])
            assert upstream_id and not upstream_id.startswith(PREFIX) and upstream_id != sid
            methods = [r.method for r in seen]
            assert methods.count("POST") >= 7  # initialize, initialized, list, 4 calls
            assert "GET" in methods
            assert methods[-1] == "DELETE"
            assert [len(up.calls) - k for up, k in zip(ups, calls, strict=True)] == [
                4 if i == owner else 0 for i in range(2)
            ]
            # the client only ever held and presented the sealed id
            assert {r.headers.get("mcp-session-id") for r in c.received} <= {sid, None}
            assert {r.headers.get("mcp-session-id") for r in c.sent[1:]} == {sid}
            assert [r.status for r in c.received if r.method == "DELETE"] == [200]
            assert all(upstream_id not in r.headers.get("mcp-session-id", "") for r in c.received)
        assert set(owners) == {0, 1}, owners  # the seeded RNG gave both servers sessions


async def test_sealed_id_names_the_owner_and_the_caller(rig: Rig) -> None:
    """Cross-check with the codec: the sealed id carries app, server, upstream id, identity."""
    proxy = await rig.proxy()
    mark = marks(rig.ups)
    sid = await initialize(proxy, rig.token(email="carol@example.com"))
    owner = owner_index(rig.ups, mark)
    pin = SessionIdCodec([KEY_OLD]).open(sid)
    assert pin is not None
    [upstream_id] = upstream_ids(since(rig.ups, mark)[owner][1:])
    assert pin == Pin(
        "a", rig.ups[owner].url, str(upstream_id), rig.issuer.issuer, "carol@example.com"
    )


# --------------------------------------------------------------------------------------------
# Two proxyd instances sharing the key ring, no shared state


async def test_session_alternates_between_instances_sharing_the_ring(rig: Rig) -> None:
    first, second = await rig.proxy(), await rig.proxy()
    token = rig.token()
    for round_ in range(4):  # enough sessions that both servers own some
        mark = marks(rig.ups)
        sid = await initialize(first if round_ % 2 else second, token)
        instances = [first, second]
        listed = await rpc(instances[round_ % 2], token, "tools/list", sid=sid)
        assert listed.status == 200 and listed.headers[SID] == sid
        for i in range(6):
            answer = await call(instances[i % 2], token, sid, "add", {"a": i, "b": round_})
            assert text_of(answer) == str(i + round_)
            assert answer.headers[SID] == sid  # both instances hand back the client's id
        stream = await other_method(second, token, "GET", sid)
        assert stream.status == 200
        owner = owner_index(rig.ups, mark)
        await watched(rig.ups[owner]).wait_for(lambda r: r.method == "GET", mark[owner])
        assert (await other_method(first, token, "DELETE", sid)).status == 200
        # The session is over on its server: its own 404 comes back through either instance.
        gone = await call(second, token, sid, "echo", {"text": "late"})
        assert gone.status == 404 and "data" not in gone.message["error"]
        owner = owner_index(rig.ups, mark)  # still only the owner saw any of it
        seen = since(rig.ups, mark)[owner]
        assert len(upstream_ids(seen[1:])) == 1
        assert [r.method for r in seen].count("POST") == 10
        assert [c.arguments for c in rig.ups[owner].calls[-6:]] == [
            {"a": i, "b": round_} for i in range(6)
        ]
    # Both servers owned sessions.
    assert all(up.calls for up in rig.ups)


async def test_instance_without_the_server_refuses_the_session(rig: Rig, logs: LogCapture) -> None:
    """A session pinned to a server the other instance's config does not list: 404, logged."""
    first = await rig.proxy()
    token = rig.token()
    mark = marks(rig.ups)
    sid = await initialize(first, token)
    owner = owner_index(rig.ups, mark)
    survivor = rig.ups[1 - owner]
    trimmed = await rig.proxy(apps={"a": [survivor.url]})
    mark = marks(rig.ups)
    answer = await call(trimmed, token, sid, "echo", {"text": "x"})
    assert answer.refusal() == "mcp_session_server_removed"
    assert marks(rig.ups) == mark
    [line] = logs.events("mcp_session_refused")
    assert line["server"] == rig.ups[owner].url and line["app"] == "a"
    # the instance that knows the server still serves it
    assert text_of(await call(first, token, sid, "echo", {"text": "y"})) == "y"


# --------------------------------------------------------------------------------------------
# The owning server dies


async def test_owner_killed_next_request_is_404_and_reinitialize_lands_on_the_other(
    rig: Rig, logs: LogCapture
) -> None:
    proxy = await rig.proxy(passive_failures=10)  # no ejection: the connect failure itself
    url = url_of(proxy)
    async with mcp_client(url, rig.token(), mode=LEGACY) as c:
        mark = marks(rig.ups)
        assert (await c.call_tool("echo", {"text": "alive"})).content[0].text == "alive"  # type: ignore[union-attr]
        owner = owner_index(rig.ups, mark)
        dead, survivor = rig.ups[owner], rig.ups[1 - owner]
        await dead.stop()
        survivor_mark = len(survivor.requests)
        with pytest.raises(MCPError) as refused:
            await c.call_tool("echo", {"text": "dead"})
        assert refused.value.data == {
            "status": 404,
            "reason": "mcp_session_server_unreachable",
        }
        assert survivor.requests[survivor_mark:] == []  # never re-routed to another server
    assert "mcp_session_server_unreachable" in refusals(logs)
    assert all(line["status"] != 502 for line in logs.events("request"))
    # A new session works and lives on the survivor, whatever the random pick said.
    for _ in range(4):
        mark = marks(rig.ups)
        async with mcp_client(url, rig.token(), mode=LEGACY) as c2:
            assert (await c2.call_tool("add", {"a": 1, "b": 1})).content[0].text == "2"  # type: ignore[union-attr]
        assert owner_index(rig.ups, mark) == 1 - owner


async def test_dead_owner_is_404_then_unhealthy_and_comes_back_after_restart(
    rig: Rig, logs: LogCapture
) -> None:
    proxy = await rig.proxy(passive_failures=2)
    token = rig.token()
    mark = marks(rig.ups)
    sid = await initialize(proxy, token)
    owner = owner_index(rig.ups, mark)
    dead = rig.ups[owner]
    await dead.stop()
    first = await call(proxy, token, sid, "echo", {"text": "1"})
    assert first.refusal() == "mcp_session_server_unreachable"
    second = await other_method(proxy, token, "GET", sid)
    assert second.refusal() == "mcp_session_server_unreachable"
    # two passive failures eject the server: now refused before any connect attempt
    third = await other_method(proxy, token, "DELETE", sid)
    assert third.refusal() == "mcp_session_server_unhealthy"
    assert refusals(logs) == ["mcp_session_server_unreachable"] * 2 + [
        "mcp_session_server_unhealthy"
    ]
    unreachable = [
        line
        for line in logs.events("mcp_session_refused")
        if line["reason"] == "mcp_session_server_unreachable"
    ]
    assert all(line["server"] == dead.url and line["cause"] for line in unreachable)
    # New sessions go to the healthy server meanwhile.
    mark = marks(rig.ups)
    await initialize(proxy, token)
    assert owner_index(rig.ups, mark) == 1 - owner
    # Restarted (fresh state) and past the cool-down: proxyd forwards again, and the
    # server's own 404 for the session it forgot reaches the client.
    await dead.start()
    rig.clock.advance(60)  # past the 10 s ejection, well within the token's life
    mark = marks(rig.ups)
    forgotten = await call(proxy, token, sid, "echo", {"text": "again"})
    assert forgotten.status == 404 and "data" not in forgotten.message["error"]
    assert owner_index(rig.ups, mark) == owner


# --------------------------------------------------------------------------------------------
# Who may use a session id


async def test_other_user_replaying_the_id_gets_404_and_nothing_is_forwarded(
    rig: Rig, logs: LogCapture
) -> None:
    proxy = await rig.proxy()
    alice = rig.token(email="alice@example.com")
    bob = rig.token(email="bob@example.com", sub="u-456")
    sid = await initialize(proxy, alice)
    mark, calls = marks(rig.ups), [len(up.calls) for up in rig.ups]
    assert (await call(proxy, bob, sid, "echo", {"text": "stolen"})).refusal() == (
        "foreign_mcp_session"
    )
    for method in ("GET", "DELETE"):
        answer = await other_method(proxy, bob, method, sid)
        assert answer.refusal() == "foreign_mcp_session"
    assert marks(rig.ups) == mark and [len(up.calls) for up in rig.ups] == calls
    assert refusals(logs) == ["foreign_mcp_session"] * 3
    assert all(line["server"] is None for line in logs.events("mcp_session_refused"))
    # Bob's attempts did not hurt Alice's session.
    assert text_of(await call(proxy, alice, sid, "echo", {"text": "mine"})) == "mine"


async def test_same_username_from_another_issuer_is_foreign(rig: Rig, tmp_path: Path) -> None:
    other = TestIssuer(issuer="https://other-idp.test")
    other.add_key("o1", "ES256")
    server = TestServer(other.app(), host="127.0.0.1")
    await server.start_server()
    try:
        other.url = str(server.make_url("/jwks.json"))
        doc = rig.doc()
        doc["app_auth_configs"].append(
            {
                "name": "other-idp",
                "app_labels": {"env": "test"},
                "jwt": {"issuer": other.issuer, "audience": other.audience, "jwks_url": other.url},
            }
        )
        proxy = await rig.make_proxy(doc)
        sid = await initialize(proxy, rig.token())
        impostor = other.token(rig.clock.wall())  # same email claim, another IdP
        mark = marks(rig.ups)
        answer = await call(proxy, impostor, sid, "echo", {"text": "x"})
        assert answer.refusal() == "foreign_mcp_session"
        assert marks(rig.ups) == mark
        # the other IdP's user is a real user: its own session works
        own = await initialize(proxy, impostor)
        assert text_of(await call(proxy, impostor, own, "echo", {"text": "ok"})) == "ok"
    finally:
        await server.close()


async def test_id_from_another_app_is_404(rig: Rig) -> None:
    servers = [up.url for up in rig.ups]
    proxy = await rig.proxy(apps={"a": servers, "b": servers})  # same servers, two apps
    token = rig.token()
    sid = await initialize(proxy, token, app="a")
    mark = marks(rig.ups)
    answer = await rpc(proxy, token, "tools/list", sid=sid, app="b")
    assert answer.refusal() == "foreign_mcp_session"
    assert marks(rig.ups) == mark
    listed = await rpc(proxy, token, "tools/list", sid=sid, app="a")
    assert listed.status == 200


def _flip(sid: str, index: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    char = sid[index]
    return sid[:index] + alphabet[(alphabet.index(char) + 1) % 64] + sid[index + 1 :]


async def test_forged_tampered_and_garbage_ids_are_404(rig: Rig, logs: LogCapture) -> None:
    proxy = await rig.proxy()
    token = rig.token()
    mark0 = marks(rig.ups)
    sid = await initialize(proxy, token)
    owner = owner_index(rig.ups, mark0)
    [upstream_id] = upstream_ids(since(rig.ups, mark0)[owner][1:])
    assert upstream_id is not None
    body = sid[len(PREFIX) :]
    foreign_ring = SessionIdCodec([KEY_OTHER]).seal(
        Pin("a", rig.ups[owner].url, upstream_id, rig.issuer.issuer, "alice@example.com")
    )
    candidates = [
        upstream_id,  # the upstream's own id, had it leaked: not ours, never forwarded
        "garbage",
        PREFIX,
        PREFIX + "!!!!",
        PREFIX + "é" * 10,
        "pxs2." + body,
        sid[:-1],
        sid + "A",
        _flip(sid, len(PREFIX) + 2),  # key id
        _flip(sid, len(PREFIX) + 10),  # nonce
        _flip(sid, len(sid) // 2),  # ciphertext
        _flip(sid, len(sid) - 2),  # tag
        foreign_ring,  # well formed, sealed with a key this ring never had
        PREFIX + "A" * (MAX_ID_LENGTH + 1),
    ]
    mark = marks(rig.ups)
    for candidate in candidates:
        answer = await call(proxy, token, candidate, "echo", {"text": "x"})
        assert answer.refusal() == "unknown_mcp_session", candidate
    assert marks(rig.ups) == mark
    assert refusals(logs) == ["unknown_mcp_session"] * len(candidates)
    assert text_of(await call(proxy, token, sid, "echo", {"text": "real"})) == "real"


async def test_two_session_ids_are_refused_and_never_reach_the_upstream(rig: Rig) -> None:
    """Two Mcp-Session-Id lines: proxyd would read the first, Node joins them, others take the
    last (issue 10): 400 whatever their order, and nothing goes up."""
    proxy = await rig.proxy()
    token = rig.token()
    sid = await initialize(proxy, token)
    mark = marks(rig.ups)
    body = {"jsonrpc": "2.0", "id": 99, "method": "tools/list"}
    for ids in ([sid, "pxs1.smuggled"], ["x", sid]):
        headers = CIMultiDict(
            [
                ("Authorization", f"Bearer {token}"),
                ("Accept", ACCEPT),
                ("MCP-Protocol-Version", LEGACY_VERSION),
                *((SID, value) for value in ids),
            ]
        )
        resp = await proxy.post("/mcp/apps/a", json=body, headers=headers)
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["code"] == -32020
    assert all(not requests for requests in since(rig.ups, mark))


# --------------------------------------------------------------------------------------------
# Key rotation and restarts


async def test_key_rotation_opens_old_ids_and_seals_with_the_new_key(rig: Rig) -> None:
    token = rig.token()
    old_only = await rig.proxy(keys=[KEY_OLD])
    old_sid = await initialize(old_only, token)
    rotated = await rig.proxy(keys=[KEY_NEW, KEY_OLD])
    # the rotated ring keeps the old session going (and hands back the same id)
    answer = await call(rotated, token, old_sid, "echo", {"text": "still"})
    assert text_of(answer) == "still" and answer.headers[SID] == old_sid
    # new sessions are sealed with the new key: a new-key-only instance opens them, an
    # old-key-only one does not
    new_sid = await initialize(rotated, token)
    new_only = await rig.proxy(keys=[KEY_NEW])
    assert text_of(await call(new_only, token, new_sid, "echo", {"text": "new"})) == "new"
    assert (await call(old_only, token, new_sid, "echo", {"text": "x"})).refusal() == (
        "unknown_mcp_session"
    )
    # the old key removed from the ring: its sessions end with a 404
    assert (await call(new_only, token, old_sid, "echo", {"text": "x"})).refusal() == (
        "unknown_mcp_session"
    )


async def test_sessions_survive_a_restart_with_configured_keys(rig: Rig) -> None:
    token = rig.token()
    before = await rig.proxy()
    sid = await initialize(before, token)
    await before.close()
    after = await rig.proxy()
    assert text_of(await call(after, token, sid, "echo", {"text": "back"})) == "back"


async def test_refreshed_token_keeps_the_session(rig: Rig, logs: LogCapture) -> None:
    proxy = await rig.proxy()
    first = rig.token()
    mark = marks(rig.ups)
    sid = await initialize(proxy, first)
    owner = owner_index(rig.ups, mark)
    rig.clock.advance(1800)
    refreshed = rig.token(sub="u-123")  # a new JWT: later iat/exp, same issuer and user
    assert refreshed != first
    answer = await call(proxy, refreshed, sid, "echo", {"text": "refreshed"})
    assert text_of(answer) == "refreshed" and answer.headers[SID] == sid
    assert owner_index(rig.ups, mark) == owner
    assert len(logs.events("session_created")) == 2  # really a second proxyd session
    assert refusals(logs) == []


# --------------------------------------------------------------------------------------------
# Configuration of the key ring


def _config_problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    return exc.value.problems


def test_mcp_keys_parse_in_both_base64_alphabets(issuer: TestIssuer, tmp_path: Path) -> None:
    key = bytes([0xFB, 0xFF] * 16)  # encodes with + and / (standard) or - and _ (URL-safe)
    standard, urlsafe = base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()
    assert "+" in standard or "/" in standard
    doc = base_config(
        issuer,
        {"a": ["http://127.0.0.1:1/mcp"]},
        tmp_path,
        sessions={"mcp_keys": [standard, urlsafe.rstrip("="), b64(KEY_OLD)]},
    )
    assert parse_settings(doc).sessions.mcp_keys == (key, key, KEY_OLD)
    doc["sessions"] = {}
    assert parse_settings(doc).sessions.mcp_keys == ()


def test_bad_mcp_keys_are_reported_with_their_path(issuer: TestIssuer, tmp_path: Path) -> None:
    doc = base_config(
        issuer,
        {"a": ["http://127.0.0.1:1/mcp"]},
        tmp_path,
        sessions={"mcp_keys": [b64(KEY_OLD), "not base64!", b64(b"short" * 3), 7]},
    )
    problems = _config_problems(doc)
    assert [p.split(":", 1)[0] for p in problems] == [
        "sessions.mcp_keys[1]",
        "sessions.mcp_keys[2]",
        "sessions.mcp_keys[3]",
    ]
    assert "not base64" in problems[0]
    assert "32 bytes" in problems[1] and "15" in problems[1]
    assert "string" in problems[2]
    # key material never echoed into an error message (it may end up in a log)
    assert "not base64!" not in problems[0] and b64(b"short" * 3) not in problems[1]
    doc["sessions"] = {"mcp_keys": b64(KEY_OLD)}
    [problem] = _config_problems(doc)
    assert problem.startswith("sessions.mcp_keys: ")
    assert b64(KEY_OLD) not in problem


async def test_without_keys_an_ephemeral_key_is_used_and_said_once(
    rig: Rig, logs: LogCapture
) -> None:
    proxy = await rig.proxy(keys=None)
    assert len(logs.events("mcp_session_key_ephemeral")) == 1
    [warning] = logs.events("mcp_session_key_ephemeral")
    assert warning["level"] == "warning"
    token = rig.token()
    sid = await initialize(proxy, token)
    assert sid.startswith(PREFIX)
    for i in range(3):
        assert text_of(await call(proxy, token, sid, "echo", {"text": str(i)})) == str(i)
    assert len(logs.events("mcp_session_key_ephemeral")) == 1  # at start, not per session
    # what the warning means: another instance (or a restart) cannot open the id
    other = await rig.proxy(keys=None)
    assert (await call(other, token, sid, "echo", {"text": "x"})).refusal() == (
        "unknown_mcp_session"
    )
    await rig.proxy()  # with keys: no warning
    assert len(logs.events("mcp_session_key_ephemeral")) == 2  # the two keyless ones


# --------------------------------------------------------------------------------------------
# SessionIdCodec by itself


PIN = Pin("app", "http://10.0.0.1:3001/mcp", "0f3a-upstream-id", "https://idp", "ålice@x")
URLSAFE_ID = re.compile(r"^pxs1\.[A-Za-z0-9_-]+$")


def raw_of(sid: str) -> bytes:
    body = sid[len(PREFIX) :]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def id_of(raw: bytes) -> str:
    return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def counter_random() -> Callable[[int], bytes]:
    state = {"n": 0}

    def random_bytes(size: int) -> bytes:
        assert size == 12
        state["n"] += 1
        return state["n"].to_bytes(size, "big")

    return random_bytes


def test_codec_round_trip_and_id_shape() -> None:
    codec = SessionIdCodec([KEY_OLD])
    sid = codec.seal(PIN)
    assert URLSAFE_ID.match(sid), sid  # visible ASCII, no padding: a valid header value
    assert codec.open(sid) == PIN
    for secret in (PIN.upstream_id, PIN.username, PIN.server, PIN.issuer):
        assert secret not in sid  # encrypted, not just signed


def test_codec_tampering_any_byte_is_refused() -> None:
    codec = SessionIdCodec([KEY_OLD])
    sid = codec.seal(PIN)
    raw = raw_of(sid)
    assert id_of(raw) == sid and codec.open(id_of(raw)) == PIN
    for index in range(len(raw)):
        for bit in (0x01, 0x80):
            changed = bytearray(raw)
            changed[index] ^= bit
            assert codec.open(id_of(bytes(changed))) is None, (index, bit)
    assert codec.open(id_of(raw[:-1])) is None
    assert codec.open(id_of(raw + b"\0")) is None


@pytest.mark.parametrize(
    "candidate",
    ["", "pxs1", "pxs1.", "PXS1.abc", "pxs2.abc", "xpxs1.abc", "pxs1.***", "pxs1.é", "pxs1.A"],
)
def test_codec_refuses_malformed_ids(candidate: str) -> None:
    assert SessionIdCodec([KEY_OLD]).open(candidate) is None


def test_codec_refuses_wrong_prefix_on_a_valid_body() -> None:
    codec = SessionIdCodec([KEY_OLD])
    body = codec.seal(PIN)[len(PREFIX) :]
    assert codec.open(PREFIX + body) == PIN
    assert codec.open("pxs2." + body) is None
    assert codec.open(body) is None


def test_codec_refuses_overlong_ids_before_any_crypto() -> None:
    codec = SessionIdCodec([KEY_OLD])
    long_pin = Pin("a", "s", "u" * 2900, "i", "n")  # sealed just under the limit
    sid = codec.seal(long_pin)
    assert len(sid) <= MAX_ID_LENGTH and codec.open(sid) == long_pin
    too_long = codec.seal(Pin("a", "s", "u" * 3200, "i", "n"))
    assert len(too_long) > MAX_ID_LENGTH
    assert codec.open(too_long) is None


def test_codec_kid_of_a_removed_key_is_refused_and_the_ring_opens_all() -> None:
    old_sid = SessionIdCodec([KEY_OLD]).seal(PIN)
    assert SessionIdCodec([KEY_NEW]).open(old_sid) is None
    ring = SessionIdCodec([KEY_NEW, KEY_OLD])
    assert ring.open(old_sid) == PIN
    new_sid = ring.seal(PIN)
    assert SessionIdCodec([KEY_NEW]).open(new_sid) == PIN
    assert SessionIdCodec([KEY_OLD]).open(new_sid) is None


def test_codec_key_id_is_bound_to_the_ciphertext() -> None:
    """Another ring key's kid in front of the ciphertext does not open it (no trying every key)."""
    ring = SessionIdCodec([KEY_NEW, KEY_OLD])
    sid = SessionIdCodec([KEY_OLD]).seal(PIN)
    raw = raw_of(sid)
    assert ring.open(id_of(raw)) == PIN
    swapped = hashlib.sha256(KEY_NEW).digest()[:4] + raw[4:]
    assert ring.open(id_of(swapped)) is None


def _seal_raw(key: bytes, plain: bytes, nonce: bytes = b"\0" * 12) -> str:
    kid = hashlib.sha256(key).digest()[:4]
    sealed = AESGCM(key).encrypt(nonce, plain, PREFIX.encode() + kid)
    return PREFIX + base64.urlsafe_b64encode(kid + nonce + sealed).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "plain",
    [
        b'["a","s","u","i"]',
        b'["a","s","u","i","n","x"]',
        b'{"app":"a"}',
        b'["a","s",1,"i","n"]',
        b"not json",
        b"\xff\xfe",
    ],
)
def test_codec_refuses_authentic_but_malformed_payloads(plain: bytes) -> None:
    codec = SessionIdCodec([KEY_OLD])
    assert codec.open(_seal_raw(KEY_OLD, b'["a","s","u","i","n"]')) == Pin("a", "s", "u", "i", "n")
    assert codec.open(_seal_raw(KEY_OLD, plain)) is None


def test_codec_nonces_come_from_the_injected_randomness() -> None:
    codec = SessionIdCodec([KEY_OLD], random_bytes=counter_random())
    ids = [codec.seal(PIN) for _ in range(50)]
    assert len(set(ids)) == 50  # same pin, fresh nonce each time
    nonces = [raw_of(i)[4:16] for i in ids]
    assert nonces == [n.to_bytes(12, "big") for n in range(1, 51)]
    # and a (broken) constant source would repeat them: the nonce is not made up elsewhere
    constant = SessionIdCodec([KEY_OLD], random_bytes=lambda size: b"\x07" * size)
    assert constant.seal(PIN) == constant.seal(PIN)


def test_codec_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        SessionIdCodec([])


async def test_upstream_session_id_too_long_to_seal_is_502(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """An id we could never open again must not reach the client (it would loop forever)."""

    async def mint(request: web.Request) -> web.Response:
        return web.json_response(
            {"jsonrpc": "2.0", "id": 1, "result": {}}, headers={"Mcp-Session-Id": "x" * 4000}
        )

    up = web.Application()
    up.router.add_post("/mcp", mint)
    server = TestServer(up, host="127.0.0.1")
    await server.start_server()
    try:
        proxy = await make_proxy(
            base_config(issuer, {"a": [str(server.make_url("/mcp"))]}, tmp_path)
        )
        resp = await proxy.post(
            "/mcp/apps/a",
            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
            headers={"Authorization": f"Bearer {issuer.token(clock.wall())}"},
        )
        assert resp.status == 502
        assert (await resp.json())["error"]["data"]["reason"] == "session_id_too_long"
    finally:
        await server.close()
