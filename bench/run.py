"""proxyd benchmark: the same requests sent directly, through nginx and through proxyd, in one run.

    python bench/run.py            # ~3 min: 3 rounds + 10,000 idle SSE streams
    python bench/run.py --quick    # ~1 min: CI smoke (1,000 idle streams)
    python bench/run.py --help

It starts bench/upstream.py, a real ``proxyd run -c <generated config>`` (app auth on with a
static_jwks issuer and a minted token whose session is created before measuring, the
unauthenticated and per-user limiters on, audit to a file on, an access line per request) and
nginx as the peer proxy (installed from Debian when missing; one worker, upstream keepalive,
no buffering). Then it alternates targets (direct, nginx, proxyd, proxyd with two app servers;
the order rotates every round) over several rounds:

- small JSON-RPC POST at each concurrency: requests/s, p50/p99 latency, CPU µs per request of
  the proxy process(es) (and of the upstream) from /proc/<pid>/stat;
- SSE: time to first event and per-event delay (receive time minus the upstream's
  CLOCK_MONOTONIC stamp);
- a 10 MiB response body: MB/s;

plus, unless --no-tracing, a proxyd exporting a trace of every request (issue 14: sample_ratio
1.0, OTLP/HTTP to bench/otlp_sink.py) measured at the same POST c=16 as the plain one: the CPU
per request with tracing on and off;

plus, unless --no-lean, "lean": bench/lean.py, an aiohttp low-level server relaying the same
POST with proxyd's own upstream client and nothing else (no auth, no logs), at every
concurrency: the floor of proxyd's stack on this machine, printed as proxyd ÷ lean CPU per
request;

plus, unless --no-tls, nginx and proxyd both terminating TLS (a self-signed certificate made
per run by bench/tlscert.py): the POST at c=16 and the 10 MiB body over https (keep-alive
connections, so the handshake is amortized), printed as a separate TLS table;

and last, once per proxy, N idle SSE GET streams (MCP 2025 GET streams on an established MCP
session) held open through ONE process: its RSS, and the p99 of a small POST at c=4 meanwhile.

The POST load generator is ``wrk`` with a Lua script when it is on PATH, else bench/loadgen.py
in a separate process (SSE, the large body and the idle streams always use loadgen.py). The
table shows proxyd ÷ direct and ÷ nginx (and the differences for delays), then the issue's
targets with PASS/MISS; all of it goes to bench/results/latest.json. Any answer other than 200
fails the run (exit 1). Every child is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import peer_nginx
import report
import tlscert
from procs import (
    HOST,
    START_DEADLINE,
    BenchError,
    Child,
    Children,
    children_cpu_seconds,
    cpu_seconds,
    descendants,
    ephemeral_ports,
    free_port,
    log,
    machine_busy_seconds,
    pin,
    raise_nofile,
    rss_bytes,
    tree_cpu_seconds,
    wait_accepting,
)

from proxyd.dev.issuer import DevIssuer

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"
NOISE_WARN = 0.3  # CPUs used by other processes during a measurement before we warn
MiB = 1024 * 1024

# One app per upstream path: proxyd forwards an app's requests to its configured server URL.
APPS = {"post": "bench-json", "sse": "bench-sse", "big": "bench-big"}
DIRECT_PATHS = {"post": "/mcp", "sse": "/sse", "big": "/big"}
TWO_SERVER_APP = "bench-json-2"
IDLE_APP = "bench-idle"

# A stateless-era (2026-07-28) tools/call: headers match the body, no Mcp-Session-Id to pin.
POST_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "ping"}},
    },
    separators=(",", ":"),
)
POST_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "echo",
}
SSE_HEADERS = {"Accept": "text/event-stream", "MCP-Protocol-Version": "2026-07-28"}
BIG_HEADERS = {"Accept": "application/octet-stream"}
# The idle streams are 2025-era GET streams: initialize (no protocol header) mints a session
# that proxyd pins and seals; every GET presents the sealed id and the negotiated version.
IDLE_INIT_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "proxyd-bench", "version": "1"},
        },
    },
    separators=(",", ":"),
)
IDLE_INIT_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
}
IDLE_HEADERS = {"Accept": "text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
IDLE_POST_CONCURRENCY = 4
TLS_CONCURRENCY = 16  # the TLS targets (nginx_tls, proxyd_tls) run the POST at this level only
IDLE_OPEN_CONCURRENCY = 64  # streams being opened at once (the accept backlogs stay short)
PORT_HEADROOM = 3000  # ephemeral ports left for everything else on the machine
# Descriptors a proxy process needs besides its streams: listeners, logs, the audit file, and
# the upstream keep-alive pool the POST runs left behind (up to ~2 x 64 connections).
FD_SPARE = 512


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    duration: int  # seconds per POST measurement (whole seconds: wrk's -d)
    concurrency: tuple[int, ...]
    warmup: float
    sse_events: int
    sse_interval_ms: int
    sse_streams: int
    sse_probes: int
    big_repeat: int
    loadgen: str  # "auto" | "wrk" | "python"
    pin: str  # "auto" | "on" | "off"
    upstream_workers: int  # 0: auto
    nginx: bool
    access_logs: bool
    idle_streams: int  # 0: skip the idle scenario
    idle_addrs: int  # 0: auto (from the ephemeral port range)
    idle_post_seconds: int
    idle_heartbeat_s: int
    proxyd_workers: int  # 0: no multi-process proxyd target
    output: Path
    tls: bool = True  # also nginx_tls and proxyd_tls: POST c=16 and the 10 MiB body over https
    tracing: bool = True  # also proxyd_traced: POST c=16 with [tracing] on, to a local sink
    lean: bool = True  # also lean (bench/lean.py): the POST at every level, the stack's floor


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() else default


def parse_args(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="proxyd vs direct vs nginx: small POST, SSE, large body and idle streams."
    )
    parser.add_argument("--quick", action="store_true", help="~1 min smoke run (CI)")
    parser.add_argument("--rounds", type=int, help="rounds of alternating targets (default 3)")
    parser.add_argument("--duration", type=int, help="seconds per POST measurement (default 2)")
    parser.add_argument(
        "--concurrency", default="1,16,64", help="POST concurrency levels (default %(default)s)"
    )
    parser.add_argument("--sse-events", type=int, help="events per SSE stream (default 50)")
    parser.add_argument("--sse-interval-ms", type=int, default=10, help="default %(default)s")
    parser.add_argument("--sse-streams", type=int, default=1, help="parallel SSE streams")
    parser.add_argument("--big-repeat", type=int, help="10 MiB GETs per round (default 5)")
    parser.add_argument(
        "--idle-streams",
        type=int,
        help="idle SSE streams held through each proxy (default $BENCH_IDLE_STREAMS or 10000; "
        "1000 with --quick; 0 skips the scenario)",
    )
    parser.add_argument(
        "--idle-addrs",
        type=int,
        default=0,
        help="loopback addresses to spread idle sockets over (default: from the ephemeral "
        "port range)",
    )
    parser.add_argument(
        "--idle-post-seconds",
        type=int,
        default=3,
        help="POST c=4 run beside the idle streams (default %(default)s)",
    )
    parser.add_argument(
        "--idle-heartbeat",
        type=int,
        default=30,
        help="seconds between SSE comments on idle streams, 0 = none (default %(default)s)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="POST load generator: wrk if on PATH (auto), or the Python client",
    )
    parser.add_argument(
        "--pin",
        nargs="?",
        const="on",
        choices=("auto", "on", "off"),
        default="auto",
        help="CPU pinning: load generator, proxy and upstream apart (auto: with >= 3 CPUs)",
    )
    parser.add_argument(
        "--upstream-workers",
        type=int,
        default=0,
        help="upstream processes sharing the port (default: one per upstream "
        "CPU when pinned, up to 4; else 1)",
    )
    parser.add_argument(
        "--no-nginx",
        action="store_true",
        help="skip the nginx peer (its columns and targets become n/a)",
    )
    parser.add_argument(
        "--quiet-logs",
        action="store_true",
        help="proxyd at log level warning and nginx access_log off "
        "(default: both write an access line per request)",
    )
    parser.add_argument(
        "--proxyd-workers",
        type=int,
        help="also measure the POST through a proxyd with server.workers = N (default: the "
        "number of CPUs when there are 2 or more; 0 skips it); against nginx's one worker "
        "it shows what the extra processes buy, not a like-for-like ratio",
    )
    parser.add_argument(
        "--no-tls",
        action="store_true",
        help="skip the TLS targets (nginx and proxyd terminating TLS: POST c=16, 10 MiB body)",
    )
    parser.add_argument(
        "--no-tracing",
        action="store_true",
        help="skip proxyd_traced (proxyd exporting every request's trace: POST c=16)",
    )
    parser.add_argument(
        "--no-lean",
        action="store_true",
        help="skip lean (bench/lean.py: aiohttp's low-level server + proxyd's upstream client, "
        "nothing else; the small POST at every concurrency)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    try:
        levels = tuple(int(c) for c in str(args.concurrency).split(",") if c.strip())
    except ValueError:
        parser.error("--concurrency: comma-separated positive integers")
    if not levels or min(levels) < 1:
        parser.error("--concurrency: comma-separated positive integers")
    idle = args.idle_streams
    if idle is None:
        idle = 1000 if quick else _env_int("BENCH_IDLE_STREAMS", 10_000)
    plan = Plan(
        rounds=args.rounds or (2 if quick else 3),
        duration=args.duration or (1 if quick else 2),
        concurrency=levels,
        warmup=0.3 if quick else 0.5,
        sse_events=args.sse_events or (20 if quick else 50),
        sse_interval_ms=args.sse_interval_ms,
        sse_streams=args.sse_streams,
        sse_probes=5 if quick else 10,
        big_repeat=args.big_repeat or (2 if quick else 5),
        loadgen=args.loadgen,
        pin=str(args.pin),
        upstream_workers=max(0, int(args.upstream_workers)),
        nginx=not args.no_nginx,
        access_logs=not args.quiet_logs,
        idle_streams=max(0, int(idle)),
        idle_addrs=max(0, int(args.idle_addrs)),
        idle_post_seconds=max(1, int(args.idle_post_seconds)),
        idle_heartbeat_s=max(0, int(args.idle_heartbeat)),
        proxyd_workers=max(0, int(args.proxyd_workers))
        if args.proxyd_workers is not None
        else (n if (n := len(os.sched_getaffinity(0))) >= 2 else 0),
        output=args.output,
        tls=not args.no_tls,
        tracing=not args.no_tracing,
        lean=not args.no_lean,
    )
    if plan.rounds < 1 or plan.duration < 1 or plan.sse_events < 1 or plan.big_repeat < 1:
        parser.error("rounds, duration, sse-events and big-repeat must be positive")
    if plan.idle_addrs > 250:
        parser.error("--idle-addrs: at most 250 (127.0.0.1 … 127.0.0.250)")
    return plan


# ---------------------------------------------------------------------------------------------
# CPU layout


@dataclass(frozen=True, slots=True)
class Layout:
    """Which CPUs the load generator, the proxy under test and the upstream(s) run on."""

    client: set[int]
    proxy: set[int]
    upstream: set[int]
    pinned: bool

    def describe(self) -> dict[str, list[int]] | None:
        if not self.pinned:
            return None
        return {
            "client": sorted(self.client),
            "proxy": sorted(self.proxy),
            "upstream": sorted(self.upstream),
        }


def cpu_layout(cpus: list[int], mode: str) -> Layout:
    every = set(cpus)
    if mode == "off" or len(cpus) < 2 or (mode == "auto" and len(cpus) < 3):
        return Layout(every, every, every, False)
    if len(cpus) >= 4:  # one CPU each for the client and the proxy, the rest for upstreams
        return Layout({cpus[0]}, {cpus[1]}, set(cpus[2:]), True)
    servers = set(cpus[1:])
    return Layout({cpus[0]}, servers, servers, True)


# ---------------------------------------------------------------------------------------------
# proxyd configuration


def toml_str(value: str) -> str:
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


@dataclass(frozen=True, slots=True)
class ProxydPorts:
    listen: int
    admin: int
    upstream: int
    second_upstream: int
    idle_servers: tuple[str, ...]  # "host:port" of the idle upstream, one per address


def proxyd_config(
    ports: ProxydPorts,
    workdir: Path,
    issuer: DevIssuer,
    plan: Plan,
    workers: int = 1,
    tls: tuple[Path, Path] | None = None,
    otlp_port: int | None = None,
) -> str:
    scheme = "https" if tls else "http"
    audit = "audit-w.jsonl" if workers > 1 else "audit.jsonl"
    if tls:
        audit = "audit-tls.jsonl"
    if otlp_port is not None:
        audit = "audit-traced.jsonl"
    lines = [
        "[server]",
        f"listen = {toml_str(f'{HOST}:{ports.listen}')}",
        f"public_url = {toml_str(f'{scheme}://{HOST}:{ports.listen}')}",
        f"state_dir = {toml_str(str(workdir / 'state'))}",
        f"workers = {workers}",
        *(
            [
                "",
                "[server.tls]",  # terminate TLS on the MCP listener, as nginx_tls does
                f"cert_file = {toml_str(str(tls[0]))}",
                f"key_file = {toml_str(str(tls[1]))}",
            ]
            if tls
            else []
        ),
        "",
        "[admin]",
        f"listen = {toml_str(f'{HOST}:{ports.admin}')}",
        "",
        "[log]",
        # info = the default: one access line per request (to a file here, as journald would
        # take it); --quiet-logs drops to warning. Audit events are written at any level.
        f"level = {toml_str('info' if plan.access_logs else 'warning')}",
        'format = "json"',
        "",
        "[limits.unauthenticated]",  # on, as in production; cached sessions never reach it
        "average = 20",
        'period = "1m"',
        "burst = 40",
        "",
        "[limits.per_user]",  # on: every request on an established session pays the check;
        "average = 1000000000",  # the ceiling is far above what the bench can send
        'period = "1s"',
        "burst = 1000000000",
        "",
        "[sessions]",
        'max_ttl = "12h"',
        "",
        "[audit]",  # on: one tools/call record per POST, to a file and to the log
        f"file = {toml_str(str(workdir / audit))}",
    ]
    if otlp_port is not None:
        # Every request traced and exported (issue 14): the worst case of tracing's cost.
        lines += [
            "",
            "[tracing]",
            f"otlp_endpoint = {toml_str(f'http://{HOST}:{otlp_port}')}",
            "sample_ratio = 1.0",
        ]
    servers = {
        app: [f"http://{HOST}:{ports.upstream}{DIRECT_PATHS[scenario]}"]
        for scenario, app in APPS.items()
    }
    # The same JSON app on two app servers (issue 3: random healthy choice, health checks on).
    servers[TWO_SERVER_APP] = [
        f"http://{HOST}:{p}{DIRECT_PATHS['post']}" for p in (ports.upstream, ports.second_upstream)
    ]
    if ports.idle_servers:
        servers[IDLE_APP] = [f"http://{s}/idle" for s in ports.idle_servers]
    for app, urls in servers.items():
        lines += [
            "",
            "[[apps]]",
            f"name = {toml_str(app)}",
            'labels = { env = "bench" }',
            f"servers = [{', '.join(toml_str(u) for u in urls)}]",
        ]
    lines += [
        "",
        "[[app_auth_configs]]",
        'name = "bench-issuer"',
        'app_labels = { env = "bench" }',
        "[app_auth_configs.jwt]",
        f"issuer = {toml_str(issuer.issuer)}",
        f"audience = {toml_str(issuer.audience)}",
        f"static_jwks = {toml_str(json.dumps(issuer.jwks()))}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Targets and load generators


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    port: int
    paths: Mapping[str, str]  # scenario → request path
    headers: Mapping[str, str]  # added to every request (credentials)
    proxy_pids: tuple[int, ...] = ()  # the proxy's processes charged per request; () = direct
    tls: bool = False  # https (the proxy terminates TLS with the run's self-signed certificate)
    traced: bool = False  # proxyd with [tracing] on

    @property
    def one_level(self) -> bool:
        """POST at TLS_CONCURRENCY only (the TLS and tracing comparisons)."""
        return self.tls or self.traced

    def job(
        self, kind: str, scenario: str, headers: Mapping[str, str], **extra: Any
    ) -> dict[str, Any]:
        return {
            "kind": kind,
            "tls": self.tls,
            "host": HOST,
            "port": self.port,
            "path": self.paths[scenario],
            "headers": {**headers, **self.headers},
            **extra,
        }


@dataclass(slots=True)
class PostRun:
    requests: int
    elapsed: float
    p50_us: float
    p99_us: float
    statuses: dict[str, int]
    errors: str = ""  # transport errors or a non-200 body, for the failure message


class PythonLoad:
    """bench/loadgen.py as a long-lived child: one JSON job in, one JSON result out."""

    name = "python"

    def __init__(self, child: Child) -> None:
        self.child = child
        assert child.proc.stdin is not None and child.proc.stdout is not None
        self._in = child.proc.stdin
        self._out = child.proc.stdout
        self.loop = "?"

    def run(self, job: Mapping[str, Any]) -> dict[str, Any]:
        self._in.write((json.dumps(job) + "\n").encode())
        self._in.flush()
        line = self._out.readline()
        if not line:
            raise BenchError(f"load generator died:\n{self.child.tail()}")
        result: dict[str, Any] = json.loads(line)
        self.loop = str(result.get("loop", "?"))
        if "error" in result:
            raise BenchError(
                f"load generator: {result['error']} (job {job['kind']} {job.get('path', '')})"
            )
        return result

    def cpu(self) -> float:
        return cpu_seconds(self.child.pid)

    def post(self, target: Target, concurrency: int, duration: float) -> PostRun:
        result = self.run(
            target.job(
                "post",
                "post",
                POST_HEADERS,
                body=POST_BODY,
                concurrency=concurrency,
                duration=duration,
            )
        )
        latency = result["latency_us"]
        return PostRun(
            requests=int(result["requests"]),
            elapsed=float(result["elapsed"]),
            p50_us=float(latency.get("p50", 0.0)),
            p99_us=float(latency.get("p99", 0.0)),
            statuses=dict(result["statuses"]),
            errors=str(result.get("body", "")),
        )


_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,"
    .. "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def lua_str(value: str) -> str:
    return json.dumps(value)  # ASCII-only JSON strings are valid Lua strings


class WrkLoad:
    """wrk (one thread) with a Lua script; its done() hook prints the numbers as one JSON line."""

    name = "wrk"

    def __init__(self, wrk: str, workdir: Path) -> None:
        self.wrk = wrk
        self.workdir = workdir
        self._cpu = 0.0
        self.version = _wrk_version(wrk)

    def cpu(self) -> float:
        return self._cpu

    def script(self, target: Target) -> Path:
        path = self.workdir / f"wrk-{target.name}.lua"
        headers = {**POST_HEADERS, **target.headers}
        path.write_text(
            _WRK_SCRIPT.format(
                body=lua_str(POST_BODY),
                headers="\n".join(
                    f"wrk.headers[{lua_str(k)}] = {lua_str(v)}" for k, v in headers.items()
                ),
            ),
            encoding="utf-8",
        )
        return path

    def post(self, target: Target, concurrency: int, duration: float) -> PostRun:
        scheme = "https" if target.tls else "http"  # wrk: keep-alive, one handshake per conn
        url = f"{scheme}://{HOST}:{target.port}{target.paths['post']}"
        argv = [
            self.wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(self.script(target)),
            url,
        ]
        before = children_cpu_seconds()
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=duration + 30, check=False
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
        self._cpu += children_cpu_seconds() - before
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
        if done.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        data = json.loads(line.split(" ", 1)[1])
        failed = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout")}
        requests = int(data["requests"])
        bad = failed["status"]
        return PostRun(
            requests=requests,
            elapsed=int(data["duration_us"]) / 1e6,
            p50_us=float(data["p50_us"]),
            p99_us=float(data["p99_us"]),
            # wrk counts answers >= 400 as status errors; the preflight checked for exactly 200.
            statuses={"200": requests - bad, **({"4xx/5xx": bad} if bad else {})},
            errors=", ".join(f"{k} errors: {v}" for k, v in failed.items() if v),
        )


def _wrk_version(wrk: str) -> str:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False, timeout=10)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].split(" Copyright")[0] if lines else "?"


LoadGen = PythonLoad | WrkLoad


def require_ok(what: str, target: Target, statuses: Mapping[str, int], detail: str) -> None:
    bad = {k: v for k, v in statuses.items() if k != "200" and v}
    if bad or not statuses:
        raise BenchError(
            f"{what} via {target.name}: expected only 200, got {dict(statuses) or 'nothing'}"
            + (f"\n  {detail[:500]}" if detail else "")
        )


# ---------------------------------------------------------------------------------------------
# Measurements (one call = one target, one round)


@contextmanager
def cpu_meter(groups: Mapping[str, Sequence[int]], load: LoadGen) -> Iterator[dict[str, float]]:
    """CPU seconds spent inside the block by each named group of pids and by the load
    generator, and ``other``: what the rest of the machine used meanwhile, in CPUs (a
    noisy-neighbour signal; it also holds kernel work charged to no process)."""
    before = {k: tree_cpu_seconds(p) for k, p in groups.items() if p}
    load_before, wall, busy = load.cpu(), time.monotonic(), machine_busy_seconds()
    spent: dict[str, float] = {}
    yield spent
    for key, pids in groups.items():
        if pids:
            spent[key] = tree_cpu_seconds(pids) - before[key]
    spent["loadgen"] = load.cpu() - load_before
    spent["wall"] = time.monotonic() - wall
    ours = sum(spent[k] for k in groups if k in spent) + spent["loadgen"]
    spent["other"] = max(0.0, machine_busy_seconds() - busy - ours) / spent["wall"]


def measure_post(
    load: LoadGen, target: Target, upstream_pids: Sequence[int], concurrency: int, duration: float
) -> dict[str, Any]:
    with cpu_meter({"proxy": target.proxy_pids, "upstream": upstream_pids}, load) as cpu:
        run = load.post(target, concurrency, duration)
    require_ok(f"POST c={concurrency}", target, run.statuses, run.errors)
    if run.errors or run.requests == 0:
        raise BenchError(f"POST c={concurrency} via {target.name}: {run.errors or 'no requests'}")
    n = run.requests
    wall = cpu["wall"]
    return {
        "requests": n,
        "elapsed_s": run.elapsed,
        "rps": n / run.elapsed,
        "p50_ms": run.p50_us / 1000,
        "p99_ms": run.p99_us / 1000,
        "proxy_cpu_s": cpu.get("proxy"),
        "upstream_cpu_s": cpu["upstream"],
        "proxy_cpu_us_per_req": cpu["proxy"] / n * 1e6 if "proxy" in cpu else None,
        "upstream_cpu_us_per_req": cpu["upstream"] / n * 1e6,
        "proxy_cpu_util": cpu["proxy"] / wall if "proxy" in cpu and wall else None,
        "upstream_cpu_util": cpu["upstream"] / wall if wall else 0.0,
        "loadgen_cpu_util": cpu["loadgen"] / wall if wall else None,
        "other_cpus_busy": cpu["other"],
    }


def sse_run(
    load: PythonLoad, target: Target, events: int, interval_ms: int, streams: int, repeat: int
) -> dict[str, Any]:
    job = target.job("sse", "sse", SSE_HEADERS, streams=streams, repeat=repeat)
    job["path"] += f"?n={events}&interval_ms={interval_ms}"
    result = load.run(job)
    require_ok("SSE", target, result["statuses"], str(result.get("body", "")))
    if len(result["delay_us"]) != events * streams * repeat:
        raise BenchError(
            f"SSE via {target.name}: {len(result['delay_us'])} events, expected "
            f"{events * streams * repeat}"
        )
    return result


def measure_sse(load: PythonLoad, target: Target, plan: Plan) -> dict[str, Any]:
    # Time to first event from short streams opened one after another (a fresh connection
    # each, as a client's GET), per-event delay from the long stream(s).
    probes = sse_run(load, target, 1, 0, 1, plan.sse_probes)
    stream = sse_run(load, target, plan.sse_events, plan.sse_interval_ms, plan.sse_streams, 1)
    return {
        "first_event_us": [int(f) for f in probes["first_event_us"]],
        "delay_us": [int(d) for d in stream["delay_us"]],
    }


def measure_big(load: PythonLoad, target: Target, plan: Plan) -> dict[str, Any]:
    with cpu_meter({"proxy": target.proxy_pids}, load) as cpu:
        result = load.run(target.job("big", "big", BIG_HEADERS, repeat=plan.big_repeat))
    require_ok("10 MiB GET", target, result["statuses"], str(result.get("body", "")))
    size = int(result["bytes"])
    if size != plan.big_repeat * report.BIG_SIZE:
        raise BenchError(f"10 MiB GET via {target.name}: got {size} bytes")
    return {"bytes": size, "elapsed_s": float(result["elapsed"]), "proxy_cpu_s": cpu.get("proxy")}


# ---------------------------------------------------------------------------------------------
# Idle streams


@dataclass(frozen=True, slots=True)
class IdlePlan:
    planned: int  # what was asked for
    streams: int  # what the descriptor limit lets one proxy process hold (normally = planned)
    addrs: tuple[str, ...]  # loopback addresses: client sources and idle upstream listeners
    ports: Mapping[str, int]  # proxy name → the idle upstream port it uses (one each, so one
    # proxy's TIME_WAIT sockets never crowd the next one's ports)
    port_range: tuple[int, int]
    nofile: tuple[int, int]
    variants: list[dict[str, str]] = field(default_factory=list)  # one header set per session

    def servers(self, proxy: str) -> tuple[str, ...]:
        return tuple(f"{a}:{self.ports[proxy]}" for a in self.addrs)


def plan_idle(plan: Plan, proxies: Sequence[str]) -> IdlePlan | None:
    n = plan.idle_streams
    if n <= 0:
        return None
    low, high = ephemeral_ports()
    span = high - low + 1
    # connect() picks a source port per (source address, destination): each destination
    # (the proxy's listener, each idle upstream port) needs n ports of the range per source
    # address. Past the range, spread the sockets over several loopback addresses.
    usable = max(1000, span - PORT_HEADROOM)
    addrs = plan.idle_addrs or math.ceil(n / usable)
    if addrs > 250:
        raise BenchError(
            f"{n} idle streams need {addrs} loopback addresses (ephemeral range "
            f"{low}-{high}); lower --idle-streams"
        )
    # A proxy holds 2 descriptors per stream (client + upstream socket) plus its own few;
    # the idle upstream and the client hold one per stream. Children inherit our limit.
    need = 2 * n + FD_SPARE
    soft, hard = raise_nofile(need)
    streams = n
    if soft < need:
        streams = max(0, (soft - FD_SPARE) // 2)
        log(
            f"WARNING: {n} idle streams need {need} open files in the proxy process but "
            f"RLIMIT_NOFILE is {soft}/{hard} and cannot be raised here (raising the hard "
            f"limit needs root with CAP_SYS_RESOURCE, or `ulimit -Hn {need}` before the run). "
            f"Holding {streams} streams instead; the {n}-stream targets read n/a."
        )
    log(
        f"idle streams: {streams} per proxy over {addrs} loopback address(es); ephemeral "
        f"ports {low}-{high} ({span} per destination); RLIMIT_NOFILE {soft}/{hard}"
    )
    if streams <= 0:
        return None
    return IdlePlan(
        planned=n,
        streams=streams,
        addrs=tuple(f"127.0.0.{i + 1}" for i in range(addrs)),
        ports={p: free_port() for p in proxies},
        port_range=(low, high),
        nofile=(soft, hard),
    )


def idle_sessions(worker: PythonLoad, target: Target, idle: IdlePlan) -> list[dict[str, str]]:
    """One MCP session pinned to each idle server address (initialize until every one is hit):
    the header sets the idle GETs use in turn."""
    found: dict[str, str] = {}
    for _attempt in range(40 * len(idle.addrs)):
        job = target.job("once", "idle", IDLE_INIT_HEADERS, method="POST", body=IDLE_INIT_BODY)
        result = worker.run(job)
        require_ok("initialize (idle app)", target, result["statuses"], str(result.get("body", "")))
        sealed = result.get("headers", {}).get("mcp-session-id")
        if not sealed:
            raise BenchError(f"initialize via {target.name}: no Mcp-Session-Id in the answer")
        server = json.loads(result["body"])["result"]["serverInfo"]["name"].split()[-1]
        found.setdefault(server, sealed)
        if len(found) == len(idle.addrs):
            break
    else:
        raise BenchError(f"initialize via {target.name}: sessions reached only {sorted(found)}")
    return [{"Mcp-Session-Id": sealed} for sealed in found.values()]


def measure_idle(
    load: LoadGen,
    holder: PythonLoad,
    target: Target,
    idle: IdlePlan,
    plan: Plan,
    variants: list[dict[str, str]],
    upstream_pids: Sequence[int],
) -> dict[str, Any]:
    n = idle.streams
    pids = target.proxy_pids
    out: dict[str, Any] = {"planned": idle.planned, "streams": n, "addresses": len(idle.addrs)}
    before = measure_post(
        load, target, upstream_pids, IDLE_POST_CONCURRENCY, plan.idle_post_seconds
    )
    out["rss_before_mib"] = rss_bytes(pids) / MiB
    job = target.job(
        "idle_open",
        "idle",
        IDLE_HEADERS,
        count=n,
        concurrency=IDLE_OPEN_CONCURRENCY,
        variants=variants,
        sources=list(idle.addrs) if len(idle.addrs) > 1 else [],
    )
    job["path"] += f"?heartbeat_s={plan.idle_heartbeat_s}"
    log(f"idle: opening {n} SSE streams through {target.name}")
    opened = holder.run(job)
    out |= {
        "opened": int(opened["opened"]),
        "open_s": float(opened["elapsed"]),
        "open_rate": int(opened["opened"]) / float(opened["elapsed"]),
        "open_p99_ms": float(opened["open_latency_us"].get("p99", 0.0)) / 1000,
        "open_statuses": opened["statuses"],
        "open_errors": opened["errors"],
    }
    with cpu_meter({"proxy": pids}, load) as held:
        time.sleep(2.0)  # the streams only sit there: what does holding them cost?
    out["hold_cpu_util"] = held["proxy"] / held["wall"]
    out["rss_mib"] = rss_bytes(pids) / MiB
    out["rss_per_stream_kib"] = (
        (out["rss_mib"] - out["rss_before_mib"]) * 1024 / out["opened"] if out["opened"] else None
    )
    during = measure_post(
        load, target, upstream_pids, IDLE_POST_CONCURRENCY, plan.idle_post_seconds
    )
    status = holder.run({"kind": "idle_status"})
    out |= {"still_open": int(status["open"]), "dropped": int(status["dropped"])}
    holder.run({"kind": "idle_close"})
    time.sleep(0.5)
    out["rss_after_close_mib"] = rss_bytes(pids) / MiB
    out |= {
        "post_before_p50_ms": before["p50_ms"],
        "post_before_p99_ms": before["p99_ms"],
        "post_before_rps": before["rps"],
        "post_during_p50_ms": during["p50_ms"],
        "post_during_p99_ms": during["p99_ms"],
        "post_during_rps": during["rps"],
        "post_during_proxy_cpu_us_per_req": during["proxy_cpu_us_per_req"],
    }
    if out["opened"] < n or out["dropped"]:
        log(
            f"WARNING: idle via {target.name}: {out['opened']}/{n} opened, "
            f"{out['dropped']} dropped; errors: {opened['errors']}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# The run


def choose_loadgen(plan: Plan) -> str | None:
    if plan.loadgen == "python":
        return None
    try:
        # wrk from Debian when missing: the Python client saturates long before proxyd does.
        return peer_nginx.ensure_debian(
            "wrk",
            ("wrk",),
            lambda: shutil.which("wrk"),
            "the load generator",
            "or run with --loadgen python",
        )
    except BenchError as exc:
        if plan.loadgen == "wrk":
            raise
        log(f"WARNING: {exc}\nthe Python client sends the POSTs: its own CPU may cap the rates")
        return None


def run(plan: Plan) -> dict[str, Any]:
    started = time.monotonic()
    wrk = choose_loadgen(plan)
    nginx = peer_nginx.ensure() if plan.nginx else None
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="proxyd-bench-") as tmp:
        workdir = Path(tmp)
        children = Children(workdir)
        try:
            return _run(plan, workdir, children, wrk, nginx, cpus, started)
        finally:
            children.stop_all()


def _start_upstreams(children: Children, port: int, workers: int) -> list[Child]:
    script = str(BENCH_DIR / "upstream.py")
    extra = ["--reuse-port"] if workers > 1 else []
    return [
        children.start(f"upstream{i or ''}", [sys.executable, script, *extra, str(port)])
        for i in range(workers)
    ]


def _run(
    plan: Plan,
    workdir: Path,
    children: Children,
    wrk: str | None,
    nginx: str | None,
    cpus: list[int],
    started: float,
) -> dict[str, Any]:
    layout = cpu_layout(cpus, plan.pin)
    workers = plan.upstream_workers or (
        min(4, len(layout.upstream)) if layout.pinned and len(cpus) >= 4 else 1
    )
    proxies = ["proxyd", *(["nginx"] if nginx else [])]
    idle = plan_idle(plan, proxies)

    upstream_port, proxyd_port, admin_port = free_port(), free_port(), free_port()
    second_port, nginx_port = free_port(), free_port()
    nginx_tls_port, proxyd_tls_port = free_port(), free_port()
    cert = tlscert.self_signed(workdir / "tls", HOST) if plan.tls else None
    issuer = DevIssuer(audience="proxyd-bench")
    config = workdir / "proxyd.toml"
    ports = ProxydPorts(
        proxyd_port, admin_port, upstream_port, second_port, idle.servers("proxyd") if idle else ()
    )
    config.write_text(proxyd_config(ports, workdir, issuer, plan), encoding="utf-8")

    upstreams = _start_upstreams(children, upstream_port, workers)
    second = children.start(
        "upstream-2", [sys.executable, str(BENCH_DIR / "upstream.py"), str(second_port)]
    )
    idle_upstream = None
    if idle:
        listen = [f"--listen={s}" for p in proxies for s in idle.servers(p)]
        idle_upstream = children.start(
            "upstream-idle", [sys.executable, str(BENCH_DIR / "upstream.py"), *listen]
        )
    proxyd = children.start("proxyd", [sys.executable, "-m", "proxyd", "run", "-c", str(config)])
    multi = None
    multi_port = free_port()
    if plan.proxyd_workers > 1:
        # The same configuration with server.workers = N: a supervisor and N processes
        # sharing one port (SO_REUSEPORT), each with its own cached session.
        multi_ports = ProxydPorts(multi_port, free_port(), upstream_port, second_port, ())
        multi_config = workdir / "proxyd-workers.toml"
        multi_config.write_text(
            proxyd_config(multi_ports, workdir, issuer, plan, plan.proxyd_workers),
            encoding="utf-8",
        )
        multi = children.start(
            "proxyd-workers", [sys.executable, "-m", "proxyd", "run", "-c", str(multi_config)]
        )
    proxyd_tls = None
    if cert is not None:
        # A third proxyd, the same configuration with [server.tls]: the plain one stays as is.
        tls_ports = ProxydPorts(proxyd_tls_port, free_port(), upstream_port, second_port, ())
        tls_config = workdir / "proxyd-tls.toml"
        tls_config.write_text(
            proxyd_config(tls_ports, workdir, issuer, plan, tls=cert), encoding="utf-8"
        )
        proxyd_tls = children.start(
            "proxyd-tls", [sys.executable, "-m", "proxyd", "run", "-c", str(tls_config)]
        )
    proxyd_traced = sink = None
    traced_port, sink_port = free_port(), free_port()
    if plan.tracing:
        # A fourth proxyd, the plain configuration plus [tracing], exporting to a local sink.
        sink = children.start(
            "otlp-sink", [sys.executable, str(BENCH_DIR / "otlp_sink.py"), str(sink_port)]
        )
        traced_ports = ProxydPorts(traced_port, free_port(), upstream_port, second_port, ())
        traced_config = workdir / "proxyd-traced.toml"
        traced_config.write_text(
            proxyd_config(traced_ports, workdir, issuer, plan, otlp_port=sink_port),
            encoding="utf-8",
        )
        proxyd_traced = children.start(
            "proxyd-traced", [sys.executable, "-m", "proxyd", "run", "-c", str(traced_config)]
        )
    lean = None
    lean_port = free_port()
    if plan.lean:
        # The floor: aiohttp's low-level server and proxyd's upstream client, nothing else.
        lean = children.start(
            "lean",
            [sys.executable, str(BENCH_DIR / "lean.py"), str(lean_port), str(upstream_port)],
        )
    nginx_child = None
    if nginx:
        conf = workdir / "nginx.conf"
        conf.write_text(
            peer_nginx.config(
                workdir,
                peer_nginx.NginxPlan(
                    port=nginx_port,
                    routes={
                        **{
                            f"/mcp/apps/{app}": f"bench{DIRECT_PATHS[s]}" for s, app in APPS.items()
                        },
                        **({f"/mcp/apps/{IDLE_APP}": "bench_idle/idle"} if idle else {}),
                    },
                    pools={
                        "bench": [f"{HOST}:{upstream_port}"],
                        **({"bench_idle": list(idle.servers("nginx"))} if idle else {}),
                    },
                    max_connections=2 * (idle.streams if idle else 0) + 1024,
                    access_log=plan.access_logs,
                    nofile_limit=idle.nofile[1] if idle else None,
                    tls=(nginx_tls_port, *cert) if cert is not None else None,
                ),
            ),
            encoding="utf-8",
        )
        nginx_child = children.start(
            "nginx", [nginx, "-p", str(workdir / "nginx"), "-c", str(conf), "-g", "daemon off;"]
        )
    deadline = time.monotonic() + START_DEADLINE
    for child in upstreams:
        wait_accepting(child, upstream_port, deadline)
    wait_accepting(second, second_port, deadline)
    if idle and idle_upstream:
        for p in proxies:
            host, port = idle.servers(p)[0].split(":")
            wait_accepting(idle_upstream, int(port), deadline, host)
    wait_accepting(proxyd, proxyd_port, deadline)
    if proxyd_tls is not None:
        wait_accepting(proxyd_tls, proxyd_tls_port, deadline)
    if proxyd_traced is not None and sink is not None:
        wait_accepting(sink, sink_port, deadline)
        wait_accepting(proxyd_traced, traced_port, deadline)
    if lean is not None:
        wait_accepting(lean, lean_port, deadline)
    multi_pids: tuple[int, ...] = ()
    if multi is not None:
        wait_accepting(multi, multi_port, deadline)
        multi_pids = _process_tree(multi, plan.proxyd_workers + 1, deadline)
    nginx_pids: tuple[int, ...] = ()
    if nginx_child is not None:
        wait_accepting(nginx_child, nginx_port, deadline)
        nginx_pids = _nginx_processes(nginx_child, deadline)

    upstream_pids = [c.pid for c in upstreams]
    if layout.pinned:
        pin(descendants(proxyd.pid), layout.proxy)
        if proxyd_tls is not None:
            pin(descendants(proxyd_tls.pid), layout.proxy)
        if proxyd_traced is not None and sink is not None:
            pin(descendants(proxyd_traced.pid), layout.proxy)  # its export thread included
            pin([sink.pid], layout.upstream)  # the collector's work is not proxyd's
        if lean is not None:
            pin([lean.pid], layout.proxy)  # where proxyd runs: the same core, the same floor
        pin(multi_pids, layout.proxy)
        pin(nginx_pids, layout.proxy)
        pin([*upstream_pids, second.pid], layout.upstream)
        if idle_upstream is not None:
            pin([idle_upstream.pid], layout.upstream)
        os.sched_setaffinity(0, layout.client)  # wrk and the Python clients inherit it
    worker = PythonLoad(
        children.start("loadgen", [sys.executable, str(BENCH_DIR / "loadgen.py")], pipes=True)
    )
    holder = None
    if idle:
        holder = PythonLoad(
            children.start(
                "loadgen-idle", [sys.executable, str(BENCH_DIR / "loadgen.py")], pipes=True
            )
        )
    load: LoadGen = WrkLoad(wrk, workdir) if wrk else worker

    token = issuer.token(ttl=3600)
    bearer = {"Authorization": f"Bearer {token}"}
    proxyd_paths = {k: f"/mcp/apps/{app}" for k, app in APPS.items()}
    proxyd_paths["idle"] = f"/mcp/apps/{IDLE_APP}"
    targets = [Target("direct", upstream_port, DIRECT_PATHS, {})]
    if nginx_pids:
        # The proxyd token goes along (same request bytes); nginx passes it through unread.
        targets.append(Target("nginx", nginx_port, proxyd_paths, bearer, nginx_pids))
    if lean is not None:
        # The same request bytes (token included, relayed unread as nginx does) to the same
        # upstream path; the POST only, at every level.
        targets.append(
            Target("lean", lean_port, {"post": DIRECT_PATHS["post"]}, bearer, (lean.pid,))
        )
    targets += [
        Target("proxyd", proxyd_port, proxyd_paths, bearer, (proxyd.pid,)),
        Target(
            "proxyd_2up",
            proxyd_port,
            {"post": f"/mcp/apps/{TWO_SERVER_APP}"},
            bearer,
            (proxyd.pid,),
        ),
    ]
    if multi_pids:
        targets.append(
            Target("proxyd_workers", multi_port, {"post": proxyd_paths["post"]}, bearer, multi_pids)
        )
    # TLS: the same POST and 10 MiB body, both proxies terminating TLS (the upstream hop stays
    # plain http, as for the other targets). POST at c=16 only.
    tls_paths = {k: proxyd_paths[k] for k in ("post", "big")}
    if nginx_pids and cert is not None:
        targets.append(Target("nginx_tls", nginx_tls_port, tls_paths, bearer, nginx_pids, True))
    if proxyd_tls is not None:
        targets.append(
            Target("proxyd_tls", proxyd_tls_port, tls_paths, bearer, (proxyd_tls.pid,), True)
        )
    if proxyd_traced is not None:
        targets.append(
            Target(
                "proxyd_traced",
                traced_port,
                {"post": proxyd_paths["post"]},
                bearer,
                (proxyd_traced.pid,),
                traced=True,
            )
        )
    # Preflight: each proxyd app's first request verifies the token and creates the session,
    # so every measured request below rides a cached session. Exactly 200 or we stop.
    for target in targets:
        for scenario, headers, method in (
            ("post", POST_HEADERS, "POST"),
            ("sse", SSE_HEADERS, "GET"),
            ("big", BIG_HEADERS, "GET"),
        ):
            if scenario not in target.paths:
                continue
            job = target.job("once", scenario, headers, method=method)
            if scenario == "post":
                job["body"] = POST_BODY
            if scenario == "sse":
                job["path"] += "?n=1&interval_ms=0"
            result = worker.run(job)
            require_ok(
                f"preflight {method} {scenario}",
                target,
                result["statuses"],
                str(result.get("body", "")),
            )
        load.post(target, max(plan.concurrency), plan.warmup)  # warm-up, not recorded
    variants: list[dict[str, str]] = []
    if idle:
        proxyd_target = next(t for t in targets if t.name == "proxyd")
        variants = idle_sessions(worker, proxyd_target, idle)  # proxyd's sealed session ids
    log(
        f"load generator: {load.name}"
        + (f" ({load.version})" if isinstance(load, WrkLoad) else f" ({worker.loop})")
        + f"; upstream workers: {workers}; pinned: {layout.describe() or 'no'}"
        + (f"; nginx {peer_nginx.version(nginx)}" if nginx else "; no nginx")
    )

    raw: report.Raw = {}

    def record(scenario: str, target: Target, result: dict[str, Any]) -> None:
        raw.setdefault(scenario, {}).setdefault(target.name, []).append(result)

    for round_no in range(plan.rounds):
        shift = round_no % len(targets)
        order = targets[shift:] + targets[:shift]  # every target takes every position in turn
        log(f"round {round_no + 1}/{plan.rounds}: {' then '.join(t.name for t in order)}")
        for c in plan.concurrency:
            for target in order:
                if target.one_level and c != TLS_CONCURRENCY:
                    continue
                record(
                    f"post_c{c}",
                    target,
                    measure_post(load, target, upstream_pids, c, plan.duration),
                )
        if TLS_CONCURRENCY not in plan.concurrency:
            for target in order:
                if target.one_level:
                    record(
                        f"post_c{TLS_CONCURRENCY}",
                        target,
                        measure_post(load, target, upstream_pids, TLS_CONCURRENCY, plan.duration),
                    )
        for target in order:
            if "sse" in target.paths:
                record("sse", target, measure_sse(worker, target, plan))
        for target in order:
            if "big" in target.paths:
                record("big", target, measure_big(worker, target, plan))
        for child in (
            *upstreams,
            second,
            proxyd,
            *([nginx_child] if nginx_child else []),
            *([multi] if multi else []),
            *([proxyd_tls] if proxyd_tls else []),
            *([proxyd_traced] if proxyd_traced else []),
            *([lean] if lean else []),
        ):
            child.check_alive()

    idle_results: dict[str, dict[str, Any]] = {}
    if idle and holder is not None:
        for target in targets:
            if target.name not in idle.ports:
                continue
            try:
                idle_results[target.name] = measure_idle(
                    load, holder, target, idle, plan, variants, upstream_pids
                )
            except BenchError as exc:  # recorded as a MISS; the rest of the run still counts
                log(f"WARNING: idle streams via {target.name} failed: {exc}")
                idle_results[target.name] = {
                    "planned": idle.planned,
                    "streams": idle.streams,
                    "opened": 0,
                    "error": str(exc)[:500],
                }
                with_holder_reset(holder)

    summary = report.summarize(raw)
    rows = report.table_rows(summary, plan.concurrency, idle_results, plan.proxyd_workers)
    checks = report.checks(summary, plan.concurrency, idle_results, plan.idle_streams)
    tls_rows = report.tls_rows(summary, TLS_CONCURRENCY) if plan.tls else []
    tracing = _tracing_cost(summary, sink_port) if proxyd_traced is not None else None
    lean_rows = report.lean_rows(summary, plan.concurrency) if lean is not None else []
    audit_lines = _count_lines(workdir / "audit.jsonl")
    if audit_lines == 0:
        raise BenchError("proxyd wrote no audit record: audit is not on, the numbers would lie")
    return {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "cpus_used": cpus,
            "loadgen": load.name,
            "loadgen_detail": load.version if isinstance(load, WrkLoad) else worker.loop,
            "nginx": peer_nginx.version(nginx) if nginx else None,
            "upstream_workers": workers,
            "pinned": layout.describe(),
            "access_logs": plan.access_logs,
            "plan": {
                "rounds": plan.rounds,
                "duration_s": plan.duration,
                "concurrency": list(plan.concurrency),
                "sse_events": plan.sse_events,
                "sse_interval_ms": plan.sse_interval_ms,
                "sse_streams": plan.sse_streams,
                "sse_first_event_probes": plan.sse_probes,
                "big_repeat": plan.big_repeat,
                "idle_streams": plan.idle_streams,
                "idle_addresses": list(idle.addrs) if idle else [],
                "idle_heartbeat_s": plan.idle_heartbeat_s,
                "ephemeral_ports": list(idle.port_range) if idle else None,
                "rlimit_nofile": list(idle.nofile) if idle else None,
                "proxyd_workers": plan.proxyd_workers,
                "tls": plan.tls,
                "tls_concurrency": TLS_CONCURRENCY if plan.tls else None,
                "lean": plan.lean,
            },
            "proxyd_log_lines": _count_lines(proxyd.log),
            "proxyd_audit_lines": audit_lines,
            "nginx_access_lines": _count_lines(workdir / "nginx" / "access.log"),
            "seconds": round(time.monotonic() - started, 1),
        },
        "summary": summary,
        "idle": idle_results,
        "table": [r.as_json() for r in rows],
        "targets": [c.as_json() for c in checks],
        # nginx_tls / proxyd_tls (their raw numbers are in summary and rounds too)
        "tls": [r.as_json() for r in tls_rows],
        "tracing": tracing,
        # lean (bench/lean.py) per POST level: its CPU µs/req and proxyd ÷ lean; None with
        # --no-lean (its raw numbers are in summary and rounds too)
        "lean": lean_rows or None,
        "rounds": raw,
        "_rendered": report.render(rows)
        + ("\n\n" + report.render_tls(tls_rows) if tls_rows else "")
        + ("\n\n" + _render_tracing(tracing) if tracing else "")
        + ("\n\n" + report.render_lean(lean_rows) if lean_rows else "")
        + "\n\n"
        + report.render_checks(checks),
    }


def _tracing_cost(summary: dict[str, dict[str, Any]], sink_port: int) -> dict[str, Any]:
    """proxyd's CPU per POST at c=16 with every request traced and exported, and without."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{sink_port}/count", timeout=5) as answer:
        received = json.loads(answer.read())
    if not received["requests"]:
        raise BenchError("proxyd_traced exported no span: tracing is not on, the numbers would lie")
    post = summary.get(f"post_c{TLS_CONCURRENCY}", {})
    off = post.get("proxyd", {}).get("proxy_cpu_us_per_req")
    on = post.get("proxyd_traced", {}).get("proxy_cpu_us_per_req")
    return {
        "concurrency": TLS_CONCURRENCY,
        "cpu_us_per_req_off": off,
        "cpu_us_per_req_on": on,
        "cpu_us_per_req_added": None if off is None or on is None else on - off,
        "rps_off": post.get("proxyd", {}).get("rps"),
        "rps_on": post.get("proxyd_traced", {}).get("rps"),
        "exports_received": received["requests"],
        "export_bytes": received["bytes"],
    }


