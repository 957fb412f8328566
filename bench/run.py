"""proxyd benchmark: the same requests sent directly to an upstream and through proxyd, in one run.

    python bench/run.py            # ~45 s: 3 rounds
    python bench/run.py --quick    # ~15 s: CI smoke
    python bench/run.py --help

It starts bench/upstream.py and a real ``proxyd run -c <generated config>`` (app auth on, a
static_jwks issuer, a minted token whose session is created before measuring), then alternates
targets (direct, proxyd; the order flips every round) over several rounds:

- small JSON-RPC POST at each concurrency: requests/s, p50/p99 latency, CPU µs per request of
  the proxyd process (and of the upstream) from /proc/<pid>/stat;
- SSE: time to first event and per-event delay (receive time minus the upstream's
  CLOCK_MONOTONIC stamp);
- a 10 MiB response body: MB/s.

The load generator is ``wrk`` with a Lua script when it is on PATH, else bench/loadgen.py in a
separate process (SSE and the large body always use loadgen.py). The table shows proxyd ÷ direct
(and proxyd - direct for delays); the same goes to bench/results/latest.json. Any answer other
than 200, direct or through proxyd, fails the run (exit 1). Every child is stopped on exit.

Targets are data (``Target``) so a peer proxy (nginx) slots in as a third column later.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from proxyd.dev import DevIssuer

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_DEADLINE = 20.0  # seconds for a child to accept connections
NOISE_WARN = 0.3  # CPUs used by other processes during a measurement before we warn

# One app per upstream path: proxyd forwards an app's requests to its configured server URL.
APPS = {"post": "bench-json", "sse": "bench-sse", "big": "bench-big"}
DIRECT_PATHS = {"post": "/mcp", "sse": "/sse", "big": "/big"}
TWO_SERVER_APP = "bench-json-2"

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


class BenchError(Exception):
    """The benchmark cannot produce honest numbers; the message says why."""


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
    pin: bool
    output: Path


def parse_args(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="proxyd vs direct: small POST, SSE and large body, in one run."
    )
    parser.add_argument("--quick", action="store_true", help="~15 s smoke run (CI)")
    parser.add_argument("--rounds", type=int, help="rounds of alternating targets (default 3)")
    parser.add_argument("--duration", type=int, help="seconds per POST measurement (default 2)")
    parser.add_argument(
        "--concurrency", default="1,16", help="POST concurrency levels (default %(default)s)"
    )
    parser.add_argument("--sse-events", type=int, help="events per SSE stream (default 50)")
    parser.add_argument("--sse-interval-ms", type=int, default=10, help="default %(default)s")
    parser.add_argument("--sse-streams", type=int, default=1, help="parallel SSE streams")
    parser.add_argument("--big-repeat", type=int, help="10 MiB GETs per round (default 5)")
    parser.add_argument(
        "--loadgen", choices=("auto", "wrk", "python"), default="auto",
        help="POST load generator: wrk if on PATH (auto), or the Python client",
    )
    parser.add_argument(
        "--pin", action="store_true",
        help="pin the load generator and the servers to separate CPUs",
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
        pin=bool(args.pin),
        output=args.output,
    )
    if plan.rounds < 1 or plan.duration < 1 or plan.sse_events < 1 or plan.big_repeat < 1:
        parser.error("rounds, duration, sse-events and big-repeat must be positive")
    return plan


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3, utime 14 and stime 15 (proc(5)), so index 11, 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy (user, nice, system, irq, softirq), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pin(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """Every process the benchmark starts; ``stop_all`` terminates and waits for each."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[Child] = []

    def start(self, name: str, argv: list[str], *, pipes: bool = False) -> Child:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=out,
                cwd=self.workdir,
            )
        child = Child(name, proc, log)
        self.items.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.items):
            proc = child.proc
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.poll() is None:
                proc.terminate()
        for child in reversed(self.items):
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdout is not None:
                child.proc.stdout.close()


