"""The dashboard and the alert rules that ship with proxyd (issue 14 §2), checked.

- etc/prometheus/proxyd-alerts.yml passes `promtool check rules`, and its unit tests
  (proxyd-alerts.test.yml) pass `promtool test rules`; every alert has a `for:`, a severity and
  a summary and description naming the instance; every alert is unit-tested.
- etc/grafana/proxyd.json imports with any Prometheus data source: a `datasource` variable
  used by every panel and query, no data source UID written in, unique ids, a grid that fits;
  every expression is valid PromQL (promtool checks it as a recording rule).
- Every metric the dashboard and the rules name, with every label they select or group by,
  is in the /metrics of a REAL proxyd (supervisor and 2 workers, TLS, Redis, roles) after
  traffic: no panel or alert on a metric that does not exist.
- A REAL Prometheus scraping that proxyd answers every panel's query with series, evaluates
  every rule without error, and holds pending exactly the alerts true there.

promtool and prometheus come with Debian's `prometheus` package (.ci/run installs it). Without
them these tests skip locally and fail when ``CI`` is set (tests/kit/prometheus.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kit.daemon import (
    Daemon,
    Launch,
    Scrape,
    launching,
    open_stream,
    proxyd_config,
    scrape,
    start_upstream,
    write_config,
)
from tests.kit.echo import Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.prometheus import PrometheusServer
from tests.kit.prometheus import promtool as kit_promtool
from tests.kit.proxy import bearer
from tests.kit.redisserver import RedisServer
from tests.kit.tlscerts import TestCA
from tests.kit.wait import until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "etc/grafana/proxyd.json"
RULES = ROOT / "etc/prometheus/proxyd-alerts.yml"
RULE_TESTS = ROOT / "etc/prometheus/proxyd-alerts.test.yml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = {"warning", "critical"}
# Series Prometheus itself makes for each target (not in proxyd's /metrics).
SYNTHETIC = {"up"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# The metrics with an `app` label: the dashboard's selectors on them follow the $app choice.
APP_METRICS = {
    "proxyd_requests_total",
    "proxyd_request_duration_seconds_bucket",
    "proxyd_open_streams",
    "proxyd_upstream_healthy",
}

# What each panel shows, by the metrics it reads: a panel added, removed or pointed at another
# metric changes this list in the same commit (the scrape test then proves the names exist).
PANELS: dict[str, set[str]] = {
    "Requests / s": {"proxyd_requests_total"},
    "5xx share": {"proxyd_requests_total"},
    "Apps without a healthy server": {"proxyd_upstream_healthy"},
    "Open streams": {"proxyd_open_streams"},
    "Workers ready": {"proxyd_workers"},
    "Certificate expires in": {"proxyd_tls_certificate_expiry_seconds"},
    "Requests by app and status": {"proxyd_requests_total"},
    "Errors by app and status": {"proxyd_requests_total"},
    "5xx share by app": {"proxyd_requests_total"},
    "Request duration percentiles": {"proxyd_request_duration_seconds_bucket"},
    "p99 duration by app": {"proxyd_request_duration_seconds_bucket"},
    "Open streams and connections": {"proxyd_open_streams", "proxyd_open_connections"},
    "Connections refused and closed": {
        "proxyd_connections_refused_total",
        "proxyd_connections_closed_total",
    },
    "Sessions created and tokens rejected": {"proxyd_auth_total"},
    "Limiter refusals": {"proxyd_rate_limited_total"},
    "JWKS fetch failures": {"proxyd_jwks_fetch_errors_total"},
    "JWKS age": {"proxyd_jwks_age_seconds"},
    "Upstream health per server": {"proxyd_upstream_healthy"},
    "Servers not taking work by state": {"proxyd_upstream_healthy"},
    "Workers by state": {"proxyd_workers"},
    "Worker restarts": {"proxyd_worker_restarts_total"},
    "Redis state backend up": {"proxyd_state_backend_up"},
    "State backend errors and fallbacks": {
        "proxyd_state_backend_errors_total",
        "proxyd_state_backend_fallbacks_total",
    },
    "TLS certificate expiry": {"proxyd_tls_certificate_expiry_seconds"},
    "Trace spans exported and dropped": {
        "proxyd_trace_spans_exported_total",
        "proxyd_trace_spans_dropped_total",
    },
    "Tool calls by tool and decision": {"proxyd_mcp_tool_calls_total"},
    "Errors by app and reason": {"proxyd_request_errors_total"},
    "Added latency percentiles": {"proxyd_added_latency_seconds_bucket"},
    "p99 added latency by app": {"proxyd_added_latency_seconds_bucket"},
}

ALERTS: dict[str, set[str]] = {
    "ProxydDown": {"up"},
    "ProxydNoHealthyServer": {"proxyd_upstream_healthy"},
    "ProxydHighErrorRatio": {"proxyd_requests_total"},
    "ProxydJWKSFetchFailing": {"proxyd_jwks_fetch_errors_total"},
    "ProxydWorkerRestartLoop": {"proxyd_worker_restarts_total"},
    "ProxydStateBackendDown": {"proxyd_state_backend_up"},
    "ProxydCertificateExpiringSoon": {"proxyd_tls_certificate_expiry_seconds"},
    "ProxydCertificateExpiring": {"proxyd_tls_certificate_expiry_seconds"},
}


# --------------------------------------------------------------------------------------------
# PromQL: the metric names and labels an expression uses

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on"}
_KEYWORDS |= {"ignoring", "group_left", "group_right", "atan2"}


@dataclass
class PromQL:
    """The metric names an expression reads, the labels it matches per metric, the labels
    it groups by (``by``, ``on``, ...)."""

    metrics: set[str] = field(default_factory=set)
    matched: dict[str, set[str]] = field(default_factory=dict)
    grouped: set[str] = field(default_factory=set)


def blank_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def promql(expr: str) -> PromQL:
    out = PromQL()
    text = blank_strings(expr)
    for name, matchers in _SELECTOR.findall(text):
        out.matched.setdefault(name, set()).update(_MATCHER_LABEL.findall(matchers))
    for labels in _GROUPING.findall(text):
        out.grouped.update(label.strip() for label in labels.split(",") if label.strip())
    # What is left once label matchers, ranges and grouping clauses are gone: functions
    # (an identifier before "("), keywords, and the metric names.
    bare = _GROUPING.sub(" ", _RANGE.sub(" ", re.sub(r"\{[^{}]*\}", " ", text)))
    for name, call in _IDENTIFIER.findall(bare):
        if not call and name not in _KEYWORDS:
            out.metrics.add(name)
    assert set(out.matched) <= out.metrics, (expr, out)
    return out


def test_the_promql_reader_finds_names_labels_and_groupings() -> None:
    q = promql(
        'histogram_quantile(0.99, sum by (app, le) (rate(x_bucket{app=~"a|b", le!="+Inf"}'
        '[$__rate_interval]))) / on (app) group_left () y_total{s="{not_a_metric}"} '
        "and count(max without (worker) (z) == bool 0) or vector(0) - time() > 14 * 86400"
    )
    assert q.metrics == {"x_bucket", "y_total", "z"}
    assert q.matched == {"x_bucket": {"app", "le"}, "y_total": {"s"}}
    assert q.grouped == {"app", "le", "worker"}


# --------------------------------------------------------------------------------------------
# The files


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_expressions(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Each panel's queries by title (rows have none)."""
    return {
        p["title"]: [t["expr"] for t in p.get("targets", [])]
        for p in panels(doc)
        if p["type"] != "row"
    }