def _render_tracing(t: dict[str, Any]) -> str:
    def num(value: float | None, fmt: str = "{:.0f}") -> str:
        return "-" if value is None else fmt.format(value)

    return (
        f"tracing (sample 1.0, OTLP/HTTP to a local sink), POST c={t['concurrency']}: "
        f"proxyd CPU µs/req off {num(t['cpu_us_per_req_off'])}, "
        f"on {num(t['cpu_us_per_req_on'])} ({num(t['cpu_us_per_req_added'], '{:+.0f}')}); "
        f"requests/s off {num(t['rps_off'])}, on {num(t['rps_on'])}; "
        f"{t['exports_received']} exports received"
    )


def with_holder_reset(holder: PythonLoad) -> None:
    try:
        holder.run({"kind": "idle_close"})
    except BenchError as exc:
        log(f"idle holder: {exc}")


def _process_tree(child: Child, count: int, deadline: float) -> tuple[int, ...]:
    """A supervised proxyd: the supervisor and its workers, once all ``count`` exist."""
    while time.monotonic() < deadline:
        child.check_alive()
        pids = descendants(child.pid)
        if len(pids) >= count:
            return tuple(pids)
        time.sleep(0.05)  # polling /proc: nothing signals a new process to us
    raise BenchError(f"{child.name}: expected {count} processes")


