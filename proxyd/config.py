"""TOML configuration → an immutable, validated settings snapshot.

Every problem is collected with its key path (``apps[1].servers[0]: not an http(s) URL``) so an
operator fixes a file in one pass. Unknown keys are errors: a typo must never pass silently.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from proxyd.auth.keys import ASYMMETRIC_ALGORITHMS, KeySetError, parse_jwks
from proxyd.labels import LabelSelector, SelectorError, parse_selector

T = TypeVar("T")

# MCP 2025-06-18 §Authorization recommends Bearer tokens of IdPs; Entra tokens with group claims
# reach 8 KiB, so the default header budget is larger than aiohttp's 8190-byte field limit.
DEFAULT_MAX_HEADER_SIZE = 32 * 1024

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Typed empty defaults for _Table.get (a bare () or {} would make mypy infer T too narrowly).
_NO_STRS: tuple[str, ...] = ()


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every ``path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------------
# Settings (immutable snapshot)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8443
    public_url: str = "http://127.0.0.1:8443"
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allowed_origins: frozenset[str] = frozenset()
    max_request_body: int = 4 * 1024 * 1024
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    state_dir: str = "/var/lib/proxyd"
    shutdown_grace: float = 30.0
    # Processes accepting on the listener (SO_REUSEPORT) under one supervisor; 1 = no
    # supervisor, the process serves itself (issue 6).
    workers: int = 1
    # Connection hygiene of the MCP listener (issue 10, proxyd/listener.py). The request head
    # must arrive within header_timeout (from the connection's start, or from the first byte
    # of a next request on a keep-alive connection): a slowloris client trickling bytes never
    # holds a descriptor longer. nginx's client_header_timeout is 60s; clients send a head in
    # one write, so 10s only ever cuts the stalled and the hostile.
    header_timeout: float = 10.0
    # Silence while reading a request body (then 408); never applies to a response stream.
    body_timeout: float = 60.0
    # An idle client keep-alive connection is closed after this (nginx 75s; aiohttp's own
    # default is 3630s).
    keepalive_timeout: float = 75.0
    # Open client connections per process; above it new ones are closed at accept. Each
    # open stream holds two descriptors (client and upstream): 20000 fits LimitNOFILE=65536.
    max_connections: int = 20_000


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9090
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    average: int = 20
    period: float = 60.0
    burst: int = 40
    enabled: bool = True
    # Client addresses are grouped: one bucket per IPv6 /64 by default (one host's share).
    ipv6_prefix: int = 64
    # Hard cap on tracked keys; a flood of distinct addresses evicts the least recent.
    max_tracked: int = 100_000


@dataclass(frozen=True, slots=True)
class LimitSettings:
    unauthenticated: RateLimitSettings = field(default_factory=RateLimitSettings)
    # Per user on established sessions; off unless configured.
    per_user: RateLimitSettings = field(
        default_factory=lambda: RateLimitSettings(average=600, burst=300, enabled=False)
    )


@dataclass(frozen=True, slots=True)
class SessionSettings:
    max_ttl: float = 12 * 3600.0
    # AES-256-GCM keys for the MCP session ids handed to clients: the first seals, all open.
    mcp_keys: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = 5.0
    # Between two reads from the upstream; an SSE stream that stays silent longer is closed
    # (clients reconnect a GET stream). Never a total timeout: streams live as long as needed.
    idle_timeout: float = 300.0
    # Tries for new work when connecting fails (never after a byte of the request was sent).
    max_attempts: int = 3
    # Idle keep-alive connections are closed after this. Below the common upstream keep-alive
    # timeouts (uvicorn 5 s, Node 5 s, aiohttp and nginx 75 s), so an upstream rarely closes
    # a connection just as proxyd sends a request on it (which would then be a 502: a request
    # that may have reached the upstream is never sent again).
    keepalive_timeout: float = 4.0
    # Idle connections kept per app server; open ones are never capped (SSE streams).
    max_idle_connections: int = 64


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    header: str = "X-Proxyd-Identity"
    ttl: float = 300.0
    key_file: str = ""


@dataclass(frozen=True, slots=True)
class JwksSettings:
    default_ttl: float = 900.0
    min_ttl: float = 60.0
    max_ttl: float = 86400.0
    fetch_timeout: float = 5.0
    max_size: int = 1024 * 1024
    # At most one refetch per URL in this interval when a token names an unknown kid
    # (OIDC Core §10.1.1: a new kid is the IdP's signal of rotation).
    refetch_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class JwtSettings:
    issuer: str
    audience: str
    jwks_url: str | None
    static_jwks: str | None
    username_claim: str = "email"
    algorithms: frozenset[str] = frozenset()
    max_token_age: float = 1800.0
    leeway: float = 60.0


@dataclass(frozen=True, slots=True)
class AppAuthConfig:
    name: str
    app_labels: LabelSelector
    jwt: JwtSettings
    source: str = "main"  # "main" or the file it came from


@dataclass(frozen=True, slots=True)
class HealthCheckSettings:
    type: str = "tcp"  # "tcp" | "http" | "none"
    path: str = "/"
    method: str = "GET"
    expected_statuses: frozenset[int] = frozenset({200})
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    # Passive: this many consecutive failures of real traffic eject a server for `ejection`,
    # doubling on each ejection in a row up to `max_ejection` (nginx max_fails, Envoy outlier).
    passive_failures: int = 3
    ejection: float = 10.0
    max_ejection: float = 300.0


@dataclass(frozen=True, slots=True)
class AppSettings:
    name: str
    labels: Mapping[str, str]
    servers: tuple[str, ...]
    health_check: HealthCheckSettings = field(default_factory=HealthCheckSettings)


@dataclass(frozen=True, slots=True)
class RoleSettings:
    name: str
    users: tuple[str, ...]  # exact, "*", or ^…$ (a ValueMatcher over the username)
    claims: LabelSelector | None  # claim matchers, same matching as labels
    app_labels: LabelSelector | None  # the apps this role grants; None grants none
    allow_tools: tuple[str, ...]  # entries: exact, glob (search_*), ^…$ regex
    deny_tools: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuditSettings:
    file: str | None = None  # also write audit events to this file (JSON lines)
    include_arguments: bool = False  # otherwise only a hash of tools/call arguments
    # tools/list, resources/list, resources/templates/list, prompts/list and ping are
    # recorded only when they fail unless this is set (Teleport's skip list).
    list_methods: bool = False


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where rate-limit buckets and verified sessions live: this process, or a shared Redis."""

    backend: str = "memory"  # "memory" | "redis"
    url: str | None = None  # redis://, rediss:// or unix://; may hold a password: never log it
    # Per Redis operation: a slow Redis must cost a request at most this much, then the
    # configured fallback applies.
    timeout: float = 0.25
    # With Redis down: "open" allows (no limit), "closed" answers 503, "local" limits with this
    # process's own buckets (each instance then allows the whole limit).
    limiter_failure: str = "open"
    key_prefix: str = "proxyd:"
    # After a failure, Redis is left alone this long (requests use the fallback meanwhile);
    # then one request probes it.
    retry_interval: float = 2.0

    @property
    def shared(self) -> bool:
        return self.backend == "redis"


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    log: LogSettings = field(default_factory=LogSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    jwks: JwksSettings = field(default_factory=JwksSettings)
    apps: tuple[AppSettings, ...] = ()
    app_auth_configs: tuple[AppAuthConfig, ...] = ()
    main_app_auth_configs: tuple[AppAuthConfig, ...] = ()  # those of the main file alone
    app_auth_config_dir: str | None = None
    roles: tuple[RoleSettings, ...] = ()
    audit: AuditSettings = field(default_factory=AuditSettings)
    state: StateSettings = field(default_factory=StateSettings)
    path: str | None = None


# ---------------------------------------------------------------------------------------------
# Value parsers: each returns the parsed value or raises ValueError with a short message.


def parse_duration(value: object) -> float:
    """``"30s"``, ``"5m"``, ``"1h30m"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s" or "5m"')
    if isinstance(value, int | float):
        # TOML has inf and nan; neither is a usable duration (nan even passes "<= 0" checks).
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError('expected a duration such as "30s" or "5m"')
    text = value.strip()
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f'not a duration: {value!r} (use e.g. "30s", "5m", "1h30m")')
    return total


def parse_size(value: object) -> int:
    """``"4MiB"``, ``"512KiB"``, ``"1000"`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "4MiB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError('expected a size such as "4MiB"')
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f'not a size: {value!r} (use e.g. "512KiB", "4MiB")')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_hostport(value: object) -> tuple[str, int]:
    if not isinstance(value, str) or not value:
        raise ValueError('expected "host:port"')
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"not host:port: {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    return host, port


def parse_http_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("not an http(s) URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("credentials in URLs are not allowed (they would reach logs)")
    if parts.fragment:
        raise ValueError("URL must not have a fragment")
    return value


def parse_origin(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError('expected an origin such as "https://app.example.com"')
    if value == "null":
        raise ValueError('the "null" origin cannot be allowed safely')
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


_REDIS_SCHEMES = ("redis", "rediss", "unix")
# Query options proxyd passes on to redis-py: the database and TLS files. Others (timeouts,
# retries, pool sizes) would override what proxyd sets itself, so they are refused.
_REDIS_QUERY = {
    "redis": frozenset({"db"}),
    "rediss": frozenset(
        {"db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
    ),
    "unix": frozenset({"db"}),
}


def parse_redis_url(value: object) -> str:
    """``redis://[user:password@]host[:port][/db]``, ``rediss://…`` (TLS) or
    ``unix://[user:password@]/path/to/redis.sock[?db=N]``. Messages never quote the URL: it
    may hold a password."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError('expected a URL such as "redis://127.0.0.1:6379/0"')
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError when not a number in 0-65535
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("not a valid URL (check the port and any %-escapes)") from None
    scheme = parts.scheme.lower()
    if scheme not in _REDIS_SCHEMES:
        raise ValueError("the scheme must be redis://, rediss:// (TLS) or unix://")
    if parts.fragment:
        raise ValueError("URL must not have a fragment")
    for name, option in query:
        if name not in _REDIS_QUERY[scheme]:
            allowed = ", ".join(sorted(_REDIS_QUERY[scheme]))
            raise ValueError(f"query option {name!r} is not supported here (allowed: {allowed})")
        if name == "db" and not option.isdigit():
            raise ValueError("db must be a database number")
        if name == "ssl_cert_reqs" and option not in ("none", "optional", "required"):
            raise ValueError("ssl_cert_reqs must be none, optional or required")
        if name == "ssl_check_hostname" and option.lower() not in ("true", "false"):
            raise ValueError("ssl_check_hostname must be true or false")
    if scheme == "unix":
        if parts.hostname or port is not None:
            raise ValueError("unix:// takes a socket path, no host: unix:///run/redis/redis.sock")
        if not parts.path.startswith("/") or parts.path == "/":
            raise ValueError("unix:// needs the socket's absolute path")
        return value
    if not parts.hostname:
        raise ValueError("missing host")
    if port == 0:
        raise ValueError("port out of range: 0")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError("the path must be a database number, e.g. redis://host:6379/0")
    return value


def redact_url(url: str | None) -> str | None:
    """The URL with any password replaced, for logs and messages."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:[redacted]@{host}"))


# ---------------------------------------------------------------------------------------------
# The walker: typed access to a TOML table with problem collection.


class _Table:
    """A view of one TOML table that records problems and which keys were read."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str | None, message: str) -> None:
        where = self._key(key) if key is not None else (self.path or "<top>")
        self.problems.append(f"{where}: {message}")

    def get(self, key: str, parse: Callable[[object], T], default: T) -> T:
        self._seen.add(key)
        if key not in self.data:
            return default
        try:
            return parse(self.data[key])
        except _ItemErrors as exc:
            # One problem per bad item, with its own path: ``apps[1].servers[0]: …``.
            for index, message in exc.items:
                self.problems.append(f"{self._key(key)}[{index}]: {message}")
            return default
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def require(self, key: str, parse: Callable[[object], T], default: T) -> T:
        if key not in self.data:
            self._seen.add(key)
            self.problem(key, "required")
            return default
        return self.get(key, parse, default)

    def table(self, key: str) -> _Table:
        self._seen.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            self.problem(key, "expected a table")
            value = {}
        return _Table(value, self._key(key), self.problems)

    def tables(self, key: str) -> Iterator[_Table]:
        self._seen.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.problem(key, "expected an array of tables ([[...]])")
            return
        for index, item in enumerate(value):
            where = f"{self._key(key)}[{index}]"
            if not isinstance(item, Mapping):
                self.problems.append(f"{where}: expected a table")
                continue
            yield _Table(item, where, self.problems)

    def mark(self, *keys: str) -> None:
        self._seen.update(keys)

    @contextmanager
    def closed(self) -> Iterator[_Table]:
        """Report every key of this table that no reader asked for."""
        yield self
        for key in self.data:
            if key not in self._seen:
                self.problem(key, "unknown key")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _nonempty_str(value: object) -> str:
    text = _str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a positive integer")
    return value


MAX_WORKERS = 256


def parse_workers(value: object) -> int:
    """A count of worker processes, or "auto": one per CPU this process may run on."""
    if value == "auto":
        # The affinity mask, not os.cpu_count(): a unit with CPUAffinity= or a container
        # cpuset gets one worker per CPU it can actually use.
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f'expected "auto" or an integer from 1 to {MAX_WORKERS}')
    return value


def _non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected an integer, 0 or more")
    return value


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _name(value: object) -> str:
    text = _str(value)
    if not _NAME_RE.match(text):
        raise ValueError("names are 1-63 characters of letters, digits, '.', '_' and '-'")
    return text


class _ItemErrors(ValueError):
    """Problems of individual list items; _Table.get reports each as ``key[index]: message``."""

    def __init__(self, items: list[tuple[int, str]]) -> None:
        super().__init__("; ".join(f"[{index}]: {message}" for index, message in items))
        self.items = items


def _list_of(parse: Callable[[object], T]) -> Callable[[object], tuple[T, ...]]:
    def parse_list(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list")
        out: list[T] = []
        errors: list[tuple[int, str]] = []
        for index, item in enumerate(value):
            try:
                out.append(parse(item))
            except ValueError as exc:
                errors.append((index, str(exc)))
        if errors:
            raise _ItemErrors(errors)
        return tuple(out)

    return parse_list


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError('expected a CIDR such as "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not a CIDR: {value!r}") from None


def _labels(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError('expected a table of label = "value"')
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise ValueError(f"label {key!r}: value must be a string")
        out[str(key)] = item
    return out


def _selector(value: object) -> LabelSelector:
    if not isinstance(value, Mapping):
        raise ValueError("expected a table of label = value | [values]")
    try:
        return parse_selector(value)
    except SelectorError as exc:
        raise ValueError(str(exc)) from None


def _server_url(value: object) -> str:
    return parse_http_url(value)


def _level(value: object) -> str:
    text = _str(value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError("one of debug, info, warning, error")
    return text


def _log_format(value: object) -> str:
    text = _str(value).lower()
    if text not in ("json", "console", "auto"):
        raise ValueError("one of json, console, auto")
    return text


def _header_name(value: object) -> str:
    text = _str(value)
    if not _HEADER_NAME_RE.match(text):
        raise ValueError("not a valid HTTP header name")
    if text.lower() in ("authorization", "host", "cookie", "x-forwarded-for"):
        raise ValueError(f"{text} is reserved")
    return text


def _algorithms(value: object) -> frozenset[str]:
    names = _list_of(_str)(value)
    bad = sorted(set(names) - ASYMMETRIC_ALGORITHMS)
    if bad:
        raise ValueError(
            f"not allowed: {', '.join(bad)} (only {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
        )
    return frozenset(names)


# ---------------------------------------------------------------------------------------------
# Sections


def _parse_server(t: _Table) -> ServerSettings:
    d = ServerSettings()
    with t.closed():
        host, port = t.get("listen", parse_hostport, (d.listen_host, d.listen_port))
        public_url = t.get("public_url", parse_http_url, f"http://{_netloc(host, port)}")
        server = ServerSettings(
            listen_host=host,
            listen_port=port,
            public_url=public_url.rstrip("/"),
            trusted_proxies=t.get("trusted_proxies", _list_of(_network), ()),
            allowed_origins=frozenset(t.get("allowed_origins", _list_of(parse_origin), _NO_STRS)),
            max_request_body=t.get("max_request_body", parse_size, d.max_request_body),
            max_header_size=t.get("max_header_size", parse_size, d.max_header_size),
            state_dir=t.get("state_dir", _nonempty_str, d.state_dir),
            shutdown_grace=t.get("shutdown_grace", parse_duration, d.shutdown_grace),
            workers=t.get("workers", parse_workers, d.workers),
            header_timeout=t.get("header_timeout", _positive_duration, d.header_timeout),
            body_timeout=t.get("body_timeout", _positive_duration, d.body_timeout),
            keepalive_timeout=t.get("keepalive_timeout", _positive_duration, d.keepalive_timeout),
            max_connections=t.get("max_connections", _positive_int, d.max_connections),
        )
    if server.max_header_size < 1024:
        t.problem("max_header_size", "must be at least 1KiB")
    return server


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_admin(t: _Table) -> AdminSettings:
    d = AdminSettings()
    with t.closed():
        host, port = t.get("listen", parse_hostport, (d.listen_host, d.listen_port))
        enabled = t.get("enabled", _bool, d.enabled)
    return AdminSettings(listen_host=host, listen_port=port, enabled=enabled)


def _parse_log(t: _Table) -> LogSettings:
    with t.closed():
        return LogSettings(
            level=t.get("level", _level, "info"), format=t.get("format", _log_format, "auto")
        )


def _parse_limits(t: _Table) -> LimitSettings:
    d = LimitSettings()
    with t.closed():
        unauth = _parse_limit(t.table("unauthenticated"), d.unauthenticated)
        per_user_table = t.table("per_user")
        per_user = _parse_limit(per_user_table, d.per_user)
        if "per_user" in t.data and "enabled" not in per_user_table.data:
            # Writing the section is the way to ask for it.
            per_user = dataclasses.replace(per_user, enabled=True)
    return LimitSettings(unauthenticated=unauth, per_user=per_user)


def _parse_limit(t: _Table, d: RateLimitSettings) -> RateLimitSettings:
    with t.closed():
        limit = RateLimitSettings(
            average=t.get("average", _positive_int, d.average),
            period=t.get("period", _positive_duration, d.period),
            burst=t.get("burst", _positive_int, d.burst),
            enabled=t.get("enabled", _bool, d.enabled),
            ipv6_prefix=t.get("ipv6_prefix", _positive_int, d.ipv6_prefix),
            max_tracked=t.get("max_tracked", _positive_int, d.max_tracked),
        )
    if limit.ipv6_prefix > 128:
        t.problem("ipv6_prefix", "at most 128")
    return limit


def _parse_sessions(t: _Table) -> SessionSettings:
    with t.closed():
        return SessionSettings(
            max_ttl=t.get("max_ttl", _positive_duration, 12 * 3600.0),
            mcp_keys=t.get("mcp_keys", _list_of(_aes_key), ()),
        )


def _aes_key(value: object) -> bytes:
    text = _str(value)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (generate one with: openssl rand -base64 32)") from None
    if len(key) != 32:
        raise ValueError(f"must be 32 bytes (AES-256), got {len(key)}")
    return key


def _parse_upstream(t: _Table) -> UpstreamSettings:
    d = UpstreamSettings()
    with t.closed():
        return UpstreamSettings(
            connect_timeout=t.get("connect_timeout", _positive_duration, d.connect_timeout),
            idle_timeout=t.get("idle_timeout", _positive_duration, d.idle_timeout),
            max_attempts=t.get("max_attempts", _positive_int, d.max_attempts),
            keepalive_timeout=t.get("keepalive_timeout", _positive_duration, d.keepalive_timeout),
            max_idle_connections=t.get(
                "max_idle_connections", _non_negative_int, d.max_idle_connections
            ),
        )


def _parse_identity(t: _Table) -> IdentitySettings:
    d = IdentitySettings()
    with t.closed():
        settings = IdentitySettings(
            header=t.get("header", _header_name, d.header),
            ttl=t.get("ttl", _positive_duration, d.ttl),
            key_file=t.get("key_file", _str, d.key_file),
        )
    if settings.ttl > 600:
        t.problem("ttl", "at most 10m: the assertion is a short-lived credential")
    return settings


def _parse_jwks(t: _Table) -> JwksSettings:
    d = JwksSettings()
    with t.closed():
        s = JwksSettings(
            default_ttl=t.get("default_ttl", _positive_duration, d.default_ttl),
            min_ttl=t.get("min_ttl", _positive_duration, d.min_ttl),
            max_ttl=t.get("max_ttl", _positive_duration, d.max_ttl),
            fetch_timeout=t.get("fetch_timeout", _positive_duration, d.fetch_timeout),
            max_size=t.get("max_size", parse_size, d.max_size),
            refetch_interval=t.get("refetch_interval", _positive_duration, d.refetch_interval),
        )
    if s.min_ttl > s.max_ttl:
        t.problem("min_ttl", "must not exceed max_ttl")
    return s


def _parse_apps(root: _Table) -> tuple[AppSettings, ...]:
    apps: list[AppSettings] = []
    names: set[str] = set()
    for t in root.tables("apps"):
        with t.closed():
            name = t.require("name", _name, "")
            labels: dict[str, str] = t.get("labels", _labels, {})
            servers = t.require("servers", _list_of(_server_url), _NO_STRS)
            health = _parse_health(t.table("health_check"))
        # Only an empty list: when items were invalid, `servers` is the () default and the
        # item problems are already reported (claiming "none given" would be wrong).
        if t.data.get("servers") == []:
            t.problem("servers", "at least one server is required")
        if name and name in names:
            t.problem("name", f"duplicate app name {name!r}")
        names.add(name)
        apps.append(AppSettings(name=name, labels=labels, servers=servers, health_check=health))
    return tuple(apps)


def _check_type(value: object) -> str:
    text = _str(value)
    if text not in ("tcp", "http", "none"):
        raise ValueError("one of tcp, http, none")
    return text


def _status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError("expected an HTTP status code (100-599)")
    return value


def _path(value: object) -> str:
    text = _str(value)
    if not text.startswith("/"):
        raise ValueError("must start with /")
    return text


def _parse_health(t: _Table) -> HealthCheckSettings:
    d = HealthCheckSettings()
    with t.closed():
        h = HealthCheckSettings(
            type=t.get("type", _check_type, d.type),
            path=t.get("path", _path, d.path),
            method=t.get("method", _nonempty_str, d.method).upper(),
            expected_statuses=frozenset(
                t.get("expected_statuses", _list_of(_status), tuple(d.expected_statuses))
            ),
            interval=t.get("interval", _positive_duration, d.interval),
            timeout=t.get("timeout", _positive_duration, d.timeout),
            healthy_threshold=t.get("healthy_threshold", _positive_int, d.healthy_threshold),
            unhealthy_threshold=t.get("unhealthy_threshold", _positive_int, d.unhealthy_threshold),
            passive_failures=t.get("passive_failures", _positive_int, d.passive_failures),
            ejection=t.get("ejection", _positive_duration, d.ejection),
            max_ejection=t.get("max_ejection", _positive_duration, d.max_ejection),
        )
    # A default must never conflict with what the user did write: `interval = "1s"` alone
    # brings the timeout down with it, `ejection = "10m"` alone raises the cap.
    if "timeout" not in t.data:
        h = dataclasses.replace(h, timeout=min(h.timeout, h.interval))
    if "max_ejection" not in t.data:
        h = dataclasses.replace(h, max_ejection=max(h.max_ejection, h.ejection))
    if h.timeout > h.interval:
        t.problem("timeout", "must not exceed interval")
    if h.ejection > h.max_ejection:
        t.problem("ejection", "must not exceed max_ejection")
    if not h.expected_statuses:
        t.problem("expected_statuses", "at least one status")
    return h


def parse_app_auth_config(t: _Table, source: str) -> AppAuthConfig:
    """One app auth config: an ``[[app_auth_configs]]`` entry or a file in ``config_dir``."""
    with t.closed():
        name = t.require("name", _name, "")
        selector = t.require("app_labels", _selector, LabelSelector(()))
        jt = t.table("jwt")
        if "jwt" not in t.data:
            t.problem("jwt", "required")
            # Parse the missing table quietly: "jwt: required" says it all.
            jt = _Table({}, jt.path, [])
        jwt = _parse_jwt(jt)
    # Only an empty table selects nothing; an invalid one is already reported (and left the
    # empty default selector, which must not add a second, misleading problem).
    if isinstance(t.data.get("app_labels"), Mapping) and not t.data["app_labels"]:
        # Teleport's rule (ValidateAppAuthConfig): a config selecting nothing is a mistake.
        t.problem("app_labels", 'must select at least one label (use { "*" = "*" } for all)')
    return AppAuthConfig(name=name, app_labels=selector, jwt=jwt, source=source)


def _tool_entry(value: object) -> str:
    text = _nonempty_str(value)
    if text.startswith("^") and text.endswith("$"):
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"bad regular expression {text!r}: {exc}") from None
    return text


def _user_entry(value: object) -> str:
    return _tool_entry(value)


def _parse_roles(root: _Table) -> tuple[RoleSettings, ...]:
    roles: list[RoleSettings] = []
    names: set[str] = set()
    for t in root.tables("roles"):
        with t.closed():
            name = t.require("name", _name, "")
            users = t.get("users", _list_of(_user_entry), _NO_STRS)
            claims = t.get("claims", _optional_selector, None)
            app_labels = t.get("app_labels", _optional_selector, None)
            allow = _parse_tools(t.table("mcp"))
            deny_table = t.table("deny")
            with deny_table.closed():
                deny = _parse_tools(deny_table.table("mcp"))
        # Empty `users = []` / `claims = {}` select no one either (the role would silently
        # never apply); a non-empty invalid value is reported by its own parser already.
        if not t.data.get("users") and not t.data.get("claims"):
            t.problem(None, 'a role needs "users" or "claims" to say whom it applies to')
        if name and name in names:
            t.problem("name", f"duplicate role name {name!r}")
        names.add(name)
        roles.append(RoleSettings(name, users, claims, app_labels, allow, deny))
    return tuple(roles)


def _parse_tools(t: _Table) -> tuple[str, ...]:
    with t.closed():
        return t.get("tools", _list_of(_tool_entry), _NO_STRS)


def _optional_selector(value: object) -> LabelSelector | None:
    return _selector(value)


def _parse_audit(t: _Table) -> AuditSettings:
    d = AuditSettings()
    with t.closed():
        return AuditSettings(
            file=t.get("file", _nonempty_str, d.file),
            include_arguments=t.get("include_arguments", _bool, d.include_arguments),
            list_methods=t.get("list_methods", _bool, d.list_methods),
        )


def _parse_main_app_auth_configs(root: _Table) -> tuple[AppAuthConfig, ...]:
    configs: list[AppAuthConfig] = []
    names: set[str] = set()
    for t in root.tables("app_auth_configs"):
        config = parse_app_auth_config(t, "main")
        if config.name and config.name in names:
            # Reported here with its key path (merge_app_auth_configs could only say "main").
            t.problem("name", f"duplicate app auth config name {config.name!r}")
            continue
        names.add(config.name)
        configs.append(config)
    return tuple(configs)


def _parse_jwt(t: _Table) -> JwtSettings:
    with t.closed():
        issuer = t.require("issuer", _nonempty_str, "")
        audience = t.require("audience", _nonempty_str, "")
        jwks_url = t.get("jwks_url", parse_http_url, None)
        static_jwks = t.get("static_jwks", _static_jwks, None)
        before = len(t.problems)
        algorithms: frozenset[str] = t.get("algorithms", _algorithms, frozenset())
        algorithms_ok = len(t.problems) == before
        settings = JwtSettings(
            issuer=issuer,
            audience=audience,
            jwks_url=jwks_url,
            static_jwks=static_jwks,
            username_claim=t.get("username_claim", _nonempty_str, "email"),
            algorithms=algorithms,
            max_token_age=t.get("max_token_age", _positive_duration, 1800.0),
            leeway=t.get("leeway", parse_duration, 60.0),
        )
    has_url, has_static = "jwks_url" in t.data, "static_jwks" in t.data
    if has_url == has_static:
        t.problem(None, "exactly one of jwks_url or static_jwks is required")
    if settings.leeway > 300:
        t.problem("leeway", "at most 5m")
    if settings.static_jwks is not None and algorithms_ok:
        # Check the keys with the config's own algorithms, exactly as AppAuthStore will parse
        # them: keys without an "alg" are usable once `algorithms` is set, and a key set that
        # `algorithms` filters down to nothing must fail here, not crash the daemon at start.
        _check_static_jwks(t, settings.static_jwks, settings.algorithms)
    return settings


def _static_jwks(value: object) -> str:
    """The JWKS as JSON text; whether its keys are usable depends on `algorithms` (below)."""
    text = value if isinstance(value, str) else None
    if isinstance(value, Mapping):
        text = json.dumps(value)
    if text is None:
        raise ValueError("expected a JWKS as a JSON string or an inline table")
    try:
        doc = json.loads(text)
    except ValueError:
        raise ValueError("JWKS is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('JWKS must be an object with a "keys" array')
    return text


def _check_static_jwks(t: _Table, text: str, algorithms: frozenset[str]) -> None:
    try:
        rejected, unusable = parse_jwks(text.encode(), algorithms).rejected, None
    except KeySetError as exc:
        rejected, unusable = exc.rejected, str(exc)
    # A fetched JWKS drops such a key with a log line; here whoever wrote the file can fix it,
    # and a weak key (RFC 7518 §3.3) silently unused is a key someone believes is trusted.
    for key in rejected:
        t.problem(f"static_jwks.keys[{key.index}]", key.reason)
    if unusable is not None and not rejected:
        t.problem("static_jwks", unusable)


def _parse_app_auth_section(t: _Table) -> str | None:
    with t.closed():
        return t.get("config_dir", _nonempty_str, None)


def _state_backend(value: object) -> str:
    text = _str(value)
    if text not in ("memory", "redis"):
        raise ValueError("one of memory, redis")
    return text


def _limiter_failure(value: object) -> str:
    text = _str(value)
    if text not in ("open", "closed", "local"):
        raise ValueError("one of open, closed, local")
    return text


def _key_prefix(value: object) -> str:
    text = _str(value)
    if len(text) > 64 or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("at most 64 printable characters without spaces")
    return text


def _parse_state(t: _Table) -> StateSettings:
    d = StateSettings()
    with t.closed():
        state = StateSettings(
            backend=t.get("backend", _state_backend, d.backend),
            url=t.get("url", parse_redis_url, d.url),
            timeout=t.get("timeout", _positive_duration, d.timeout),
            limiter_failure=t.get("limiter_failure", _limiter_failure, d.limiter_failure),
            key_prefix=t.get("key_prefix", _key_prefix, d.key_prefix),
            retry_interval=t.get("retry_interval", _positive_duration, d.retry_interval),
        )
    if state.backend == "redis" and "url" not in t.data:
        t.problem("url", 'required with backend = "redis"')
    if state.backend == "memory" and "url" in t.data:
        t.problem("url", 'only used with backend = "redis"')
    if state.timeout > 10:
        t.problem("timeout", "at most 10s: every request may wait this long for Redis")
    return state


def parse_app_auth_file(path: Path, text: str) -> AppAuthConfig:
    """One file of ``app_auth.config_dir``; ConfigError lists ``file: key: problem``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    problems: list[str] = []
    config = parse_app_auth_config(_Table(data, "", problems), str(path))
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return config


def load_app_auth_dir(directory: str) -> tuple[list[AppAuthConfig], list[str]]:
    """Every ``*.toml`` in ``directory``: the configs that parsed and the problems of the rest."""
    configs: list[AppAuthConfig] = []
    problems: list[str] = []
    base = Path(directory)
    if not base.is_dir():
        return [], [f"app_auth.config_dir: not a directory: {directory}"]
    for path in sorted(base.glob("*.toml")):
        try:
            configs.append(parse_app_auth_file(path, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: {exc}")
        except ConfigError as exc:
            problems.extend(exc.problems)
    return configs, problems


def merge_app_auth_configs(
    main: tuple[AppAuthConfig, ...], extra: list[AppAuthConfig]
) -> tuple[tuple[AppAuthConfig, ...], list[str]]:
    """Merge by name; a duplicate is an error for the later source, never a silent override."""
    merged: dict[str, AppAuthConfig] = {}
    problems: list[str] = []
    for config in (*main, *extra):
        if config.name in merged:
            problems.append(
                f"{config.source}: app auth config {config.name!r} is already defined in "
                f"{merged[config.name].source}"
            )
            continue
        merged[config.name] = config
    return tuple(sorted(merged.values(), key=lambda c: c.name)), problems


def parse_settings(
    data: Mapping[str, Any], path: str | None = None, *, load_dir: bool = True
) -> Settings:
    """Validate a parsed TOML document; raise ConfigError listing every problem.

    ``load_dir=False`` leaves the files of ``app_auth.config_dir`` to the watcher (a reload
    of the main file must not fail on a directory file the watcher keeps a good version of).
    """
    problems: list[str] = []
    root = _Table(data, "", problems)
    with root.closed():
        server = _parse_server(root.table("server"))
        admin = _parse_admin(root.table("admin"))
        log = _parse_log(root.table("log"))
        limit = _parse_limits(root.table("limits"))
        sessions = _parse_sessions(root.table("sessions"))
        upstream = _parse_upstream(root.table("upstream"))
        identity = _parse_identity(root.table("identity"))
        jwks = _parse_jwks(root.table("jwks"))
        apps = _parse_apps(root)
        main_configs = _parse_main_app_auth_configs(root)
        config_dir = _parse_app_auth_section(root.table("app_auth"))
        roles = _parse_roles(root)
        audit = _parse_audit(root.table("audit"))
        state = _parse_state(root.table("state"))
    written = data.get("sessions")
    keys_written = isinstance(written, Mapping) and bool(written.get("mcp_keys"))
    # (Keys written but invalid are reported by their own parser already.)
    if state.shared and not sessions.mcp_keys and not keys_written:
        # Shared session records are sealed with a key derived from these (a Redis writer must
        # not be able to mint sessions); instances behind one name need them shared anyway.
        problems.append(
            'sessions.mcp_keys: required with state.backend = "redis" (shared sessions are '
            "sealed with it; give every instance the same keys)"
        )
    extra: list[AppAuthConfig] = []
    if config_dir is not None and load_dir:
        extra, dir_problems = load_app_auth_dir(config_dir)
        problems.extend(dir_problems)
    configs, merge_problems = merge_app_auth_configs(main_configs, extra)
    problems.extend(merge_problems)
    if problems:
        raise ConfigError(problems)
    return Settings(
        server=server,
        admin=admin,
        log=log,
        limits=limit,
        sessions=sessions,
        upstream=upstream,
        identity=identity,
        jwks=jwks,
        apps=apps,
        app_auth_configs=configs,
        main_app_auth_configs=main_configs,
        app_auth_config_dir=config_dir,
        roles=roles,
        audit=audit,
        state=state,
        path=path,
    )


def load_settings(path: str, *, load_dir: bool = True) -> Settings:
    """Read and validate a TOML file; raise ConfigError on any problem, including I/O."""
    return settings_from_text(read_config(path), path, load_dir=load_dir)


def read_config(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None


def settings_from_text(text: str, path: str, *, load_dir: bool = True) -> Settings:
    """The file's content as read once: a supervisor hands this exact text to its workers."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    return parse_settings(data, path, load_dir=load_dir)


# Settings a running process cannot change (reload keeps the values it started with).
RESTART_ONLY: dict[str, Callable[[Settings], Any]] = {
    "server.listen": lambda s: (s.server.listen_host, s.server.listen_port),
    "server.state_dir": lambda s: s.server.state_dir,
    "server.max_header_size": lambda s: s.server.max_header_size,
    "server.workers": lambda s: s.server.workers,
    "admin": lambda s: s.admin,
    "log.format": lambda s: s.log.format,
    "identity.key_file": lambda s: s.identity.key_file,
    "jwks": lambda s: s.jwks,
    "app_auth.config_dir": lambda s: s.app_auth_config_dir,
    "audit.file": lambda s: s.audit.file,
    # The Redis connection, its fallbacks and key names are built once, at start.
    "state": lambda s: s.state,
}


def in_force(new: Settings, boot: Settings) -> Settings:
    """The new settings with the restart-only values of the running process, so nothing is
    half applied (e.g. a 431 limit above what aiohttp's parser was built with)."""
    server = dataclasses.replace(
        new.server,
        listen_host=boot.server.listen_host,
        listen_port=boot.server.listen_port,
        state_dir=boot.server.state_dir,
        max_header_size=boot.server.max_header_size,
        workers=boot.server.workers,
    )
    return dataclasses.replace(
        new,
        server=server,
        admin=boot.admin,
        log=dataclasses.replace(new.log, format=boot.log.format),
        identity=dataclasses.replace(new.identity, key_file=boot.identity.key_file),
        jwks=boot.jwks,
        app_auth_config_dir=boot.app_auth_config_dir,
        audit=dataclasses.replace(new.audit, file=boot.audit.file),
        state=boot.state,
    )