@dataclass
class Rule:
    alert: str
    fields: dict[str, str]


def alert_rules() -> list[Rule]:
    """The rules of proxyd-alerts.yml, read for the keys this test checks (no YAML library in
    the test extras): each ``- alert:`` item, its keys and those of ``labels`` and
    ``annotations``, with block scalars (``|`` kept, ``>-`` folded). promtool parses the file
    for real in test_the_rules_pass_promtool; the rule counts are compared there."""
    rules: list[Rule] = []
    key: str | None = None
    key_indent = 0
    block: list[str] = []
    folded = False

    def close() -> None:
        nonlocal key, block
        if key is not None and block:
            rules[-1].fields[key] = (" " if folded else "\n").join(block).strip()
        key, block = None, []

    for raw in RULES.read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        indent = len(line) - len(line.lstrip())
        if key is not None and indent > key_indent:
            block.append(line.strip())
            continue
        close()
        if m := re.fullmatch(r"\s*- alert: (\w+)", line):
            rules.append(Rule(m.group(1), {}))
            continue
        m = re.fullmatch(r"\s*([a-z_]+):\s*(.*)", line)
        if not rules or m is None:
            continue
        name, value = m.groups()
        if value in ("|", "|-", ">", ">-"):
            key, key_indent, folded = name, indent, value.startswith(">")
        elif value:
            rules[-1].fields[name] = value.strip().strip('"')
    close()
    return rules