def _nginx_processes(child: Child, deadline: float) -> tuple[int, ...]:
    """The master and its worker (the master forks it right after binding)."""
    while True:
        pids = descendants(child.pid)
        if len(pids) >= 2:
            return tuple(pids)
        if time.monotonic() > deadline:
            raise BenchError(f"nginx started no worker:\n{child.tail()}")
        time.sleep(0.05)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def _sigterm(signum: int, _: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every child


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        results = run(plan)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    rendered = results.pop("_rendered")
    print(rendered)
    meta = results["meta"]
    print(
        f"\nloadgen={meta['loadgen']} ({meta['loadgen_detail']}), nginx={meta['nginx']}, "
        f"rounds={plan.rounds}, {plan.duration}s per POST run, {meta['seconds']}s total; "
        f"upstream workers {meta['upstream_workers']}, pinned {meta['pinned'] or 'no'}"
    )
    print(
        f"logs: proxyd {meta['proxyd_log_lines']} lines, audit {meta['proxyd_audit_lines']} "
        f"records, nginx access {meta['nginx_access_lines']} lines "
        f"({'access lines on' if plan.access_logs else '--quiet-logs'})"
    )
    posts = [v for k, by in results["summary"].items() if k.startswith("post") for v in by.values()]
    busiest_client = max(p["loadgen_cpu_util"] for p in posts)
    noise = max(p["other_cpus_busy"] for p in posts)
    print(f"load generator peak {busiest_client:.2f} CPU; other processes up to {noise:.2f} CPU")
    if busiest_client > 0.9:
        print("WARNING: the load generator was saturated; requests/s understate the servers")
    for scenario, by in results["summary"].items():
        if scenario.startswith("post"):
            for name, s in by.items():
                if s["upstream_cpu_util"] > 0.9 * meta["upstream_workers"]:
                    print(
                        f"WARNING: {scenario} via {name}: the upstream was saturated "
                        f"({s['upstream_cpu_util']:.2f} CPU): its requests/s are the "
                        "upstream's, not the proxy's"
                    )
    if noise > NOISE_WARN:
        print(
            "WARNING: other processes were busy during the run; rates are unreliable "
            "(CPU per request is the steadier number)"
        )
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    plan.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {plan.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