def wait_accepting(child: Child, port: int, deadline: float) -> None:
    """Poll until ``port`` accepts a TCP connection, the child dies, or the deadline passes."""
    while True:
        if child.proc.poll() is not None:
            raise BenchError(
                f"{child.name} exited with {child.proc.returncode} before accepting "
                f"connections:\n{child.tail()}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name} did not accept on {HOST}:{port}:\n{child.tail()}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# proxyd configuration


def toml_str(value: str) -> str:
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


def proxyd_config(port: int, admin_port: int, upstream_port: int, state_dir: Path,
                  issuer: DevIssuer, second_upstream_port: int) -> str:
    lines = [
        "[server]",
        f"listen = {toml_str(f'{HOST}:{port}')}",
        f"public_url = {toml_str(f'http://{HOST}:{port}')}",
        f"state_dir = {toml_str(str(state_dir))}",
        "",
        "[admin]",
        f"listen = {toml_str(f'{HOST}:{admin_port}')}",
        "",
        "[log]",
        'level = "warning"',  # one access line per request would dominate the profile
        'format = "json"',
        "",
        "[limits.unauthenticated]",  # on, as in production; cached sessions never reach it
        "average = 20",
        'period = "1m"',
        "burst = 40",
        "",
        "[sessions]",
        'max_ttl = "12h"',
    ]
    for scenario, app in APPS.items():
        server = f"http://{HOST}:{upstream_port}{DIRECT_PATHS[scenario]}"
        lines += [
            "",
            "[[apps]]",
            f"name = {toml_str(app)}",
            'labels = { env = "bench" }',
            f"servers = [{toml_str(server)}]",
        ]
    # The same JSON app on two app servers (issue 3: random healthy choice, health checks on).
    ports = (upstream_port, second_upstream_port)
    both = [f"http://{HOST}:{p}{DIRECT_PATHS['post']}" for p in ports]
    lines += [
        "",
        "[[apps]]",
        f"name = {toml_str(TWO_SERVER_APP)}",
        'labels = { env = "bench" }',
        f"servers = [{', '.join(toml_str(u) for u in both)}]",
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
    proxy_pid: int | None  # the proxy process charged per request; None when direct

    def job(
        self, kind: str, scenario: str, headers: Mapping[str, str], **extra: Any
    ) -> dict[str, Any]:
        return {
            "kind": kind,
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
            raise BenchError(f"load generator: {result['error']} (job {job['kind']} {job['path']})")
        return result

    def cpu(self) -> float:
        return cpu_seconds(self.child.proc.pid)

    def post(self, target: Target, concurrency: int, duration: float) -> PostRun:
        result = self.run(
            target.job("post", "post", POST_HEADERS, body=POST_BODY,
                       concurrency=concurrency, duration=duration)
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
    """wrk with a Lua script; its done() hook prints the numbers as one JSON line."""

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
        url = f"http://{HOST}:{target.port}{target.paths['post']}"
        argv = [self.wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
                "--timeout", "10s", "-s", str(self.script(target)), url]
        before = children_cpu_seconds()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30,
                                  check=False)
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
def cpu_meter(pids: Mapping[str, int | None], load: LoadGen) -> Iterator[dict[str, float]]:
    """CPU seconds spent inside the block by each named pid and by the load generator, and
    ``other``: what the rest of the machine used meanwhile, in CPUs (a noisy-neighbour signal;
    it also holds kernel work charged to no process)."""
    before = {k: cpu_seconds(p) for k, p in pids.items() if p is not None}
    load_before, wall, busy = load.cpu(), time.monotonic(), machine_busy_seconds()
    spent: dict[str, float] = {}
    yield spent
    for key, pid in pids.items():
        if pid is not None:
            spent[key] = cpu_seconds(pid) - before[key]
    spent["loadgen"] = load.cpu() - load_before
    spent["wall"] = time.monotonic() - wall
    ours = sum(spent[k] for k in pids if k in spent) + spent["loadgen"]
    spent["other"] = max(0.0, machine_busy_seconds() - busy - ours) / spent["wall"]


def measure_post(load: LoadGen, target: Target, upstream_pid: int, concurrency: int,
                 duration: float) -> dict[str, Any]:
    with cpu_meter({"proxy": target.proxy_pid, "upstream": upstream_pid}, load) as cpu:
        run = load.post(target, concurrency, duration)
    require_ok(f"POST c={concurrency}", target, run.statuses, run.errors)
    if run.errors or run.requests == 0:
        raise BenchError(f"POST c={concurrency} via {target.name}: {run.errors or 'no requests'}")
    n = run.requests
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
        "loadgen_cpu_util": cpu["loadgen"] / cpu["wall"] if cpu["wall"] else None,
        "other_cpus_busy": cpu["other"],
    }


def sse_run(load: PythonLoad, target: Target, events: int, interval_ms: int, streams: int,
            repeat: int) -> dict[str, Any]:
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
    with cpu_meter({"proxy": target.proxy_pid}, load) as cpu:
        result = load.run(target.job("big", "big", BIG_HEADERS, repeat=plan.big_repeat))
    require_ok("10 MiB GET", target, result["statuses"], str(result.get("body", "")))
    size = int(result["bytes"])
    if size != plan.big_repeat * 10 * 1024 * 1024:
        raise BenchError(f"10 MiB GET via {target.name}: got {size} bytes")
    return {"bytes": size, "elapsed_s": float(result["elapsed"]), "proxy_cpu_s": cpu.get("proxy")}


# ---------------------------------------------------------------------------------------------
# Aggregation and the table


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per scenario and target: medians over rounds (rates, percentiles), sums for CPU."""
    out: dict[str, dict[str, Any]] = {}
    for scenario, by_target in raw.items():
        out[scenario] = {}
        for target, rounds in by_target.items():
            if scenario.startswith("post"):
                n = sum(r["requests"] for r in rounds)
                proxy = [r["proxy_cpu_s"] for r in rounds if r["proxy_cpu_s"] is not None]
                out[scenario][target] = {
                    "rps": statistics.median(r["rps"] for r in rounds),
                    "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
                    "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
                    "proxy_cpu_us_per_req": sum(proxy) / n * 1e6 if proxy else None,
                    "upstream_cpu_us_per_req": sum(r["upstream_cpu_s"] for r in rounds) / n * 1e6,
                    "loadgen_cpu_util": max(r["loadgen_cpu_util"] or 0.0 for r in rounds),
                    "other_cpus_busy": max(r["other_cpus_busy"] for r in rounds),
                    "requests": n,
                }
            elif scenario == "sse":
                firsts = [f / 1000 for r in rounds for f in r["first_event_us"]]
                delays = [d / 1000 for r in rounds for d in r["delay_us"]]
                out[scenario][target] = {
                    "first_event_ms": statistics.median(firsts),
                    "delay_mean_ms": statistics.fmean(delays),
                    "delay_p50_ms": pct(delays, 0.50),
                    "delay_p99_ms": pct(delays, 0.99),
                    "events": len(delays),
                }
            else:
                size = sum(r["bytes"] for r in rounds)
                secs = sum(r["elapsed_s"] for r in rounds)
                proxy = [r["proxy_cpu_s"] for r in rounds if r["proxy_cpu_s"] is not None]
                out[scenario][target] = {
                    "mb_per_s": size / secs / 1e6,
                    "proxy_cpu_ms_per_10mib": (
                        sum(proxy) / (size / (10 * 1024 * 1024)) * 1000 if proxy else None
                    ),
                }
    return out


@dataclass(slots=True)
class Row:
    label: str
    direct: float | None
    proxyd: float | None
    diff: bool = False  # also show proxyd - direct (delays)
    fmt: str = "{:.3f}"

    def ratio(self) -> float | None:
        if self.direct is None or self.proxyd is None or self.direct == 0:
            return None
        return self.proxyd / self.direct

    def delta(self) -> float | None:
        if not self.diff or self.direct is None or self.proxyd is None:
            return None
        return self.proxyd - self.direct


def table_rows(summary: dict[str, dict[str, Any]], plan: Plan) -> list[Row]:
    rows: list[Row] = []
    for c in plan.concurrency:
        s = summary[f"post_c{c}"]
        d, p = s["direct"], s["proxyd"]
        rows += [
            Row(f"POST c={c}  requests/s", d["rps"], p["rps"], fmt="{:.0f}"),
            Row(f"POST c={c}  p50 ms", d["p50_ms"], p["p50_ms"], diff=True),
            Row(f"POST c={c}  p99 ms", d["p99_ms"], p["p99_ms"], diff=True),
            # Direct has no proxy: its column shows the upstream's own CPU, so the ratio reads
            # "proxyd costs N x a bare aiohttp server per request".
            Row(f"POST c={c}  CPU µs/req (direct: upstream)", d["upstream_cpu_us_per_req"],
                p["proxy_cpu_us_per_req"], fmt="{:.0f}"),
        ]
        two = s.get("proxyd_2up")
        if two is not None:
            # The same POST to an app with two servers (random healthy pick, limiter on).
            rows += [
                Row(f"POST c={c}  2 servers requests/s", d["rps"], two["rps"], fmt="{:.0f}"),
                Row(f"POST c={c}  2 servers p99 ms", d["p99_ms"], two["p99_ms"], diff=True),
                Row(f"POST c={c}  2 servers CPU µs/req", d["upstream_cpu_us_per_req"],
                    two["proxy_cpu_us_per_req"], fmt="{:.0f}"),
            ]
    s = summary["sse"]
    d, p = s["direct"], s["proxyd"]
    rows += [
        Row("SSE first event ms", d["first_event_ms"], p["first_event_ms"], diff=True),
        Row("SSE per-event delay mean ms", d["delay_mean_ms"], p["delay_mean_ms"], diff=True),
        Row("SSE per-event delay p99 ms", d["delay_p99_ms"], p["delay_p99_ms"], diff=True),
    ]
    s = summary["big"]
    rows.append(Row("10 MiB body MB/s", s["direct"]["mb_per_s"], s["proxyd"]["mb_per_s"],
                    fmt="{:.0f}"))
    return rows


def render(rows: Sequence[Row]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else fmt.format(value)

    width = max(len(r.label) for r in rows)
    head = f"{'':<{width}}  {'direct':>10}  {'proxyd':>10}  {'÷ direct':>9}  {'- direct':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.ratio()
        delta = r.delta()
        lines.append(
            f"{r.label:<{width}}  {cell(r.direct, r.fmt):>10}  {cell(r.proxyd, r.fmt):>10}  "
            f"{cell(ratio, '{:.2f}'):>9}  {cell(delta, '{:+.3f}'):>9}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


def log(message: str, stream: TextIO = sys.stderr) -> None:
    print(f"[bench] {message}", file=stream, flush=True)


def choose_loadgen(plan: Plan) -> str | None:
    wrk = shutil.which("wrk")
    if plan.loadgen == "wrk" and wrk is None:
        raise BenchError("--loadgen wrk: wrk is not on PATH (apt-get install wrk)")
    return wrk if plan.loadgen in ("auto", "wrk") else None


def run(plan: Plan) -> dict[str, Any]:
    started = time.monotonic()
    wrk = choose_loadgen(plan)
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="proxyd-bench-") as tmp:
        workdir = Path(tmp)
        children = Children(workdir)
        try:
            return _run(plan, workdir, children, wrk, cpus, started)
        finally:
            children.stop_all()


def _run(plan: Plan, workdir: Path, children: Children, wrk: str | None, cpus: list[int],
         started: float) -> dict[str, Any]:
    upstream_port, proxyd_port, admin_port = free_port(), free_port(), free_port()
    second_port = free_port()
    issuer = DevIssuer(audience="proxyd-bench")
    config = workdir / "proxyd.toml"
    config.write_text(
        proxyd_config(proxyd_port, admin_port, upstream_port, workdir / "state", issuer,
                      second_port),
        encoding="utf-8",
    )
    upstream = children.start(
        "upstream", [sys.executable, str(BENCH_DIR / "upstream.py"), str(upstream_port)]
    )
    second = children.start(
        "upstream2", [sys.executable, str(BENCH_DIR / "upstream.py"), str(second_port)]
    )
    proxyd = children.start("proxyd", [sys.executable, "-m", "proxyd", "run", "-c", str(config)])
    deadline = time.monotonic() + START_DEADLINE
    wait_accepting(upstream, upstream_port, deadline)
    wait_accepting(second, second_port, deadline)
    wait_accepting(proxyd, proxyd_port, deadline)

    client_cpus, server_cpus = set(cpus), set(cpus)
    if plan.pin and len(cpus) >= 2:
        client_cpus, server_cpus = {cpus[0]}, set(cpus[1:])
        pin(upstream.proc.pid, server_cpus)
        pin(second.proc.pid, server_cpus)
        pin(proxyd.proc.pid, server_cpus)
        os.sched_setaffinity(0, client_cpus)  # the load generator inherits it
    worker = PythonLoad(
        children.start("loadgen", [sys.executable, str(BENCH_DIR / "loadgen.py")], pipes=True)
    )
    load: LoadGen = WrkLoad(wrk, workdir) if wrk else worker

    token = issuer.token(ttl=3600)
    targets = [
        Target("direct", upstream_port, DIRECT_PATHS, {}, None),
        Target(
            "proxyd",
            proxyd_port,
            {k: f"/mcp/apps/{app}" for k, app in APPS.items()},
            {"Authorization": f"Bearer {token}"},
            proxyd.proc.pid,
        ),
        Target(
            "proxyd_2up",
            proxyd_port,
            {"post": f"/mcp/apps/{TWO_SERVER_APP}"},
            {"Authorization": f"Bearer {token}"},
            proxyd.proc.pid,
        ),
    ]
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
            require_ok(f"preflight {method} {scenario}", target, result["statuses"],
                       str(result.get("body", "")))
        load.post(target, max(plan.concurrency), plan.warmup)  # warm-up, not recorded
    log(f"load generator: {load.name}" + (f" ({load.version})" if isinstance(load, WrkLoad)
                                         else f" ({worker.loop})"))

    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def record(scenario: str, target: Target, result: dict[str, Any]) -> None:
        raw.setdefault(scenario, {}).setdefault(target.name, []).append(result)

    for round_no in range(plan.rounds):
        order = targets if round_no % 2 == 0 else targets[::-1]
        log(f"round {round_no + 1}/{plan.rounds}: {' then '.join(t.name for t in order)}")
        for c in plan.concurrency:
            for target in order:
                post = measure_post(load, target, upstream.proc.pid, c, plan.duration)
                record(f"post_c{c}", target, post)
        for target in order:
            if "sse" in target.paths:
                record("sse", target, measure_sse(worker, target, plan))
        for target in order:
            if "big" in target.paths:
                record("big", target, measure_big(worker, target, plan))

    summary = summarize(raw)
    rows = table_rows(summary, plan)
    return {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "loadgen": load.name,
            "loadgen_detail": load.version if isinstance(load, WrkLoad) else worker.loop,
            "pinned": {"client": sorted(client_cpus), "servers": sorted(server_cpus)}
            if plan.pin else None,
            "plan": {
                "rounds": plan.rounds, "duration_s": plan.duration,
                "concurrency": list(plan.concurrency), "sse_events": plan.sse_events,
                "sse_interval_ms": plan.sse_interval_ms, "sse_streams": plan.sse_streams,
                "sse_first_event_probes": plan.sse_probes,
                "big_repeat": plan.big_repeat,
            },
            "proxyd_log_lines": _count_lines(proxyd.log),
            "seconds": round(time.monotonic() - started, 1),
        },
        "summary": summary,
        "table": [
            {"metric": r.label, "direct": r.direct, "proxyd": r.proxyd,
             "proxyd_div_direct": r.ratio(), "proxyd_minus_direct": r.delta()}
            for r in rows
        ],
        "rounds": raw,
        "_rendered": render(rows),
    }


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
        f"\nloadgen={meta['loadgen']} ({meta['loadgen_detail']}), rounds={plan.rounds}, "
        f"{plan.duration}s per POST run, {meta['seconds']}s total; "
        f"proxyd wrote {meta['proxyd_log_lines']} log lines at level warning"
    )
    posts = [v for k, by in results["summary"].items() if k.startswith("post") for v in by.values()]
    busiest_client = max(p["loadgen_cpu_util"] for p in posts)
    noise = max(p["other_cpus_busy"] for p in posts)
    print(f"load generator peak {busiest_client:.2f} CPU; other processes up to {noise:.2f} CPU")
    if busiest_client > 0.9:
        print("WARNING: the load generator was saturated; requests/s understate the servers")
    if noise > NOISE_WARN:
        print("WARNING: other processes were busy during the run; rates are unreliable "
              "(CPU per request is the steadier number)")
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    plan.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {plan.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
