"""The MCP endpoint end to end: the error table, sessions, the identity assertion, access logs
and the RFC 9728 resource metadata. Real upstreams and a real IdP on 127.0.0.1; only time is
faked (FakeClock). Forwarding and streaming details live in tests/upstream/test_forward.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxyd.app import RUNTIME
from proxyd.auth.session import session_key
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import MINTED, TestIssuer, b64url
from tests.kit.proxy import (
    IDENTITY,
    PUBLIC_URL,
    RPC,
    access_lines,
    bearer,
    config,
    decode_assertion,
    padded_rpc,
    proxy_keys,
    resource_metadata_header,
    rpc_error,
)
from tests.kit.wait import GUARD

# --------------------------------------------------------------------------------------------
# The error table


@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS"])
async def test_other_methods_are_405_with_allow(
    method: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.request(method, "/mcp/apps/a", json=RPC, headers=bearer(token))
    body = await rpc_error(resp, 405)
    assert resp.headers["Allow"] == "POST, GET, DELETE"
    assert method in body["error"]["message"]
    assert echo.seen == []


async def test_head_is_405_too(
    issuer: TestIssuer, make_proxy: ProxyFactory, upstreams: Upstreams, tmp_path: Path
) -> None:
    client = await make_proxy(config(issuer, {"a": await upstreams.start(Echo().app())}, tmp_path))
    resp = await client.head("/mcp/apps/a")
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST, GET, DELETE"


async def test_unknown_app_is_404(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client = await make_proxy(config(issuer, {"a": await upstreams.start(Echo().app())}, tmp_path))
    token = issuer.token(clock.wall())
    resp = await client.post("/mcp/apps/nope", json=RPC, headers=bearer(token))
    body = await rpc_error(resp, 404)
    assert "unknown app" in body["error"]["message"]
    # Without a token too: the app's existence is checked before credentials.
    await rpc_error(await client.post("/mcp/apps/nope", json=RPC), 404)
    assert [line["reason"] for line in access_lines(logs)] == ["unknown_app", "unknown_app"]


async def test_errors_are_counted_by_reason_and_added_latency_is_observed(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """proxyd_request_errors_total{app, reason} and proxyd_added_latency_seconds{app} (the
    dashboard's errors by reason and added latency, issue 14 §2)."""
    client = await make_proxy(config(issuer, {"a": await upstreams.start(Echo().app())}, tmp_path))
    registry = client.app[RUNTIME].core.metrics.registry
    token = issuer.token(clock.wall())
    await rpc_error(await client.post("/mcp/apps/a", json=RPC), 401)
    await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer("x.y.z")), 401)
    for _ in range(3):
        resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
        assert resp.status == 200
        await resp.read()
    reasons = [line.get("reason") for line in access_lines(logs)]
    assert reasons[2:] == [None] * 3
    for reason in reasons[:2]:
        assert isinstance(reason, str)
        value = registry.get_sample_value(
            "proxyd_request_errors_total", {"app": "a", "reason": reason}
        )
        assert value == reasons.count(reason)
    added = registry.get_sample_value("proxyd_added_latency_seconds_count", {"app": "a"})
    assert added == 3  # the forwarded requests only
    added_sum = registry.get_sample_value("proxyd_added_latency_seconds_sum", {"app": "a"})
    total_sum = registry.get_sample_value("proxyd_request_duration_seconds_sum", {"app": "a"})
    assert added_sum is not None and total_sum is not None
    assert 0 < added_sum < total_sum


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("https://evil.example", 403),
        ("null", 403),
        ("https://app.example.com.evil.example", 403),
        ("http://app.example.com", 403),  # scheme is part of the origin
        ("https://app.example.com", 200),
        ("HTTPS://APP.EXAMPLE.COM", 200),
        (PUBLIC_URL, 200),
        (None, 200),
    ],
)
async def test_origin_check(
    origin: str | None,
    status: int,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    doc = config(
        issuer,
        {"a": await upstreams.start(echo.app())},
        tmp_path,
        server={"allowed_origins": ["https://app.example.com"]},
    )
    client = await make_proxy(doc)
    headers = bearer(issuer.token(clock.wall()))
    if origin is not None:
        headers["Origin"] = origin
    resp = await client.post("/mcp/apps/a", json=RPC, headers=headers)
    if status == 403:
        body = await rpc_error(resp, 403)
        assert "origin" in body["error"]["message"]
        assert echo.seen == []
    else:
        assert resp.status == 200, await resp.text()
        assert len(echo.seen) == 1


async def test_forbidden_origin_is_refused_before_any_token_work(
    issuer: TestIssuer, make_proxy: ProxyFactory, upstreams: Upstreams, tmp_path: Path
) -> None:
    client = await make_proxy(config(issuer, {"a": await upstreams.start(Echo().app())}, tmp_path))
    resp = await client.post("/mcp/apps/a", json=RPC, headers={"Origin": "https://evil.example"})
    await rpc_error(resp, 403)
    assert issuer.fetches == 0


async def test_missing_token_is_401_with_resource_metadata(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    for method in ("POST", "GET", "DELETE"):
        resp = await client.request(method, "/mcp/apps/a")
        await rpc_error(resp, 401)
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge == f"Bearer {resource_metadata_header('a')}"
    assert echo.seen == []
    assert issuer.fetches == 0
    assert {line["reason"] for line in access_lines(logs)} == {"missing_token"}


@pytest.mark.parametrize(
    "header",
    [
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer",
        "Bearer   ",
        "Bearer abc def",
        'Bearer a"b',
        "Bearer a,b",
        "Token abc",
    ],
)
async def test_malformed_authorization_is_401_invalid_request(
    header: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    resp = await client.post("/mcp/apps/a", json=RPC, headers={"Authorization": header})
    await rpc_error(resp, 401)
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith(f"Bearer {resource_metadata_header('a')}")
    assert 'error="invalid_request"' in challenge
    assert echo.seen == []
    assert [line["reason"] for line in access_lines(logs)] == ["malformed_header"]


@pytest.mark.parametrize("case", ["expired", "bad_signature", "alg_none", "wrong_audience", "hmac"])
async def test_rejected_tokens_are_401_invalid_token(
    case: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    now = clock.wall()
    if case == "expired":
        token = issuer.token(now - 7200, exp=int(now) - 3600)
    elif case == "bad_signature":
        token = issuer.tampered(issuer.token(now), email="mallory@example.com")
        MINTED.add(token)  # the log guard must watch the forged token too
    elif case == "alg_none":
        token = issuer.unsigned_token(now)
    elif case == "wrong_audience":
        token = issuer.token(now, aud="someone-else")
    else:
        token = issuer.hmac_with_public_key(now, "k1")
    reason = {"alg_none": "alg_not_allowed", "hmac": "alg_not_allowed"}.get(case, case)
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    body = await rpc_error(resp, 401)
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith(f"Bearer {resource_metadata_header('a')}")
    assert 'error="invalid_token"' in challenge
    assert body["error"]["data"]["reason"] == reason
    assert echo.seen == []
    rejected = logs.events("auth_rejected")
    assert [(e["app"], e["reason"]) for e in rejected] == [("a", reason)]
    assert [line["reason"] for line in access_lines(logs)] == [reason]
    assert logs.events("session_created") == []


@pytest.mark.parametrize(
    "alg", ["RS256\r\nX-Injected: 1", "RS256\n", "\u03a9", "x" * 3000, 'a"b\\']
)
async def test_hostile_token_header_still_gets_a_clean_401(
    alg: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """The 401's error_description quotes the token's alg: it must stay a valid header value
    (RFC 6750 §3 character set), bounded, and never inject a header."""
    client = await make_proxy(config(issuer, {"a": await upstreams.start(Echo().app())}, tmp_path))
    head = b64url(json.dumps({"alg": alg, "kid": "k1"}).encode())
    claims = b64url(json.dumps(issuer.claims(clock.wall())).encode())
    token = f"{head}.{claims}.c2lnbmF0dXJl"
    MINTED.add(token)
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    body = await rpc_error(resp, 401)
    assert body["error"]["data"]["reason"] == "alg_not_allowed"
    assert "X-Injected" not in resp.headers
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith(f"Bearer {resource_metadata_header('a')}")
    description = challenge.split('error_description="', 1)[1].removesuffix('"')
    assert 0 < len(description) <= 200
    assert all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in description), description


async def test_token_for_app_a_is_refused_on_app_b_without_matching_config(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo_a, echo_b = Echo(), Echo()
    doc = config(
        issuer,
        {"a": await upstreams.start(echo_a.app()), "b": await upstreams.start(echo_b.app())},
        tmp_path,
    )
    doc["apps"][1]["labels"] = {"env": "other", "app": "b"}  # no app auth config selects b
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    resp = await client.post("/mcp/apps/b", json=RPC, headers=bearer(token))
    body = await rpc_error(resp, 401)
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert resource_metadata_header("b") in resp.headers["WWW-Authenticate"]
    assert body["error"]["data"]["reason"] == "no_matching_config"
    assert len(echo_a.seen) == 1
    assert echo_b.seen == []
    # The established session on app a is no session for app b, even on a second try.
    assert (await client.post("/mcp/apps/b", json=RPC, headers=bearer(token))).status == 401
    assert session_key("a", token) != session_key("b", token)


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_limit_is_413(
    chunked: bool,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    doc = config(
        issuer,
        {"a": await upstreams.start(echo.app())},
        tmp_path,
        server={"max_request_body": "1KiB"},
    )
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    headers = {**bearer(token), "Content-Type": "application/json"}

    def sent(payload: bytes) -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(payload), 256):
                yield payload[offset : offset + 256]

        return chunks() if chunked else payload

    # Valid JSON-RPC messages: a 413 can only come from the size, never from the parser.
    for size in (64 * 1024, 1025):
        resp = await client.post("/mcp/apps/a", data=sent(padded_rpc(size)), headers=headers)
        body = await rpc_error(resp, 413)
        assert "1024" in body["error"]["message"]
    # POST bodies are read whole before any upstream work, chunked or not: the upstream never
    # saw a byte of either.
    assert not echo.called.is_set()
    assert [line["status"] for line in access_lines(logs)] == [413, 413]
    # A body exactly at the limit still passes, byte for byte.
    at_limit = padded_rpc(1024, seed=2)
    resp = await client.post("/mcp/apps/a", data=sent(at_limit), headers=headers)
    assert resp.status == 200, await resp.text()
    assert echo.last.body == at_limit


async def test_headers_over_limit_are_431(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    doc = config(
        issuer,
        {"a": await upstreams.start(echo.app())},
        tmp_path,
        server={"max_header_size": "2KiB"},
    )
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    resp = await client.post(
        "/mcp/apps/a", json=RPC, headers={**bearer(token), "X-Big": "v" * 3000}
    )
    await rpc_error(resp, 431)
    assert echo.seen == []
    # Many small headers count too.
    many = {f"X-H{i}": "v" * 40 for i in range(60)}
    resp = await client.post("/mcp/apps/a", json=RPC, headers={**bearer(token), **many})
    await rpc_error(resp, 431)
    assert echo.seen == []
    # Under the limit it passes.
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200


async def test_upstream_refusing_connections_is_502(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    refused_url: str,
    logs: LogCapture,
) -> None:
    client = await make_proxy(config(issuer, {"a": refused_url}, tmp_path))
    token = issuer.token(clock.wall())
    body = await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer(token)), 502)
    assert "unreachable" in body["error"]["message"]
    [line] = access_lines(logs)
    assert line["status"] == 502
    assert line["upstream"] == refused_url
    assert line["user"] == "alice@example.com"


async def test_upstream_reset_before_answering_is_502(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.Event().wait()  # cancelled when the connection is gone
        raise AssertionError("unreachable")

    up = web.Application()
    up.router.add_post("/mcp", reset)
    client = await make_proxy(config(issuer, {"a": await upstreams.start(up)}, tmp_path))
    token = issuer.token(clock.wall())
    await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer(token)), 502)


async def test_upstream_silent_past_idle_timeout_is_504(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    called = asyncio.Event()
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        called.set()
        await release.wait()
        return web.json_response({})

    up = web.Application()
    up.router.add_post("/mcp", silent)
    doc = config(
        issuer, {"a": await upstreams.start(up)}, tmp_path, upstream={"idle_timeout": "200ms"}
    )
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    resp = await asyncio.wait_for(
        client.post("/mcp/apps/a", json=RPC, headers=bearer(token)), GUARD
    )
    body = await rpc_error(resp, 504)
    assert "timed out" in body["error"]["message"]
    assert called.is_set()  # the upstream was reached: this is no connect failure
    release.set()
    assert [line["reason"] for line in access_lines(logs)] == ["upstream_timeout"]


async def test_unrouted_path_is_404_and_logged_as_such(
    issuer: TestIssuer, make_proxy: ProxyFactory, tmp_path: Path, logs: LogCapture
) -> None:
    client = await make_proxy(config(issuer, {"a": "http://127.0.0.1:9/mcp"}, tmp_path))
    resp = await client.get("/mcp/apps/a/extra")
    assert resp.status == 404
    assert [line["status"] for line in access_lines(logs)] == [404]


# --------------------------------------------------------------------------------------------
# Sessions


async def test_cached_session_skips_verification(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    token = issuer.token(clock.wall())
    spare = issuer.token(clock.wall(), email="bob@example.com")
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    fetches = issuer.fetches
    # Break every way the token could be verified again: the IdP is down with other keys and
    # the token is past max_token_age (30m). (Changing the app auth config would rightly end
    # or re-verify the session: tests/process/test_reload.py.)
    issuer.remove_key("k1")
    issuer.add_key("k2")
    issuer.behaviour.down = True
    clock.advance(31 * 60)
    for _ in range(3):
        resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
        assert resp.status == 200, await resp.text()
    assert len(echo.seen) == 4
    assert issuer.fetches == fetches
    created = logs.events("session_created")
    assert [(e["app"], e["user"], e["config"]) for e in created] == [
        ("a", "alice@example.com", "test-idp")
    ]
    assert [line["session"] for line in access_lines(logs)] == ["new", "cached", "cached", "cached"]
    # The proof can fail: a token without a session is refused in the same state.
    await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer(spare)), 401)


async def test_same_token_on_two_apps_makes_two_sessions(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo_a, echo_b = Echo(), Echo()
    doc = config(
        issuer,
        {"a": await upstreams.start(echo_a.app()), "b": await upstreams.start(echo_b.app())},
        tmp_path,
    )
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    for app in ("a", "b", "a", "b"):
        resp = await client.post(f"/mcp/apps/{app}", json=RPC, headers=bearer(token))
        assert resp.status == 200, await resp.text()
    created = logs.events("session_created")
    assert sorted(e["app"] for e in created) == ["a", "b"]
    lines = access_lines(logs)
    assert [(line["app"], line["session"]) for line in lines] == [
        ("a", "new"),
        ("b", "new"),
        ("a", "cached"),
        ("b", "cached"),
    ]
    keys = await proxy_keys(client)
    assert decode_assertion(echo_a.last.headers[IDENTITY], keys)["aud"] == "a"
    assert decode_assertion(echo_b.last.headers[IDENTITY], keys)["aud"] == "b"


async def test_session_ends_with_the_token(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    now = clock.wall()
    token = issuer.token(now, exp=int(now) + 120)
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    clock.advance(100)
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    clock.advance(20 + 61)  # past exp and past the verification leeway
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    body = await rpc_error(resp, 401)
    assert body["error"]["data"]["reason"] == "expired"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert len(echo.seen) == 2
    assert [e["reason"] for e in logs.events("auth_rejected")] == ["expired"]


async def test_no_request_is_forwarded_after_the_token_expired(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """Past ``exp`` but inside the 60 s verification leeway the token still verifies, but a
    session would have no time left and the upstream an already expired assertion."""
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    now = clock.wall()
    token = issuer.token(now, exp=int(now) + 120)
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    clock.advance(130)
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
    body = await rpc_error(resp, 401)
    assert body["error"]["data"]["reason"] == "expired"
    assert len(echo.seen) == 1


async def test_max_ttl_caps_the_session(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    doc = config(
        issuer, {"a": await upstreams.start(echo.app())}, tmp_path, sessions={"max_ttl": "10m"}
    )
    doc["app_auth_configs"][0]["jwt"]["max_token_age"] = "5m"
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())  # valid for 1h
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    clock.advance(9 * 60)  # token too old to verify again, but the session still holds
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    clock.advance(2 * 60)  # past max_ttl, long before exp: verification again, now too old
    body = await rpc_error(await client.post("/mcp/apps/a", json=RPC, headers=bearer(token)), 401)
    assert body["error"]["data"]["reason"] == "too_old"
    assert len(echo.seen) == 2
    assert len(logs.events("session_created")) == 1
    assert logs.events("session_created")[0]["expires_in"] == 600


async def test_max_ttl_expiry_creates_a_new_session(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    doc = config(
        issuer, {"a": await upstreams.start(echo.app())}, tmp_path, sessions={"max_ttl": "5m"}
    )
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    for step in (0, 4 * 60, 2 * 60, 60):
        clock.advance(step)
        assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    assert [line["session"] for line in access_lines(logs)] == ["new", "cached", "new", "cached"]
    assert len(logs.events("session_created")) == 2


# --------------------------------------------------------------------------------------------
# The identity assertion


async def test_identity_assertion_claims(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    now = clock.wall()
    token = issuer.token(now)
    headers = {**bearer(token), IDENTITY: "forged", "x-proxyd-identity": "forged-too"}
    assert (await client.post("/mcp/apps/a", json=RPC, headers=headers)).status == 200
    values = echo.last.headers.getall(IDENTITY)
    assert len(values) == 1
    assert values[0] not in ("forged", "forged-too")
    keys = await proxy_keys(client)
    claims = decode_assertion(values[0], keys)
    assert claims["iss"] == PUBLIC_URL
    assert claims["aud"] == "a"
    assert claims["sub"] == claims["username"] == "alice@example.com"
    assert 0 < claims["exp"] - now <= 600
    assert claims["iat"] <= now
    assert token not in values[0]


async def test_identity_assertion_never_outlives_the_session(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    client = await make_proxy(config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path))
    now = clock.wall()
    exp = int(now) + 120
    token = issuer.token(now, exp=exp)
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    claims = decode_assertion(echo.last.headers[IDENTITY], await proxy_keys(client))
    assert now < claims["exp"] <= exp


async def test_identity_assertion_is_reused_then_reminted(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    echo = Echo()
    doc = config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path, identity={"ttl": "5m"})
    client = await make_proxy(doc)
    token = issuer.token(clock.wall())
    for _ in range(3):
        assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    first = {s.headers[IDENTITY] for s in echo.seen}
    assert len(first) == 1  # no signature per request
    clock.advance(100)  # under half of the 300 s lifetime
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    assert echo.last.headers[IDENTITY] in first
    clock.advance(60)  # 160 s: past half-life
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))).status == 200
    fresh = echo.last.headers[IDENTITY]
    assert fresh not in first
    keys = await proxy_keys(client)
    old_claims = decode_assertion(first.pop(), keys)
    new_claims = decode_assertion(fresh, keys)
    assert new_claims["exp"] - old_claims["exp"] == 160
    assert new_claims["exp"] - clock.wall() <= 300


async def test_jwks_endpoint_serves_only_public_keys(
    issuer: TestIssuer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    client = await make_proxy(config(issuer, {"a": "http://127.0.0.1:9/mcp"}, tmp_path))
    resp = await client.get("/.well-known/jwks.json")
    assert resp.status == 200
    doc = await resp.json()
    [key] = doc["keys"]
    assert key["kty"] == "EC"
    assert key["alg"] == "ES256"
    assert "d" not in key
    assert key["kid"]


# --------------------------------------------------------------------------------------------
# Access logs


async def test_one_access_line_per_request(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    url = await upstreams.start(echo.app())
    client = await make_proxy(config(issuer, {"a": url}, tmp_path))
    token = issuer.token(clock.wall())
    payload = b'{"jsonrpc":"2.0","id":7,"method":"ping"}'
    headers = {**bearer(token), "Content-Type": "application/json"}
    answers = []
    for _ in range(3):
        resp = await client.post("/mcp/apps/a", data=payload, headers=headers)
        answers.append(await resp.read())
    await client.post("/mcp/apps/a", data=payload)  # no token
    lines = access_lines(logs)
    assert len(lines) == 4
    for line, answer in zip(lines[:3], answers, strict=True):
        assert line["app"] == "a"
        assert line["user"] == "alice@example.com"
        assert line["status"] == 200
        assert line["upstream"] == url
        assert line["upstream_status"] == 200
        assert line["bytes_in"] == len(payload)
        assert line["bytes_out"] == len(answer)
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
        assert line["method"] == "POST"
        assert line["path"] == "/mcp/apps/a"
        assert line["client"] == "127.0.0.1"
    unauth = lines[3]
    assert unauth["status"] == 401
    assert unauth["reason"] == "missing_token"
    assert "user" not in unauth
    assert "upstream" not in unauth


async def test_tokens_never_reach_logs_on_failing_paths(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    refused_url: str,
    logs: LogCapture,
) -> None:
    """Tokens pass through every failing path; the autouse guard checks the logs at teardown."""
    echo = Echo()
    doc = config(
        issuer,
        {"a": await upstreams.start(echo.app()), "down": refused_url, "other": refused_url},
        tmp_path,
        server={"max_request_body": "1KiB", "max_header_size": "4KiB"},
    )
    doc["apps"][2]["labels"] = {"env": "elsewhere"}
    client = await make_proxy(doc)
    now = clock.wall()
    good = issuer.token(now)
    forged = issuer.tampered(issuer.token(now), email="root@example.com")
    MINTED.add(forged)
    statuses = []
    for path, token, extra in [
        ("/mcp/apps/a", good, {}),
        ("/mcp/apps/a", issuer.token(now, exp=int(now) - 3600, iat=int(now) - 7200), {}),
        ("/mcp/apps/a", forged, {}),
        ("/mcp/apps/a", issuer.unsigned_token(now), {}),
        ("/mcp/apps/a", issuer.token(now, iss="https://other.idp"), {}),
        ("/mcp/apps/nope", good, {}),
        ("/mcp/apps/down", good, {}),
        ("/mcp/apps/other", good, {}),
        ("/mcp/apps/a", good, {"Origin": "https://evil.example"}),
        ("/mcp/apps/a", good, {"X-Pad": "p" * 5000}),
    ]:
        resp = await client.post(path, json=RPC, headers={**bearer(token), **extra})
        statuses.append(resp.status)
    json_type = {"Content-Type": "application/json"}
    resp = await client.post("/mcp/apps/a", data=b"z" * 4096, headers={**bearer(good), **json_type})
    statuses.append(resp.status)
    resp = await client.put("/mcp/apps/a", headers=bearer(good))
    statuses.append(resp.status)
    assert statuses == [200, 401, 401, 401, 401, 404, 502, 401, 403, 431, 413, 405]
    reasons = [e["reason"] for e in logs.events("auth_rejected")]
    assert reasons == [
        "expired",
        "bad_signature",
        "alg_not_allowed",
        "wrong_issuer",
        "no_matching_config",
    ]
    assert len(access_lines(logs)) == len(statuses)


# --------------------------------------------------------------------------------------------
# RFC 9728 protected resource metadata


async def test_protected_resource_metadata(
    issuer: TestIssuer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    doc = config(issuer, {"a": "http://127.0.0.1:9/mcp", "b": "http://127.0.0.1:9/mcp"}, tmp_path)
    doc["app_auth_configs"] += [
        {
            "name": "idp-b",
            "app_labels": {"app": "b"},
            "jwt": {"issuer": "https://idp-b.test", "audience": "x", "jwks_url": issuer.url},
        },
        {
            "name": "idp-prod",
            "app_labels": {"env": "prod"},
            "jwt": {"issuer": "https://idp-prod.test", "audience": "x", "jwks_url": issuer.url},
        },
    ]
    client = await make_proxy(doc)
    for app, servers in (
        ("a", [issuer.issuer]),
        ("b", sorted([issuer.issuer, "https://idp-b.test"])),
    ):
        resp = await client.get(f"/.well-known/oauth-protected-resource/mcp/apps/{app}")
        assert resp.status == 200
        meta = await resp.json()
        assert meta["resource"] == f"{PUBLIC_URL}/mcp/apps/{app}"
        assert sorted(meta["authorization_servers"]) == servers
        assert meta["bearer_methods_supported"] == ["header"]
    await rpc_error(await client.get("/.well-known/oauth-protected-resource/mcp/apps/zzz"), 404)


async def test_resource_metadata_url_of_401_is_served(
    issuer: TestIssuer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    client = await make_proxy(config(issuer, {"a": "http://127.0.0.1:9/mcp"}, tmp_path))
    resp = await client.get("/mcp/apps/a")
    assert resp.status == 401
    challenge = resp.headers["WWW-Authenticate"]
    url = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]
    assert url.startswith(PUBLIC_URL)
    meta = await client.get(url.removeprefix(PUBLIC_URL))
    assert meta.status == 200
    assert (await meta.json())["resource"] == f"{PUBLIC_URL}/mcp/apps/a"


# --------------------------------------------------------------------------------------------
# Issue 12: RFC 8707 resource audiences, required scopes, username claims


def metadata_path(app: str) -> str:
    return f"/.well-known/oauth-protected-resource/mcp/apps/{app}"


async def test_the_advertised_resource_url_is_an_accepted_audience_for_its_app_only(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """A standards-following AS puts the resource proxyd advertises into `aud` (RFC 8707);
    one app auth config selects both apps, and app a's token never opens app b."""
    echo_a, echo_b = Echo(), Echo()
    apps = {"a": await upstreams.start(echo_a.app()), "b": await upstreams.start(echo_b.app())}
    doc = config(issuer, apps, tmp_path)
    del doc["app_auth_configs"][0]["jwt"]["audience"]  # the resource URL only
    client = await make_proxy(doc)
    resource_a = (await (await client.get(metadata_path("a"))).json())["resource"]
    resource_b = (await (await client.get(metadata_path("b"))).json())["resource"]
    assert resource_a == f"{PUBLIC_URL}/mcp/apps/a"
    token_a = issuer.token(clock.wall(), aud=resource_a)
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(token_a))).status == 200
    resp = await client.post("/mcp/apps/b", json=RPC, headers=bearer(token_a))
    body = await rpc_error(resp, 401)
    assert body["error"]["data"]["reason"] == "wrong_audience"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert echo_b.seen == []
    token_b = issuer.token(clock.wall(), aud=[resource_b, "unrelated"])
    assert (await client.post("/mcp/apps/b", json=RPC, headers=bearer(token_b))).status == 200
    # The configured audience of the test IdP is no longer accepted: none is configured.
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(issuer.token(clock.wall())))
    await rpc_error(resp, 401)


async def test_audience_list_and_resource_audience_off(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    doc = config(issuer, {"a": await upstreams.start(Echo().app())}, tmp_path)
    jwt = doc["app_auth_configs"][0]["jwt"]
    jwt["audience"], jwt["resource_audience"] = ["one", "two"], False
    client = await make_proxy(doc)
    for aud, status in (("two", 200), (["x", "one"], 200), (f"{PUBLIC_URL}/mcp/apps/a", 401)):
        token = issuer.token(clock.wall(), aud=aud)
        resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(token))
        assert resp.status == status, aud


async def test_required_scopes_metadata_401_and_403_insufficient_scope(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    echo = Echo()
    doc = config(issuer, {"a": await upstreams.start(echo.app())}, tmp_path)
    doc["app_auth_configs"][0]["jwt"]["required_scopes"] = ["mcp", "tools.read"]
    client = await make_proxy(doc)
    meta = await (await client.get(metadata_path("a"))).json()
    assert meta["scopes_supported"] == ["mcp", "tools.read"]
    resp = await client.post("/mcp/apps/a", json=RPC)
    await rpc_error(resp, 401)
    assert resp.headers["WWW-Authenticate"] == (
        f'Bearer {resource_metadata_header("a")}, scope="mcp tools.read"'
    )
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer("x.y.z"))
    assert 'scope="mcp tools.read", error="invalid_token"' in resp.headers["WWW-Authenticate"]
    short = issuer.token(clock.wall(), scope="openid mcp")
    resp = await client.post("/mcp/apps/a", json=RPC, headers=bearer(short))
    body = await rpc_error(resp, 403)
    assert body["error"]["data"]["reason"] == "insufficient_scope"
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_scope", scope="mcp tools.read", '
        f'{resource_metadata_header("a")}, error_description="token lacks a required scope"'
    )
    assert echo.seen == []
    failure = logs.events("app_auth.verify.failure")[-1]
    assert (failure["reason"], failure["config"]) == ("insufficient_scope", "test-idp")
    enough = issuer.token(clock.wall(), scp=["tools.read", "mcp"])
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(enough))).status == 200
    assert len(echo.seen) == 1


async def test_no_required_scopes_no_scope_in_metadata_or_challenge(
    issuer: TestIssuer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    client = await make_proxy(config(issuer, {"a": "http://127.0.0.1:9/mcp"}, tmp_path))
    assert "scopes_supported" not in await (await client.get(metadata_path("a"))).json()
    resp = await client.post("/mcp/apps/a", json=RPC)
    assert "scope=" not in resp.headers["WWW-Authenticate"]


async def test_machine_client_token_with_a_username_claim_list(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    """A client_credentials token: no email, no preferred_username, `sub` is the client."""
    doc = config(issuer, {"a": await upstreams.start(Echo().app())}, tmp_path)
    jwt = doc["app_auth_configs"][0]["jwt"]
    jwt["username_claim"] = ["email", "preferred_username", "sub"]
    client = await make_proxy(doc)
    machine = issuer.token(clock.wall(), email=None, sub="svc-reports", client_id="svc-reports")
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(machine))).status == 200
    person = issuer.token(clock.wall())
    assert (await client.post("/mcp/apps/a", json=RPC, headers=bearer(person))).status == 200
    verified = logs.events("app_auth.verify.success")
    assert [(e["user"], e["username_claim"]) for e in verified] == [
        ("svc-reports", "sub"),
        ("alice@example.com", "email"),
    ]
    assert [line["user"] for line in access_lines(logs)] == ["svc-reports", "alice@example.com"]