def promtool(*args: str) -> str:
    return kit_promtool(*args, cwd=ROOT)


# --------------------------------------------------------------------------------------------
# The alert rules


def test_the_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    found = re.search(r"SUCCESS: (\d+) rules found", checked)
    assert found is not None, checked
    assert int(found.group(1)) == len(alert_rules()) == len(ALERTS)
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in tested and "FAILED" not in tested, tested


def test_every_alert_waits_has_a_severity_says_where_and_is_unit_tested() -> None:
    rules = alert_rules()
    assert [r.alert for r in rules] == list(ALERTS)
    tests = RULE_TESTS.read_text()
    for rule in rules:
        f = rule.fields
        assert re.fullmatch(r"\d+[smh]", f.get("for", "")), rule
        assert f.get("severity") in SEVERITIES, rule
        for annotation in ("summary", "description"):
            assert "{{ $labels.instance }}" in f.get(annotation, ""), (rule.alert, annotation)
        assert promql(f["expr"]).metrics == ALERTS[rule.alert], rule
        # Each alert has a unit test in which it fires (an exp_alerts list that is not []).
        fires = re.search(
            rf"alertname: {rule.alert}\n\s+exp_alerts:\n\s+- exp_labels:", tests, re.MULTILINE
        )
        assert fires is not None, f"{rule.alert} never fires in {RULE_TESTS.name}"


# --------------------------------------------------------------------------------------------
# The dashboard


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def variable_query(variable: dict[str, Any]) -> tuple[str, str]:
    """The selector and the label of a ``label_values(SELECTOR, LABEL)`` variable."""
    found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
    assert found is not None and variable["query"]["query"] == variable["definition"], variable
    selector, label = found.groups()
    return selector.split("{", 1)[0], label


