"""Aggregation of the raw rounds, the table of ratios and the PASS/MISS targets (issues 6, 15)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024
BIG_SIZE = 10 * MiB
PEERS = ("direct", "nginx", "proxyd")  # the table's value columns

Raw = dict[str, dict[str, list[dict[str, Any]]]]  # scenario → target → one dict per round


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _per_req(rounds: list[dict[str, Any]], key: str, n: int) -> float | None:
    spent = [r[key] for r in rounds if r.get(key) is not None]
    return sum(spent) / n * 1e6 if spent and n else None


def summarize(raw: Raw) -> dict[str, dict[str, Any]]:
    """Per scenario and target: medians over rounds (rates, percentiles), sums for CPU."""
    out: dict[str, dict[str, Any]] = {}
    for scenario, by_target in raw.items():
        out[scenario] = {}
        for target, rounds in by_target.items():
            if scenario.startswith("post"):
                n = sum(r["requests"] for r in rounds)
                out[scenario][target] = {
                    "rps": statistics.median(r["rps"] for r in rounds),
                    "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
                    "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
                    "proxy_cpu_us_per_req": _per_req(rounds, "proxy_cpu_s", n),
                    "upstream_cpu_us_per_req": _per_req(rounds, "upstream_cpu_s", n),
                    "upstream_cpu_util": max(r["upstream_cpu_util"] for r in rounds),
                    "proxy_cpu_util": max(r["proxy_cpu_util"] or 0.0 for r in rounds),
                    "loadgen_cpu_util": max(r["loadgen_cpu_util"] or 0.0 for r in rounds),
                    "other_cpus_busy": max(r["other_cpus_busy"] for r in rounds),
                    "requests": n,
                }
            elif scenario == "sse":
                firsts = [f / 1000 for r in rounds for f in r["first_event_us"]]
                delays = [d / 1000 for r in rounds for d in r["delay_us"]]
                out[scenario][target] = {
                    "first_event_ms": statistics.median(firsts),
                    "first_event_p90_ms": pct(firsts, 0.90),
                    "delay_mean_ms": statistics.fmean(delays),
                    "delay_p50_ms": pct(delays, 0.50),
                    "delay_p99_ms": pct(delays, 0.99),
                    "events": len(delays),
                    "first_event_probes": len(firsts),
                }
            else:
                size = sum(r["bytes"] for r in rounds)
                secs = sum(r["elapsed_s"] for r in rounds)
                proxy = [r["proxy_cpu_s"] for r in rounds if r["proxy_cpu_s"] is not None]
                out[scenario][target] = {
                    # the median round, as for requests/s; the pooled rate is in the JSON too
                    "mb_per_s": statistics.median(
                        r["bytes"] / r["elapsed_s"] / 1e6 for r in rounds
                    ),
                    "mb_per_s_pooled": size / secs / 1e6,
                    "proxy_cpu_ms_per_10mib": (
                        sum(proxy) / (size / BIG_SIZE) * 1000 if proxy else None
                    ),
                }
    return out


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(slots=True)
class Row:
    label: str
    values: dict[str, float | None]  # "direct" / "nginx" / "proxyd" → value
    diff: bool = False  # also show proxyd - direct and proxyd - nginx (delays)
    fmt: str = "{:.3f}"

    def ratio(self, to: str) -> float | None:
        base, value = self.values.get(to), self.values.get("proxyd")
        if base is None or value is None or base == 0:
            return None
        return value / base

    def delta(self, to: str) -> float | None:
        base, value = self.values.get(to), self.values.get("proxyd")
        if not self.diff or base is None or value is None:
            return None
        return value - base

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.label,
            **{peer: self.values.get(peer) for peer in PEERS},
            "proxyd_div_direct": self.ratio("direct"),
            "proxyd_div_nginx": self.ratio("nginx"),
            "proxyd_minus_direct": self.delta("direct"),
            "proxyd_minus_nginx": self.delta("nginx"),
        }


def _get(summary: Mapping[str, Any], target: str, key: str) -> float | None:
    entry = summary.get(target)
    if entry is None:
        return None
    value = entry.get(key)
    return None if value is None else float(value)


def table_rows(
    summary: dict[str, dict[str, Any]],
    concurrency: Sequence[int],
    idle: Mapping[str, dict[str, Any]],
    workers: int = 0,
) -> list[Row]:
    rows: list[Row] = []

    def row(
        label: str,
        scenario: Mapping[str, Any],
        key: str,
        *,
        proxyd: str = "proxyd",
        direct_key: str | None = None,
        nginx_key: str | None = None,
        diff: bool = False,
        fmt: str = "{:.3f}",
    ) -> Row:
        return Row(
            label,
            {
                "direct": _get(scenario, "direct", direct_key or key),
                "nginx": _get(scenario, "nginx", nginx_key or key),
                "proxyd": _get(scenario, proxyd, key),
            },
            diff=diff,
            fmt=fmt,
        )

    for c in concurrency:
        s = summary[f"post_c{c}"]
        rows += [
            row(f"POST c={c}  requests/s", s, "rps", fmt="{:.0f}"),
            row(f"POST c={c}  p50 ms", s, "p50_ms", diff=True),
            row(f"POST c={c}  p99 ms", s, "p99_ms", diff=True),
            # Direct has no proxy: its column shows the upstream's own CPU, so ÷ direct reads
            # "proxyd costs N x a bare aiohttp server per request".
            row(
                f"POST c={c}  CPU µs/req (direct: upstream)",
                s,
                "proxy_cpu_us_per_req",
                direct_key="upstream_cpu_us_per_req",
                fmt="{:.0f}",
            ),
        ]
        if "lean" in s:
            # bench/lean.py, the floor of proxyd's stack, in the proxyd column: ÷nginx reads
            # "the stack alone costs N x nginx" (proxyd ÷ lean is printed below the table).
            rows += [
                row(f"POST c={c}  lean requests/s", s, "rps", proxyd="lean", fmt="{:.0f}"),
                row(f"POST c={c}  lean p99 ms", s, "p99_ms", proxyd="lean", diff=True),
                row(
                    f"POST c={c}  lean CPU µs/req",
                    s,
                    "proxy_cpu_us_per_req",
                    proxyd="lean",
                    direct_key="upstream_cpu_us_per_req",
                    fmt="{:.0f}",
                ),
            ]
        if "proxyd_2up" in s:
            # The same POST to an app with two servers (random healthy pick).
            rows += [
                row(
                    f"POST c={c}  proxyd 2 servers requests/s",
                    s,
                    "rps",
                    proxyd="proxyd_2up",
                    fmt="{:.0f}",
                ),
                row(
                    f"POST c={c}  proxyd 2 servers CPU µs/req",
                    s,
                    "proxy_cpu_us_per_req",
                    proxyd="proxyd_2up",
                    direct_key="upstream_cpu_us_per_req",
                    fmt="{:.0f}",
                ),
            ]
        if "proxyd_workers" in s:
            # server.workers = N (all processes' CPU counted) against nginx's single worker.
            rows += [
                row(
                    f"POST c={c}  proxyd {workers} workers requests/s",
                    s,
                    "rps",
                    proxyd="proxyd_workers",
                    fmt="{:.0f}",
                ),
                row(
                    f"POST c={c}  proxyd {workers} workers CPU µs/req",
                    s,
                    "proxy_cpu_us_per_req",
                    proxyd="proxyd_workers",
                    direct_key="upstream_cpu_us_per_req",
                    fmt="{:.0f}",
                ),
            ]
    s = summary["sse"]
    rows += [
        row("SSE first event ms (median)", s, "first_event_ms", diff=True),
        row("SSE per-event delay mean ms", s, "delay_mean_ms", diff=True),
        row("SSE per-event delay p50 ms", s, "delay_p50_ms", diff=True),
        row("SSE per-event delay p99 ms", s, "delay_p99_ms", diff=True),
    ]
    s = summary["big"]
    rows += [
        row("10 MiB body MB/s", s, "mb_per_s", fmt="{:.0f}"),
        row("10 MiB body proxy CPU ms", s, "proxy_cpu_ms_per_10mib", fmt="{:.1f}"),
    ]
    if idle:
        n = next(iter(idle.values()))["streams"]
        for label, key, fmt, diff in (
            (f"idle {n} SSE: streams open", "opened", "{:.0f}", False),
            (f"idle {n} SSE: RSS MiB", "rss_mib", "{:.0f}", False),
            (f"idle {n} SSE: RSS KiB per stream", "rss_per_stream_kib", "{:.1f}", False),
            (f"idle {n} SSE: open rate streams/s", "open_rate", "{:.0f}", False),
            (f"idle {n} SSE: proxy CPU while held", "hold_cpu_util", "{:.3f}", False),
            ("idle: POST c=4 p99 ms, no streams", "post_before_p99_ms", "{:.3f}", True),
            (f"idle: POST c=4 p99 ms, {n} streams", "post_during_p99_ms", "{:.3f}", True),
        ):
            rows.append(
                Row(
                    label,
                    {
                        "direct": None,
                        "nginx": _get(idle, "nginx", key),
                        "proxyd": _get(idle, "proxyd", key),
                    },
                    diff=diff,
                    fmt=fmt,
                )
            )
    return rows


def render(rows: Sequence[Row]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else fmt.format(value)

    width = max(len(r.label) for r in rows)
    head = (
        f"{'':<{width}}  {'direct':>9}  {'nginx':>9}  {'proxyd':>9}  {'÷direct':>8}  "
        f"{'÷nginx':>7}  {'-direct':>8}  {'-nginx':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        values = "  ".join(f"{cell(r.values.get(p), r.fmt):>9}" for p in PEERS)
        lines.append(
            f"{r.label:<{width}}  {values}  {cell(r.ratio('direct'), '{:.2f}'):>8}  "
            f"{cell(r.ratio('nginx'), '{:.2f}'):>7}  {cell(r.delta('direct'), '{:+.3f}'):>8}  "
            f"{cell(r.delta('nginx'), '{:+.3f}'):>8}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# TLS rows (issue 13): nginx and proxyd both terminating TLS, next to their plain-http numbers


@dataclass(slots=True)
class TlsRow:
    label: str
    nginx: float | None  # nginx_tls
    proxyd: float | None  # proxyd_tls
    nginx_plain: float | None  # the same metric over plain http (nginx / proxyd targets)
    proxyd_plain: float | None
    fmt: str = "{:.3f}"

    def ratio(self) -> float | None:
        if self.nginx is None or self.proxyd is None or self.nginx == 0:
            return None
        return self.proxyd / self.nginx

    @staticmethod
    def _minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def proxyd_tls_cost(self) -> float | None:
        """proxyd over TLS minus proxyd over plain http (what TLS adds to proxyd)."""
        return self._minus(self.proxyd, self.proxyd_plain)

    def nginx_tls_cost(self) -> float | None:
        return self._minus(self.nginx, self.nginx_plain)

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.label,
            "nginx_tls": self.nginx,
            "proxyd_tls": self.proxyd,
            "proxyd_tls_div_nginx_tls": self.ratio(),
            "proxyd_tls_minus_nginx_tls": self._minus(self.proxyd, self.nginx),
            "nginx_plain": self.nginx_plain,
            "proxyd_plain": self.proxyd_plain,
            "nginx_tls_minus_plain": self.nginx_tls_cost(),
            "proxyd_tls_minus_plain": self.proxyd_tls_cost(),
        }


def tls_rows(summary: dict[str, dict[str, Any]], concurrency: int) -> list[TlsRow]:
    """POST at ``concurrency`` and the 10 MiB body through nginx_tls and proxyd_tls."""
    post = summary.get(f"post_c{concurrency}", {})
    big = summary.get("big", {})
    if "nginx_tls" not in post and "proxyd_tls" not in post:
        return []

    def row(label: str, scenario: Mapping[str, Any], key: str, fmt: str) -> TlsRow:
        return TlsRow(
            label,
            _get(scenario, "nginx_tls", key),
            _get(scenario, "proxyd_tls", key),
            _get(scenario, "nginx", key),
            _get(scenario, "proxyd", key),
            fmt,
        )

    c = concurrency
    return [
        row(f"POST c={c} TLS requests/s", post, "rps", "{:.0f}"),
        row(f"POST c={c} TLS p99 ms", post, "p99_ms", "{:.3f}"),
        row(f"POST c={c} TLS CPU µs/req", post, "proxy_cpu_us_per_req", "{:.0f}"),
        row("10 MiB body TLS MB/s", big, "mb_per_s", "{:.0f}"),
        row("10 MiB body TLS proxy CPU ms", big, "proxy_cpu_ms_per_10mib", "{:.1f}"),
    ]


def render_tls(rows: Sequence[TlsRow]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else fmt.format(value)

    def signed(fmt: str) -> str:
        return fmt.replace("{:", "{:+")

    width = max(len(r.label) for r in rows)
    head = (
        f"{'':<{width}}  {'nginx TLS':>9}  {'proxyd TLS':>10}  {'÷nginx(TLS)':>11}  "
        f"{'proxyd TLS-plain':>16}  {'nginx TLS-plain':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.label:<{width}}  {cell(r.nginx, r.fmt):>9}  {cell(r.proxyd, r.fmt):>10}  "
            f"{cell(r.ratio(), '{:.2f}'):>11}  "
            f"{cell(r.proxyd_tls_cost(), signed(r.fmt)):>16}  "
            f"{cell(r.nginx_tls_cost(), signed(r.fmt)):>15}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The lean reference: proxyd's CPU per request against its own stack's floor (informational)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def lean_rows(
    summary: dict[str, dict[str, Any]], concurrency: Sequence[int]
) -> list[dict[str, Any]]:
    """Per POST level: lean's and proxyd's CPU per request (nginx's too) and their ratios."""
    out: list[dict[str, Any]] = []
    for c in concurrency:
        s = summary.get(f"post_c{c}", {})
        if "lean" not in s:
            continue
        lean = _get(s, "lean", "proxy_cpu_us_per_req")
        proxyd = _get(s, "proxyd", "proxy_cpu_us_per_req")
        nginx = _get(s, "nginx", "proxy_cpu_us_per_req")
        out.append(
            {
                "concurrency": c,
                "lean_cpu_us_per_req": lean,
                "proxyd_cpu_us_per_req": proxyd,
                "nginx_cpu_us_per_req": nginx,
                "proxyd_div_lean": _ratio(proxyd, lean),
                "lean_div_nginx": _ratio(lean, nginx),
                "proxyd_div_nginx": _ratio(proxyd, nginx),
                "lean_rps": _get(s, "lean", "rps"),
                "proxyd_rps": _get(s, "proxyd", "rps"),
            }
        )
    return out


def render_lean(rows: Sequence[Mapping[str, Any]]) -> str:
    """One informational line (no target): proxyd ÷ lean CPU per request at each level."""

    def num(value: float | None, fmt: str) -> str:
        return "—" if value is None else fmt.format(value)

    parts = [
        f"c={r['concurrency']} {num(r['proxyd_div_lean'], '{:.2f}')} "
        f"({num(r['proxyd_cpu_us_per_req'], '{:.0f}')} / {num(r['lean_cpu_us_per_req'], '{:.0f}')}"
        f" µs; lean ÷ nginx {num(r['lean_div_nginx'], '{:.2f}')})"
        for r in rows
    ]
    return "proxyd ÷ lean CPU per request (informational, no target): " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Targets (issue 6)


@dataclass(slots=True)
class Check:
    name: str
    value: float | None  # proxyd's number
    limit: float | None  # the bound it must meet (None: cannot be evaluated)
    unit: str
    higher_is_better: bool = False
    note: str = ""

    @property
    def result(self) -> str:
        if self.value is None or self.limit is None:
            return "n/a"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "PASS" if ok else "MISS"

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "proxyd": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "bound": ">=" if self.higher_is_better else "<=",
            "result": self.result,
            **({"note": self.note} if self.note else {}),
        }


