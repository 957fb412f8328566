"""Traces (issue 14 §1): proxyd exporting OTLP/HTTP to a real receiver (tests/kit/otlp.py).

The official SDK client and server through proxyd, or raw requests where the client's trace
context is the point; the spans are decoded from the protobuf proxyd's exporter sent. Exports
are quick (OTEL_BSP_SCHEDULE_DELAY), and every wait is on the spans arriving, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from mcp import MCPError
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from proxyd.app import RUNTIME, create_app
from proxyd.auth.assertion import KeyFileError
from proxyd.config import parse_settings
from proxyd.metrics import Metrics
from proxyd.tracing import MAX_QUEUE, BoundedProcessor, CountingExporter
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.issuer import TestIssuer
from tests.kit.mcpkit import LEGACY, mcp_client, upstream_server
from tests.kit.otlp import CLIENT, SERVER, STATUS_ERROR, OtlpReceiver, ReceivedSpan, otlp_receiver
from tests.kit.proxy import Client, access_lines, bearer, config
from tests.kit.recording import RawRequest, json_answer, recording_upstream
from tests.kit.wait import GUARD, until

USER = "alice@example.com"
ROLES = [
    {
        "name": "echo-only",
        "users": [USER],
        "app_labels": {"env": "test"},
        "mcp": {"tools": ["echo"]},
        "deny": {"mcp": {"tools": ["add"]}},
    }
]
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
ANSWER = json_answer(b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}')
SECRET = "collector-api-key-7f3a9c"


@pytest.fixture(autouse=True)
def quick_export(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The SDK's standard knobs: batches leave every 50 ms, a failed export gives up after 1 s.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    yield


def traced(
    issuer: TestIssuer, url: str, tmp_path: Path, endpoint: str, **tracing: Any
) -> dict[str, Any]:
    sections: dict[str, Any] = {"roles": ROLES}
    if "server" in tracing:
        sections["server"] = tracing.pop("server")
    doc = config(issuer, {"a": url}, tmp_path, **sections)
    if endpoint:
        doc["tracing"] = {"otlp_endpoint": endpoint, **tracing}
    return doc


def servers(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.kind == SERVER]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_id == parent.span_id and s.trace_id == parent.trace_id]


def traceparent_parts(value: str) -> tuple[str, str, str, str]:
    version, trace_id, parent_id, flags = value.split("-")
    return version, trace_id, parent_id, flags


def audit_records(logs: LogCapture) -> list[dict[str, Any]]:
    return [line for line in logs.lines() if line.get("logger_name") == "proxyd.audit"]


async def post_rpc(
    proxy: Client, token: str, headers: dict[str, str] | None = None, **message: Any
) -> int:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", **message}
    resp = await proxy.post(
        "/mcp/apps/a",
        data=json.dumps(body),
        headers={**bearer(token), **JSON_HEADERS, **(headers or {})},
    )
    await resp.read()
    return resp.status


async def post_with_context(proxy: Client, token: str, where: str, fields: dict[str, str]) -> int:
    """A request carrying the client's trace context ``fields`` in its HTTP headers
    (``where == "header"``) or in its ``params._meta``."""
    if where == "header":
        return await post_rpc(proxy, token, fields)
    return await post_rpc(proxy, token, params={"_meta": fields})


async def first_servers(collector: OtlpReceiver) -> list[ReceivedSpan]:
    """The server spans, once at least one has arrived."""
    return servers(await collector.wait_for(lambda got: bool(servers(got))))


# --------------------------------------------------------------------------------------------
# An MCP session, end to end


async def test_an_mcp_session_through_proxyd_is_one_trace_per_request(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    async with otlp_receiver() as collector, upstream_server(json_response=True) as up:
        proxy = await make_proxy(traced(issuer, up.url, tmp_path, collector.url))
        token = issuer.token(clock.wall())
        async with mcp_client(str(proxy.make_url("/mcp/apps/a")), token, mode=LEGACY) as c:
            await c.list_tools()
            echoed = await c.call_tool("echo", {"text": "hi"})
            assert echoed.content[0].text == "hi"  # type: ignore[union-attr]
            with pytest.raises(MCPError):
                await c.call_tool("add", {"a": 1, "b": 2})
        lines = access_lines(logs)
        spans = await collector.wait_for(lambda got: len(servers(got)) >= len(lines))

    by_id = {line["trace_id"]: line for line in lines}
    assert len(by_id) == len(lines)  # a trace per request
    for span in servers(spans):
        a = span.attributes
        assert span.name == "POST /mcp/apps/{app}" or span.name.endswith(" /mcp/apps/{app}")
        assert span.resource["service.name"] == "proxyd"
        assert span.parent_id == "" and span.links == []  # no client context: new traces
        line = by_id[span.trace_id]  # the access line names the trace
        assert a["http.request.method"] == line["method"]
        assert a["url.path"] == "/mcp/apps/a" and a["http.route"] == "/mcp/apps/{app}"
        assert a["http.response.status_code"] == line["status"]
        assert a["client.address"] == "127.0.0.1"
        assert a["server.address"] == "127.0.0.1" and isinstance(a["server.port"], int)
        assert a["network.protocol.version"] == "1.1"
        assert a["proxyd.app"] == "a"
        assert "enduser.id" not in a  # tracing.include_user is off
    methods = {s.attributes.get("mcp.method.name"): s for s in servers(spans)}
    assert {"initialize", "tools/list", "tools/call"} <= set(methods)

    # The first request verified the token (fetching the JWKS); the others used the session.
    [verify] = [s for s in spans if s.name == "proxyd.verify_token"]
    [initialize] = [s for s in servers(spans) if s.span_id == verify.parent_id]
    assert initialize.attributes["mcp.method.name"] == "initialize"
    [fetch] = [s for s in spans if s.name == "proxyd.jwks.fetch"]
    assert fetch.parent_id == verify.span_id and fetch.kind == CLIENT
    assert fetch.attributes["url.full"] == issuer.url
    assert initialize.start_ns <= verify.start_ns <= fetch.start_ns <= fetch.end_ns
    assert verify.end_ns <= initialize.end_ns

    calls = [s for s in servers(spans) if s.attributes.get("mcp.method.name") == "tools/call"]
    allowed = [s for s in calls if s.attributes["gen_ai.tool.name"] == "echo"]
    denied = [s for s in calls if s.attributes["gen_ai.tool.name"] == "add"]
    assert [s.attributes["proxyd.decision"] for s in allowed] == ["allowed"]
    assert [s.attributes["proxyd.decision"] for s in denied] == ["denied"]
    assert children(spans, denied[0]) == []  # never forwarded: no upstream attempt
    # After initialize, every request carries the MCP session id proxyd gave the client.
    assert allowed[0].attributes["mcp.session.id"] == c.session_id
    assert initialize.attributes["mcp.session.id"] == c.session_id

    # Each forwarded request: one CLIENT span, child of its server span; the app server got
    # proxyd's traceparent naming that span, in the same trace.
    seen = [r for r in up.requests if r.method == "POST"]
    parents = [traceparent_parts(r.headers["traceparent"]) for r in seen]
    for version, trace_id, parent_id, flags in parents:
        assert version == "00" and int(flags, 16) & 1  # sampled (0x02: the trace id is random)
        [attempt] = [s for s in spans if s.span_id == parent_id]
        assert attempt.kind == CLIENT and attempt.trace_id == trace_id
        [server] = [s for s in servers(spans) if s.span_id == attempt.parent_id]
        assert server.trace_id == trace_id
        assert attempt.attributes["server.address"] == "127.0.0.1"
        assert attempt.attributes["server.port"] == up.port
        assert attempt.attributes["http.response.status_code"] in (200, 202)
    assert len({p[1] for p in parents}) == len(parents)

    # The audit record of each request names its trace.
    records = [r for r in audit_records(logs) if r["event"].startswith("mcp.session.")]
    assert records
    for record in records:
        assert record["trace_id"] in by_id
    [denied_record] = [r for r in records if r.get("name") == "add"]
    assert denied_record["trace_id"] == denied[0].trace_id


async def test_include_user_records_the_user(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        doc = traced(issuer, up.url, tmp_path, collector.url, include_user=True)
        proxy = await make_proxy(doc)
        assert await post_rpc(proxy, issuer.token(clock.wall())) == 200
        [span] = await first_servers(collector)
    assert span.attributes["enduser.id"] == USER
    assert span.attributes["proxyd.decision"] == "allowed"


async def test_a_refused_token_is_a_denied_span_with_its_reason(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        proxy = await make_proxy(traced(issuer, up.url, tmp_path, collector.url))
        token = issuer.token(clock.wall(), aud="someone-else")
        assert await post_rpc(proxy, token) == 401
        spans = await collector.wait_for(lambda got: bool(servers(got)))
    [server] = servers(spans)
    assert server.attributes["proxyd.decision"] == "denied"
    assert server.attributes["http.response.status_code"] == 401
    assert isinstance(server.attributes["proxyd.reason"], str)
    assert "error.type" not in server.attributes  # a 4xx is the client's error, not proxyd's
    [verify] = [s for s in spans if s.name == "proxyd.verify_token"]
    assert verify.parent_id == server.span_id and verify.status == STATUS_ERROR
    assert verify.attributes["error.type"] == server.attributes["proxyd.reason"]
    assert up.requests == []


async def test_failover_attempts_are_client_spans_with_the_reason(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    refused_url: str,
) -> None:
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        doc = traced(issuer, up.url, tmp_path, collector.url)
        doc["apps"][0]["servers"] = [refused_url, up.url]
        doc["upstream"] = {"max_attempts": 2}
        proxy = await make_proxy(doc)
        token = issuer.token(clock.wall())
        # Random choice: until one request met the refusing server first.
        for _ in range(40):
            assert await post_rpc(proxy, token) == 200
            if any("proxyd.failover.reason" in s.attributes for s in collector.spans):
                break
            await collector.wait_for(lambda got: len(servers(got)) >= len(up.requests))
        spans = await collector.wait_for(
            lambda got: any("proxyd.failover.reason" in s.attributes for s in got)
        )
    [failed] = [s for s in spans if "proxyd.failover.reason" in s.attributes]
    [second] = [s for s in spans if s.parent_id == failed.parent_id and s.span_id != failed.span_id]
    assert failed.kind == CLIENT == second.kind and failed.status == STATUS_ERROR
    assert failed.attributes["error.type"] == failed.attributes["proxyd.failover.reason"]
    assert failed.attributes["url.full"] == refused_url
    assert second.attributes["http.response.status_code"] == 200
    [server] = [s for s in servers(spans) if s.span_id == failed.parent_id]
    assert server.attributes["http.response.status_code"] == 200
    # The request that reached the app server carries the second attempt's context.
    parents = {traceparent_parts(r.header("traceparent")[0])[2] for r in up.requests}
    assert second.span_id in parents


# --------------------------------------------------------------------------------------------
# The client's trace context: continued only when trusted


def upstream_parent(request: RawRequest) -> tuple[str, str, str, str]:
    [value] = request.header("traceparent")
    return traceparent_parts(value)


@pytest.mark.parametrize("where", ["header", "meta"])
async def test_an_untrusted_client_context_starts_a_new_trace_with_a_link(
    where: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        proxy = await make_proxy(traced(issuer, up.url, tmp_path, collector.url))
        token = issuer.token(clock.wall())
        fields = {"traceparent": CLIENT_PARENT, "tracestate": "client=1"}
        assert await post_with_context(proxy, token, where, fields) == 200
        [server] = await first_servers(collector)
    assert server.trace_id != CLIENT_TRACE and server.parent_id == ""
    assert server.links == [(CLIENT_TRACE, CLIENT_SPAN)]
    [request] = up.requests
    _, trace_id, _, _ = upstream_parent(request)
    assert trace_id == server.trace_id  # proxyd's context went up, not the client's
    assert request.header("tracestate") == []


@pytest.mark.parametrize("where", ["header", "meta"])
@pytest.mark.parametrize("trust", ["trusted_proxies", "trust_client_context"])
async def test_a_trusted_client_context_is_continued(
    where: str,
    trust: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        if trust == "trusted_proxies":
            doc = traced(
                issuer,
                up.url,
                tmp_path,
                collector.url,
                server={"trusted_proxies": ["127.0.0.1/32"]},
            )
        else:
            doc = traced(issuer, up.url, tmp_path, collector.url, trust_client_context=True)
        proxy = await make_proxy(doc)
        token = issuer.token(clock.wall())
        fields = {"traceparent": CLIENT_PARENT, "tracestate": "client=1"}
        assert await post_with_context(proxy, token, where, fields) == 200
        # A server span ends after its children: once it is in, they are.
        spans = await collector.wait_for(lambda got: bool(servers(got)))
    [server] = servers(spans)
    assert server.trace_id == CLIENT_TRACE and server.parent_id == CLIENT_SPAN
    assert server.links == []
    [attempt] = [s for s in children(spans, server) if s.kind == CLIENT]
    [request] = up.requests
    _, trace_id, parent_id, flags = upstream_parent(request)
    assert (trace_id, parent_id) == (CLIENT_TRACE, attempt.span_id)
    assert int(flags, 16) & 1  # the client's sampling decision kept (ParentBased)
    assert request.header("tracestate") == ["client=1"]  # continued with the trace


async def test_the_header_context_comes_before_the_meta_one(
    issuer: TestIssuer, make_proxy: ProxyFactory, clock: FakeClock, tmp_path: Path
) -> None:
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        doc = traced(issuer, up.url, tmp_path, collector.url, trust_client_context=True)
        proxy = await make_proxy(doc)
        token = issuer.token(clock.wall())
        meta = {"_meta": {"traceparent": other}}
        assert await post_rpc(proxy, token, {"traceparent": CLIENT_PARENT}, params=meta) == 200
        [server] = await first_servers(collector)
    assert server.trace_id == CLIENT_TRACE and server.parent_id == CLIENT_SPAN


@pytest.mark.parametrize(
    "value",
    [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper-case hex
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        "garbage",
    ],
)
@pytest.mark.parametrize("where", ["header", "meta"])
async def test_a_malformed_traceparent_is_ignored(
    value: str,
    where: str,
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        doc = traced(issuer, up.url, tmp_path, collector.url, trust_client_context=True)
        proxy = await make_proxy(doc)
        token = issuer.token(clock.wall())
        assert await post_with_context(proxy, token, where, {"traceparent": value}) == 200
        [server] = await first_servers(collector)
    assert server.parent_id == "" and server.links == []  # no parent, no link
    assert server.trace_id != CLIENT_TRACE
    [request] = up.requests
    assert upstream_parent(request)[1] == server.trace_id


# --------------------------------------------------------------------------------------------
# Off, down, secret


async def test_tracing_off_changes_nothing(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    async with recording_upstream(ANSWER) as up:
        proxy = await make_proxy(traced(issuer, up.url, tmp_path, ""))
        assert proxy.app[RUNTIME].handler.tracer is None
        token = issuer.token(clock.wall())
        assert await post_rpc(proxy, token) == 200
        assert await post_rpc(proxy, token, {"traceparent": CLIENT_PARENT}) == 200
    first, second = up.requests
    assert first.header("traceparent") == []  # proxyd injects nothing
    assert second.header("traceparent") == [CLIENT_PARENT]  # the client's passes as before
    assert all("trace_id" not in line for line in access_lines(logs))
    assert all("trace_id" not in line for line in audit_records(logs))


async def test_a_collector_down_costs_requests_nothing_and_drops_are_counted(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    refused_url: str,
    logs: LogCapture,
) -> None:
    endpoint = refused_url.removesuffix("/mcp")
    async with recording_upstream(ANSWER) as up:
        proxy = await make_proxy(traced(issuer, up.url, tmp_path, endpoint))
        metrics = proxy.app[RUNTIME].core.metrics
        token = issuer.token(clock.wall())
        for _ in range(5):
            assert await post_rpc(proxy, token) == 200

        def dropped() -> float:
            value = metrics.registry.get_sample_value(
                "proxyd_trace_spans_dropped_total", {"reason": "export_failed"}
            )
            return value or 0.0

        # The export thread's failure is told on the loop, as a warning line.
        await until(lambda: bool(logs.events("trace_export_failed")), "an export failure")
        assert dropped() >= 1
        assert len(up.requests) == 5
        lines = access_lines(logs)
        # Closing while an export retries against the collector that is down (one more
        # request's spans, taken by the exporter: its back-off runs ~7 s, past the 5 s close
        # wait) stops the retries: the SDK's worker thread is gone when the close returns.
        # It outlived the close, and failed the next tests' thread checks.
        tracing = proxy.app[RUNTIME].resources.tracing
        assert tracing is not None
        handed = tracing.exporter.handed
        assert await post_rpc(proxy, token) == 200
        await until(lambda: tracing.exporter.handed > handed, "the exporter took the new spans")
        await proxy.close()
        assert export_threads() == []
        assert not logs.events("tracing_close_timeout")
    assert [line["status"] for line in lines] == [200] * 5
    assert all(len(line["trace_id"]) == 32 for line in lines)
    exported = metrics.registry.get_sample_value("proxyd_trace_spans_exported_total")
    assert exported == 0


async def test_collector_headers_are_sent_and_never_logged(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        doc = traced(issuer, up.url, tmp_path, collector.url, headers={"X-Api-Key": SECRET})
        proxy = await make_proxy(doc)
        settings = proxy.app[RUNTIME].settings
        assert SECRET not in repr(settings)
        assert await post_rpc(proxy, issuer.token(clock.wall())) == 200
        await collector.wait_for(lambda got: bool(servers(got)))
        metrics = proxy.app[RUNTIME].core.metrics.render().decode()
    assert collector.headers[0]["x-api-key"] == SECRET
    [enabled] = logs.events("tracing_enabled")
    assert enabled["headers"] == ["X-Api-Key"]
    assert SECRET not in logs.text()
    assert SECRET not in metrics
    assert "proxyd_trace_spans_exported_total" in metrics


# --------------------------------------------------------------------------------------------
# The exporter's lifetime and its bounded queue


def export_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "OtelBatchSpanRecordProcessor"]


async def test_closing_flushes_the_last_spans(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # never on schedule: only at close
    async with otlp_receiver() as collector, recording_upstream(ANSWER) as up:
        proxy = await make_proxy(traced(issuer, up.url, tmp_path, collector.url))
        assert await post_rpc(proxy, issuer.token(clock.wall())) == 200
        assert collector.spans == []
        await proxy.close()  # the exit stack closes the provider: a flush, then the worker
        assert len(servers(collector.spans)) == 1
    assert export_threads() == []


async def test_a_start_that_fails_half_way_closes_the_exporter(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    """The provider is opened first; a bad identity.key_file fails the start later: the
    provider's worker thread is stopped all the same."""
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    key_file.chmod(0o600)
    doc = traced(issuer, "http://127.0.0.1:1/mcp", tmp_path, "http://127.0.0.1:1")
    doc["identity"] = {"key_file": str(key_file)}
    runner = web.AppRunner(create_app(parse_settings(doc)))
    with pytest.raises(KeyFileError):
        await runner.setup()
    await runner.cleanup()
    assert export_threads() == []


class BlockedExporter(SpanExporter):
    """An exporter whose first export waits for the test: spans pile up behind it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(GUARD)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


async def test_a_full_queue_drops_new_spans_and_counts_them() -> None:
    metrics = Metrics()
    blocked = BlockedExporter()
    exporter = CountingExporter(blocked, metrics)
    processor = BoundedProcessor(exporter, metrics)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    tracer.start_span("first").end()
    await asyncio.to_thread(blocked.entered.wait, GUARD)  # the worker holds the first batch
    extra = 25
    for _ in range(MAX_QUEUE + extra):
        tracer.start_span("more").end()
    dropped = metrics.registry.get_sample_value(
        "proxyd_trace_spans_dropped_total", {"reason": "queue_full"}
    )
    # The first span is in the exporter's hands: MAX_QUEUE more wait, the rest are counted.
    assert dropped == extra
    blocked.release.set()
    await asyncio.to_thread(provider.shutdown)
    # Every span not counted as dropped was exported: the SDK's own deque never overflowed.
    assert blocked.exported == MAX_QUEUE + 1
    exported = metrics.registry.get_sample_value("proxyd_trace_spans_exported_total")
    assert exported == MAX_QUEUE + 1