def test_the_dashboard_imports_with_any_prometheus_data_source() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    assert "__inputs" not in doc  # no DS_PROMETHEUS input to fill in at import
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # Listed from series every proxyd has from its start, idle or not (every configured app
    # has its servers' health): a new instance or app is offered before its first request.
    for name, source in (
        ("instance", "proxyd_open_connections"),
        ("app", "proxyd_upstream_healthy"),
    ):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert variable_query(variables[name]) == (source, name), variables[name]
    # No data source is named by UID anywhere: every reference is the variable.
    for path, node in walk(doc):
        if path.endswith(".datasource"):
            assert node == DATASOURCE, path
    ids: list[int] = []
    cells: set[tuple[int, int]] = set()
    for panel in panels(doc):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert {type(grid[k]) for k in ("h", "w", "x", "y")} == {int}, panel["title"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel.get("description"), panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for t in targets:
            assert t["datasource"] == DATASOURCE, panel["title"]
            # Every selector follows the instance and (where the metric has it) app choice.
            for name, matchers in _SELECTOR.findall(t["expr"]):
                assert 'instance=~"$instance"' in matchers, (panel["title"], t["expr"])
                if name in APP_METRICS:
                    assert 'app=~"$app"' in matchers, (panel["title"], t["expr"])
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    titles = [p["title"] for p in panels(doc) if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles are not unique"


def test_each_panel_reads_the_metrics_it_is_listed_with() -> None:
    found = {
        title: set().union(*(promql(e).metrics for e in exprs))
        for title, exprs in dashboard_expressions(dashboard()).items()
    }
    assert found == PANELS


def test_every_dashboard_query_is_valid_promql() -> None:
    # promtool parses rule files offline: each query (Grafana's variables given values) as a
    # recording rule.
    values = {"$__rate_interval": "1m", "$instance": ".*", "$app": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    n = 0
    for exprs in dashboard_expressions(dashboard()).values():
        for expr in exprs:
            for name, value in values.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            n += 1
            lines += [f"      - record: dashboard:query{n}", f"        expr: {json.dumps(expr)}"]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "dashboard.yml"
        path.write_text("\n".join(lines) + "\n")
        out = promtool("check", "rules", str(path))
    assert f"SUCCESS: {n} rules found" in out, out


# --------------------------------------------------------------------------------------------
# A real proxyd: every name used is in its /metrics, every query answers in a real Prometheus

MCP_KEY = base64.b64encode(bytes(range(32))).decode()
BURST = 10
ROLES = [
    {
        "name": "echo-only",
        "users": ["alice@example.com"],
        "app_labels": {"env": "test"},
        "mcp": {"tools": ["echo"]},
    }
]


@pytest.fixture
async def launch(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Launch]:
    """A supervised `proxyd run` (server.workers = 2), ready at `supervisor_started`."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    async with launching("supervisor_started", before_kill=kill_workers) as start:
        yield start


def worker_pids(daemon: Daemon) -> dict[int, int]:
    return {line["worker"]: line["pid"] for line in daemon.find("worker_spawned")}


def kill_workers(daemon: Daemon) -> None:
    for pid in worker_pids(daemon).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="proxyd-obs-"))  # short: a unix socket lives here
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def call(
    http: aiohttp.ClientSession, url: str, token: str | None, method: str, **params: Any
) -> tuple[int, dict[str, Any]]:
    message = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
    async with http.post(url, json=message, headers=bearer(token) if token else {}) as resp:
        body = await resp.json(content_type=None)
        assert isinstance(body, dict)
        return resp.status, body


async def observed_proxyd(
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    refused_url: str,
    redis: RedisServer,
    tmp_path: Path,
) -> Daemon:
    """A supervisor and 2 workers with everything the dashboard shows configured (TLS, Redis,
    roles, an app whose server is down, an issuer whose JWKS is down), after traffic: a worker
    restarted, requests answered 200, 401, 429 and 503, a tool call allowed and one denied, a
    stream relayed, then Redis gone (the workers fall back without it)."""
    upstream, url = await start_upstream(upstreams)
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("proxyd")
    idp2_jwks = refused_url.removesuffix("/mcp") + "/jwks.json"
    doc = proxyd_config(
        issuer,
        tmp_path,
        {"a": [url], "down": [refused_url]},
        server={
            "workers": 2,
            "shutdown_grace": "5s",
            "tls": {"cert_file": str(cert), "key_file": str(key)},
        },
        limits={"unauthenticated": {"average": 1, "period": "1h", "burst": BURST}},
        state={"backend": "redis", "url": redis.url},
        sessions={"mcp_keys": [MCP_KEY]},
        roles=ROLES,
    )
    doc["apps"][1]["health_check"] = {"interval": "100ms", "unhealthy_threshold": 1}
    doc["app_auth_configs"].append(
        {
            "name": "idp2",
            "app_labels": {"env": "test"},
            "jwt": {"issuer": "https://idp2.test", "audience": "x", "jwks_url": idp2_jwks},
        }
    )
    proxyd = await launch(write_config(tmp_path / "proxyd.toml", doc))
    a = f"https://127.0.0.1:{proxyd.port}/mcp/apps/a"
    token = issuer.token(time.time())
    # A new connection per request: the kernel spreads them over both workers.
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, aiohttp.ClientSession() as adm:
        # A worker dies and is replaced: the supervisor counts the restart. First: the
        # replacement starts with no samples of its own (a stream's gauge, ...).
        victim = worker_pids(proxyd)[0]
        since = proxyd.mark()
        os.kill(victim, signal.SIGKILL)
        await proxyd.wait_for("worker_replaced", since, worker=0)

        async def restart_counted() -> bool:
            m = await scrape(adm, proxyd)
            return m.value("proxyd_worker_restarts_total", worker="0") == 1

        await until(restart_counted, "worker 0's restart in the supervisor's /metrics")

        for _ in range(6):
            assert (await call(http, a, token, "ping"))[0] == 200
        # Under the role: an allowed tool call goes up, a denied one is answered by proxyd.
        assert (await call(http, a, token, "tools/call", name="echo", arguments={}))[0] == 200
        status, body = await call(http, a, token, "tools/call", name="drop_tables", arguments={})
        assert (status, body["error"]["code"]) == (200, -32602), body
        # Rejected tokens: a bad signature (401) and an issuer whose JWKS is down (503).
        bad = issuer.tampered(issuer.token(time.time(), jti="x"), sub="mallory")
        assert (await call(http, a, bad, "ping"))[0] == 401
        idp2 = issuer.token(time.time(), iss="https://idp2.test", aud="x")
        assert (await call(http, a, idp2, "ping"))[0] == 503
        # A stream relayed (the open-streams gauge), then ended.
        stream = await open_stream(http, a, token, upstream)
        await stream.relay("one")

        async def streams(n: float) -> bool:
            m = await scrape(adm, proxyd)
            gauges = m.labelled("proxyd_open_streams")
            return sum(m.value("proxyd_open_streams", **s) for s in gauges) == n

        await until(lambda: streams(1), "one stream open")
        assert await stream.finish() == b""
        await until(lambda: streams(0), "no stream open")
        # Requests without a token from one address until the limiter refuses (429).
        statuses = [(await call(http, a, None, "ping"))[0] for _ in range(BURST + 3)]
        assert 429 in statuses and set(statuses) == {401, 429}, statuses

        # Redis goes away: a worker that needs it says so (state_backend_up 0, errors,
        # fallbacks); a new token on each try makes the limiter ask Redis.
        redis.stop()

        async def backend_down() -> bool:
            await call(http, a, issuer.token(time.time(), jti=uuid.uuid4().hex), "ping")
            m = await scrape(adm, proxyd)
            return any(
                m.value("proxyd_state_backend_up", **s) == 0
                for s in m.labelled("proxyd_state_backend_up")
            ) and bool(m.labelled("proxyd_state_backend_fallbacks_total"))

        await until(backend_down, "a worker running without Redis")

        # Both workers' metrics are in the supervisor's scrape.
        async def all_scraped() -> bool:
            m = await scrape(adm, proxyd)
            ok = m.labelled("proxyd_worker_scrape_ok")
            return [m.value("proxyd_worker_scrape_ok", **s) for s in ok] == [1.0, 1.0]

        await until(all_scraped, "both workers' metrics in the supervisor's scrape")
    return proxyd


def labels_of(m: Scrape) -> dict[str, set[str]]:
    """Every sample name of a scrape and the label names its samples carry."""
    out: dict[str, set[str]] = {}
    for name, labels in m.samples:
        out.setdefault(name, set()).update(k for k, _ in labels)
    return out


def every_use() -> dict[str, PromQL]:
    uses: dict[str, PromQL] = {}
    for title, exprs in dashboard_expressions(dashboard()).items():
        for i, expr in enumerate(exprs):
            uses[f"panel {title!r} query {i}"] = promql(expr)
    for rule in alert_rules():
        uses[f"alert {rule.alert}"] = promql(rule.fields["expr"])
    return uses


async def test_every_metric_and_label_the_dashboard_and_the_alerts_use_is_in_a_real_scrape(
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    refused_url: str,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    proxyd = await observed_proxyd(issuer, launch, upstreams, refused_url, redis, tmp_path)
    async with aiohttp.ClientSession() as http:
        m = await scrape(http, proxyd)
    exposed = labels_of(m)
    uses = every_use()
    assert len(uses) == sum(map(len, dashboard_expressions(dashboard()).values())) + len(ALERTS)
    for where, q in uses.items():
        missing = q.metrics - set(exposed) - SYNTHETIC
        assert not missing, f"{where} reads {missing}, not in proxyd's /metrics"
        if q.metrics <= SYNTHETIC:
            continue
        for name, labels in q.matched.items():
            have = exposed[name] | TARGET_LABELS
            assert labels <= have, f"{where}: {name} has no label {labels - have}"
        available = set().union(*(exposed[n] for n in q.metrics)) | TARGET_LABELS
        assert q.grouped <= available, f"{where} groups by {q.grouped - available}"
    # The TLS, Redis and worker series are there because this proxyd has them configured (a
    # single-process proxyd without TLS or Redis lacks them: those panels are empty there).
    assert {s["listener"] for s in m.labelled("proxyd_tls_certificate_expiry_seconds")} == {"mcp"}
    assert {s["worker"] for s in m.labelled("proxyd_worker_restarts_total")} == {"0", "1"}
    assert {s["backend"] for s in m.labelled("proxyd_state_backend_up")} == {"redis"}


async def test_a_real_prometheus_answers_every_dashboard_query_and_evaluates_every_rule(
    issuer: TestIssuer,
    launch: Launch,
    upstreams: Upstreams,
    refused_url: str,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    proxyd = await observed_proxyd(issuer, launch, upstreams, refused_url, redis, tmp_path)
    target = f"127.0.0.1:{proxyd.admin}"
    directory = Path(tempfile.mkdtemp(prefix="proxyd-prom-"))
    prometheus = PrometheusServer(directory, [target], [RULES])
    values = {"$__rate_interval": "10s", "$instance": ".*", "$app": ".*"}
    try:
        async with aiohttp.ClientSession() as http:
            await prometheus.start(http)
            # Every panel query returns series (rates once two scrapes are in their window).
            for title, exprs in dashboard_expressions(dashboard()).items():
                for expr in exprs:
                    for name, value in values.items():
                        expr = expr.replace(name, value)

                    async def answers(q: str = expr) -> bool:
                        return bool(await prometheus.query(http, q))

                    await until(answers, f"panel {title!r}: {expr}", every=0.2)
            # The variables' queries list this instance and every configured app.
            variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
            for name, listed in (("instance", {target}), ("app", {"a", "down"})):
                selector = variables[name]["definition"].removeprefix("label_values(")
                selector = selector.rsplit(",", 1)[0].replace("$instance", ".*")
                found_values = await prometheus.api(
                    http, f"label/{name}/values", **{"match[]": selector}
                )
                assert set(found_values) == listed, (name, found_values)

            # Every rule evaluates without error; those true here are pending (for: > 0).
            async def rules_ok() -> bool:
                data = await prometheus.api(http, "rules")
                rules = [r for g in data["groups"] for r in g["rules"]]
                assert [r["name"] for r in rules] == list(ALERTS)
                assert all(r.get("lastError", "") == "" for r in rules), rules
                return all(r["health"] == "ok" for r in rules)

            await until(rules_ok, "every rule evaluated", every=0.2)

            found: set[tuple[str, str | None, str]] = set()
            # App "down" has no server up, Redis is gone, and the test CA's certificates are
            # valid for a day (under 3 days and under 14).
            expected = {
                ("ProxydNoHealthyServer", "down", "pending"),
                ("ProxydStateBackendDown", None, "pending"),
                ("ProxydCertificateExpiring", None, "pending"),
                ("ProxydCertificateExpiringSoon", None, "pending"),
            }

            async def pending() -> bool:
                data = await prometheus.api(http, "alerts")
                found.clear()
                found.update(
                    (a["labels"]["alertname"], a["labels"].get("app"), a["state"])
                    for a in data["alerts"]
                )
                return found == expected

            with contextlib.suppress(AssertionError):
                await until(pending, "the alerts true here pending", every=0.2)
            assert found == expected
            up = await prometheus.query(http, 'up{job="proxyd"}')
            assert [(s["metric"]["instance"], s["value"][1]) for s in up] == [(target, "1")]
    finally:
        prometheus.stop()
        shutil.rmtree(directory, ignore_errors=True)