def _scaled(value: float | None, factor: float = 1.0, plus: float = 0.0) -> float | None:
    return None if value is None else value * factor + plus


def checks(
    summary: dict[str, dict[str, Any]],
    concurrency: Sequence[int],
    idle: Mapping[str, dict[str, Any]],
    idle_planned: int,
) -> list[Check]:
    out: list[Check] = []
    # Issue 15: CPU per request within 4.5 x nginx's at c=16, 5 x at the other levels.
    for c in concurrency:
        s = summary[f"post_c{c}"]
        factor = 4.5 if c == 16 else 5.0
        out.append(
            Check(
                f"POST c={c}: proxyd CPU/req <= {factor:g} x nginx's",
                _get(s, "proxyd", "proxy_cpu_us_per_req"),
                _scaled(_get(s, "nginx", "proxy_cpu_us_per_req"), factor),
                "µs",
            )
        )
    top = 64 if 64 in concurrency else max(concurrency)
    s = summary[f"post_c{top}"]
    note = "" if top == 64 else "c=64 was not measured"
    out += [
        Check(
            f"POST c={top}: p99 <= 4 x nginx's",
            _get(s, "proxyd", "p99_ms"),
            _scaled(_get(s, "nginx", "p99_ms"), 4.0),
            "ms",
            note=note,
        ),
        Check(
            f"POST c={top}: requests/s >= 0.6 x nginx's",
            _get(s, "proxyd", "rps"),
            _scaled(_get(s, "nginx", "rps"), 0.6),
            "req/s",
            higher_is_better=True,
            note=note,
        ),
    ]
    s = summary["sse"]
    out += [
        Check(
            "SSE per-event delay (mean) <= nginx's + 0.3 ms",
            _get(s, "proxyd", "delay_mean_ms"),
            _scaled(_get(s, "nginx", "delay_mean_ms"), plus=0.3),
            "ms",
        ),
        Check(
            "SSE first event (median) <= nginx's + 1 ms",
            _get(s, "proxyd", "first_event_ms"),
            _scaled(_get(s, "nginx", "first_event_ms"), plus=1.0),
            "ms",
        ),
    ]
    s = summary["big"]
    out.append(
        Check(
            "10 MiB body: MB/s >= 0.5 x direct",
            _get(s, "proxyd", "mb_per_s"),
            _scaled(_get(s, "direct", "mb_per_s"), 0.5),
            "MB/s",
            higher_is_better=True,
        )
    )
    p = idle.get("proxyd")
    if idle_planned:
        held = int(p.get("streams", 0)) if p else 0
        opened = p is not None and p.get("opened") == held and not p.get("dropped")
        if p is None:
            note = "not measured (file descriptor limit, see the log)"
        elif held < idle_planned:
            opened = False  # a smaller count says nothing about the target: n/a, not PASS
            note = (
                f"only {held} streams fit the file descriptor limit (RLIMIT_NOFILE); "
                "see meta.plan.rlimit_nofile"
            )
        elif not opened:
            note = (
                f"not every stream opened and stayed open: {p.get('opened')} opened, "
                f"{p.get('dropped')} dropped {p.get('error', '')}"
            ).strip()
        else:
            note = ""
        out += [
            Check(
                f"{idle_planned} idle SSE streams: proxyd RSS <= 1 GiB",
                _get(idle, "proxyd", "rss_mib") if opened else None,
                1024.0,
                "MiB",
                note=note,
            ),
            Check(
                "idle SSE streams: open rate >= 0.6 x nginx's",
                _get(idle, "proxyd", "open_rate") if opened else None,
                _scaled(_get(idle, "nginx", "open_rate"), 0.6),
                "/s",
                higher_is_better=True,
                note=note,
            ),
            Check(
                "idle SSE streams: RSS per stream <= 1.2 x nginx's",
                _get(idle, "proxyd", "rss_per_stream_kib") if opened else None,
                _scaled(_get(idle, "nginx", "rss_per_stream_kib"), 1.2),
                "KiB",
                note=note,
            ),
            Check(
                f"{idle_planned} idle SSE streams: POST c=4 p99 <= 50 ms",
                _get(idle, "proxyd", "post_during_p99_ms") if opened else None,
                50.0,
                "ms",
                note=note,
            ),
        ]
    return out


def render_checks(items: Sequence[Check]) -> str:
    def cell(value: float | None) -> str:
        if value is None:
            return "—"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"

    width = max(len(c.name) for c in items)
    head = f"{'target':<{width}}  {'proxyd':>9}  {'limit':>9}  {'unit':<5}  result"
    lines = [head, "-" * len(head)]
    for c in items:
        bound = ">=" if c.higher_is_better else "<="
        line = (
            f"{c.name:<{width}}  {cell(c.value):>9}  {bound}{cell(c.limit):>7}  "
            f"{c.unit:<5}  {c.result}"
        )
        lines.append(line + (f"  ({c.note})" if c.note else ""))
    return "\n".join(lines)
