"""The settings snapshot: frozen dataclasses, each field declared once.

A field read by the generic section reader (``load.read_section``) names its parser in its
annotation, ``Annotated[float, Parse(positive_duration)]``; its TOML key is the field name
unless ``Key`` says otherwise, and its default is the dataclass default. A field a running
process cannot change carries ``RESTART``: ``load.RESTART_ONLY`` and ``load.in_force`` are
computed from these markers, so there is no second list to forget a key in. Fields without
``Parse`` are read by their section's own reader (a default that depends on another field, a
table of tables, lists of apps, roles and app auth configs).

Annotations are evaluated here, not postponed, so ``typing.get_type_hints`` needs no name
lookup. A parser must not share a field's name: the field's default, assigned first, would
shadow it inside the class body.
"""

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from proxyd.config.values import (
    DEFAULT_MAX_HEADER_SIZE,
    SecretHeaders,
    aes_key,
    base_url,
    boolean,
    cidr,
    credential_name,
    frozenset_of,
    header_name,
    health_check_type,
    http_method,
    http_status,
    jwks_json,
    jwt_algorithms,
    limiter_failure_mode,
    list_of,
    log_format,
    log_level,
    non_negative_int,
    nonempty_str,
    one_or_more,
    otlp_base_url,
    parse_duration,
    parse_http_url,
    parse_origin,
    parse_redis_url,
    parse_size,
    parse_workers,
    positive_duration,
    positive_int,
    redis_key_prefix,
    scope_list,
    state_backend,
    string,
    tls_min_version,
    unit_ratio,
    upstream_auth_type,
    url_path,
)
from proxyd.labels import LabelSelector


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every ``path: message`` (raised by
    ``load``'s parsing and ``secrets``' reads alike)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Parse:
    """How the generic reader reads a field: its parser, and whether the key must be written.

    ``missing`` stands in for a field without a dataclass default when its key is absent or
    its value invalid (the problem is reported; parsing goes on to find the others).
    """

    fn: Callable[[object], Any]
    required: bool = False
    missing: Any = None


@dataclass(frozen=True, slots=True)
class Key:
    """The dotted key a field is known by when it is not the field's name. Fields sharing a key
    (``listen`` → ``listen_host`` and ``listen_port``) are one restart-only key."""

    name: str


class RestartOnly:
    """Marks a field (or a whole section) a running process keeps from its start."""

    def __repr__(self) -> str:
        return "RESTART"


RESTART = RestartOnly()


@dataclass(frozen=True, slots=True)
class ListenerTlsSettings:
    """``[server.tls]`` / ``[admin.tls]``: TLS on proxyd's own listener (issue 13 §1). The
    files are re-read on SIGHUP (proxyd/tls.py); the paths themselves are restart-only."""

    cert_file: Annotated[str, Parse(nonempty_str, required=True, missing="")]
    key_file: Annotated[str, Parse(nonempty_str, required=True, missing="")]
    min_version: Annotated[str, Parse(tls_min_version)] = "1.2"
    client_ca_file: Annotated[str, Parse(string)] = ""  # "": no client certificates (no mTLS)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    # Read by the section's reader: one "host:port" key for two fields.
    listen_host: Annotated[str, Key("listen"), RESTART] = "127.0.0.1"
    listen_port: Annotated[int, Key("listen"), RESTART] = 8443
    # Its default (derived from listen) is given by the section's reader.
    # Restart-only: the access middleware and the resource URLs built from it (the audience
    # proxyd accepts, resource_metadata) are made once, at start.
    public_url: Annotated[str, Parse(base_url), RESTART] = "http://127.0.0.1:8443"
    trusted_proxies: Annotated[
        tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], Parse(list_of(cidr))
    ] = ()
    allowed_origins: Annotated[frozenset[str], Parse(frozenset_of(parse_origin))] = frozenset()
    max_request_body: Annotated[int, Parse(parse_size)] = 4 * 1024 * 1024
    max_header_size: Annotated[int, Parse(parse_size), RESTART] = DEFAULT_MAX_HEADER_SIZE
    state_dir: Annotated[str, Parse(nonempty_str), RESTART] = "/var/lib/proxyd"
    shutdown_grace: Annotated[float, Parse(parse_duration)] = 30.0
    # Processes accepting on the listener (SO_REUSEPORT) under one supervisor; 1 = no
    # supervisor, the process serves itself (issue 6).
    workers: Annotated[int, Parse(parse_workers), RESTART] = 1
    # Connection hygiene of the MCP listener (issue 10, proxyd/listener.py). The request head
    # must arrive within header_timeout (from the connection's start, or from the first byte
    # of a next request on a keep-alive connection): a slowloris client trickling bytes never
    # holds a descriptor longer. nginx's client_header_timeout is 60s; clients send a head in
    # one write, so 10s only ever cuts the stalled and the hostile.
    header_timeout: Annotated[float, Parse(positive_duration)] = 10.0
    # Silence while reading a request body (then 408); never applies to a response stream.
    body_timeout: Annotated[float, Parse(positive_duration)] = 60.0
    # An idle client keep-alive connection is closed after this (nginx 75s; aiohttp's own
    # default is 3630s).
    keepalive_timeout: Annotated[float, Parse(positive_duration)] = 75.0
    # Open client connections per process; above it new ones are closed at accept. Each
    # open stream holds two descriptors (client and upstream): 20000 fits LimitNOFILE=65536.
    max_connections: Annotated[int, Parse(positive_int)] = 20_000
    # [server.tls]: read by load.py's _parse_server; None is plain HTTP.
    tls: Annotated[ListenerTlsSettings | None, RESTART] = None


@dataclass(frozen=True, slots=True)
class AdminSettings:
    # Read by the section's reader, as in ServerSettings.
    listen_host: Annotated[str, Key("listen")] = "127.0.0.1"
    listen_port: Annotated[int, Key("listen")] = 9090
    enabled: Annotated[bool, Parse(boolean)] = True
    # [admin.tls]: read by load.py's _parse_admin; None is plain HTTP.
    tls: Annotated[ListenerTlsSettings | None, RESTART] = None


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: Annotated[str, Parse(log_level)] = "info"
    format: Annotated[str, Parse(log_format), RESTART] = "auto"


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    average: Annotated[int, Parse(positive_int)] = 20
    period: Annotated[float, Parse(positive_duration)] = 60.0
    burst: Annotated[int, Parse(positive_int)] = 40
    enabled: Annotated[bool, Parse(boolean)] = True
    # Client addresses are grouped: one bucket per IPv6 /64 by default (one host's share).
    ipv6_prefix: Annotated[int, Parse(positive_int)] = 64
    # Hard cap on tracked keys; a flood of distinct addresses evicts the least recent.
    max_tracked: Annotated[int, Parse(positive_int)] = 100_000


@dataclass(frozen=True, slots=True)
class LimitSettings:
    unauthenticated: RateLimitSettings = field(default_factory=RateLimitSettings)
    # Per user on established sessions; off unless configured.
    per_user: RateLimitSettings = field(
        default_factory=lambda: RateLimitSettings(average=600, burst=300, enabled=False)
    )


@dataclass(frozen=True, slots=True)
class SessionSettings:
    max_ttl: Annotated[float, Parse(positive_duration)] = 12 * 3600.0
    # AES-256-GCM keys for the MCP session ids handed to clients: the first seals, all open.
    mcp_keys: Annotated[tuple[bytes, ...], Parse(list_of(aes_key))] = ()


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: Annotated[float, Parse(positive_duration)] = 5.0
    # Between two reads from the upstream; an SSE stream that stays silent longer is closed
    # (clients reconnect a GET stream). Never a total timeout: streams live as long as needed.
    idle_timeout: Annotated[float, Parse(positive_duration)] = 300.0
    # Tries for new work when connecting fails (never after a byte of the request was sent).
    max_attempts: Annotated[int, Parse(positive_int)] = 3
    # Idle keep-alive connections are closed after this. Below the common upstream keep-alive
    # timeouts (uvicorn 5 s, Node 5 s, aiohttp and nginx 75 s), so an upstream rarely closes
    # a connection just as proxyd sends a request on it (which would then be a 502: a request
    # that may have reached the upstream is never sent again).
    keepalive_timeout: Annotated[float, Parse(positive_duration)] = 4.0
    # Idle connections kept per app server; open ones are never capped (SSE streams).
    max_idle_connections: Annotated[int, Parse(non_negative_int)] = 64


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    header: Annotated[str, Parse(header_name)] = "X-Proxyd-Identity"
    ttl: Annotated[float, Parse(positive_duration)] = 300.0
    key_file: Annotated[str, Parse(string), RESTART] = ""


@dataclass(frozen=True, slots=True)
class JwksSettings:
    default_ttl: Annotated[float, Parse(positive_duration)] = 900.0
    min_ttl: Annotated[float, Parse(positive_duration)] = 60.0
    max_ttl: Annotated[float, Parse(positive_duration)] = 86400.0
    fetch_timeout: Annotated[float, Parse(positive_duration)] = 5.0
    max_size: Annotated[int, Parse(parse_size)] = 1024 * 1024
    # At most one refetch per URL in this interval when a token names an unknown kid
    # (OIDC Core §10.1.1: a new kid is the IdP's signal of rotation).
    refetch_interval: Annotated[float, Parse(positive_duration)] = 30.0


@dataclass(frozen=True, slots=True)
class JwtTlsSettings:
    """``[app_auth_configs.jwt.tls]``: how the JWKS at ``jwks_url`` is verified."""

    ca_file: Annotated[str, Parse(string)] = ""  # "": the system trust store


@dataclass(frozen=True, slots=True)
class JwtSettings:
    issuer: Annotated[str, Parse(nonempty_str, required=True, missing="")]
    # `aud` must contain one of these, or (resource_audience) the resource URL of the app the
    # request is for, exactly as its protected resource metadata names it (RFC 8707 §2, MCP
    # authorization 2025-06-18+). A string or a list; at least one of the two (load.py).
    audience: Annotated[tuple[str, ...], Parse(one_or_more(nonempty_str))] = ()
    resource_audience: Annotated[bool, Parse(boolean)] = True
    jwks_url: Annotated[str | None, Parse(parse_http_url)] = None
    static_jwks: Annotated[str | None, Parse(jwks_json)] = None
    # algorithms before username_claim: fields are read (and their problems reported) in
    # this order.
    algorithms: Annotated[frozenset[str], Parse(jwt_algorithms)] = frozenset()
    # Tried in order: the first claim holding a non-empty string names the user.
    username_claim: Annotated[tuple[str, ...], Parse(one_or_more(nonempty_str))] = ("email",)
    # The token's `scope` (space-delimited) or `scp` (list) must hold all of them; else 403
    # insufficient_scope (RFC 6750 §3.1). Advertised as scopes_supported (RFC 9728).
    required_scopes: Annotated[tuple[str, ...], Parse(scope_list)] = ()
    max_token_age: Annotated[float, Parse(positive_duration)] = 1800.0
    leeway: Annotated[float, Parse(parse_duration)] = 60.0
    # [app_auth_configs.jwt.tls]: read by load.py's _parse_jwt (issue 13 §2).
    tls: JwtTlsSettings = field(default_factory=JwtTlsSettings)


@dataclass(frozen=True, slots=True)
class AppAuthConfig:
    name: str
    app_labels: LabelSelector
    jwt: JwtSettings
    source: str = "main"  # "main" or the file it came from


@dataclass(frozen=True, slots=True)
class HealthCheckSettings:
    type: Annotated[str, Parse(health_check_type)] = "tcp"  # "tcp" | "http" | "none"
    path: Annotated[str, Parse(url_path)] = "/"
    method: Annotated[str, Parse(http_method)] = "GET"
    expected_statuses: Annotated[frozenset[int], Parse(frozenset_of(http_status))] = frozenset(
        {200}
    )
    interval: Annotated[float, Parse(positive_duration)] = 10.0
    timeout: Annotated[float, Parse(positive_duration)] = 2.0
    healthy_threshold: Annotated[int, Parse(positive_int)] = 2
    unhealthy_threshold: Annotated[int, Parse(positive_int)] = 3
    # Passive: this many consecutive failures of real traffic eject a server for `ejection`,
    # doubling on each ejection in a row up to `max_ejection` (nginx max_fails, Envoy outlier).
    passive_failures: Annotated[int, Parse(positive_int)] = 3
    ejection: Annotated[float, Parse(positive_duration)] = 10.0
    max_ejection: Annotated[float, Parse(positive_duration)] = 300.0


@dataclass(frozen=True, slots=True)
class UpstreamAuthSettings:
    """``[apps.upstream_auth]``: a secret proxyd sends to the app's servers (issue 13). Only
    where it lives is configured; the secret itself is read by ``config.secrets`` at start and
    on every reload, and is never part of the settings (nor of a log line or an error)."""

    # "bearer": Authorization: Bearer <secret>; "header": <header>: <secret>.
    type: Annotated[str, Parse(upstream_auth_type)] = "bearer"
    header: Annotated[str | None, Parse(header_name)] = None
    # A systemd credential (LoadCredential=): $CREDENTIALS_DIRECTORY/<credential>.
    credential: Annotated[str | None, Parse(credential_name)] = None
    secret_file: Annotated[str | None, Parse(nonempty_str)] = None


@dataclass(frozen=True, slots=True)
class UpstreamTlsSettings:
    """``[apps.tls]``: how proxyd verifies (and authenticates to) the app's https servers;
    used by the pooled upstream client and the health checks (issue 13 §2)."""

    ca_file: Annotated[str, Parse(string)] = ""  # "": the system trust store
    cert_file: Annotated[str, Parse(string)] = ""  # client certificate (mTLS)
    key_file: Annotated[str, Parse(string)] = ""  # "": the key is in cert_file
    server_name: Annotated[str, Parse(string)] = ""  # SNI and verified name; "": the URL's host
    # No verification at all: allowed, warned at start and reload, shown in a metric.
    insecure_skip_verify: Annotated[bool, Parse(boolean)] = False


@dataclass(frozen=True, slots=True)
class AppSettings:
    name: str
    labels: Mapping[str, str]
    servers: tuple[str, ...]
    health_check: HealthCheckSettings = field(default_factory=HealthCheckSettings)
    upstream_auth: UpstreamAuthSettings | None = None
    tls: UpstreamTlsSettings = field(default_factory=UpstreamTlsSettings)


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
    # Also write audit events to this file (JSON lines).
    file: Annotated[str | None, Parse(nonempty_str), RESTART] = None
    # Otherwise only a hash of tools/call arguments.
    include_arguments: Annotated[bool, Parse(boolean)] = False
    # tools/list, resources/list, resources/templates/list, prompts/list and ping are
    # recorded only when they fail unless this is set (Teleport's skip list).
    list_methods: Annotated[bool, Parse(boolean)] = False


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where rate-limit buckets and verified sessions live: this process, or a shared Redis."""

    backend: Annotated[str, Parse(state_backend)] = "memory"  # "memory" | "redis"
    # redis://, rediss:// or unix://; may hold a password: never log it.
    url: Annotated[str | None, Parse(parse_redis_url)] = None
    # Per Redis operation: a slow Redis must cost a request at most this much, then the
    # configured fallback applies.
    timeout: Annotated[float, Parse(positive_duration)] = 0.25
    # With Redis down: "open" allows (no limit), "closed" answers 503, "local" limits with this
    # process's own buckets (each instance then allows the whole limit).
    limiter_failure: Annotated[str, Parse(limiter_failure_mode)] = "open"
    key_prefix: Annotated[str, Parse(redis_key_prefix)] = "proxyd:"
    # After a failure, Redis is left alone this long (requests use the fallback meanwhile);
    # then one request probes it.
    retry_interval: Annotated[float, Parse(positive_duration)] = 2.0

    @property
    def shared(self) -> bool:
        return self.backend == "redis"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """``[tracing]``: OpenTelemetry traces over OTLP/HTTP (issue 14 §1), off without an endpoint.

    The exporter (endpoint, headers, sampler, service name) is built once, at start
    (proxyd/tracing.py): those keys are restart-only. Who is trusted and whether the user is
    recorded apply from the next request after a reload.
    """

    otlp_endpoint: Annotated[str, Parse(otlp_base_url), RESTART] = ""  # "": tracing off
    # ParentBased(TraceIdRatioBased): a continued trace keeps its parent's decision.
    sample_ratio: Annotated[float, Parse(unit_ratio), RESTART] = 1.0
    service_name: Annotated[str, Parse(nonempty_str), RESTART] = "proxyd"
    # Sent with every export (a hosted collector's API key): a secret. Read by load.py's
    # _parse_tracing (each entry's problem named by its header); shown by name only.
    headers: Annotated[SecretHeaders, RESTART] = field(default_factory=SecretHeaders)
    # enduser.id on the server span: off, a trace backend is often wider open than the audit.
    include_user: Annotated[bool, Parse(boolean)] = False
    # Continue any client's traceparent, not only one from server.trusted_proxies.
    trust_client_context: Annotated[bool, Parse(boolean)] = False

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    # Restart-only as a whole: the admin listener is bound once, at start.
    admin: Annotated[AdminSettings, RESTART] = field(default_factory=AdminSettings)
    log: LogSettings = field(default_factory=LogSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    jwks: Annotated[JwksSettings, RESTART] = field(default_factory=JwksSettings)
    apps: tuple[AppSettings, ...] = ()
    app_auth_configs: tuple[AppAuthConfig, ...] = ()
    main_app_auth_configs: tuple[AppAuthConfig, ...] = ()  # those of the main file alone
    app_auth_config_dir: Annotated[str | None, Key("app_auth.config_dir"), RESTART] = None
    roles: tuple[RoleSettings, ...] = ()
    audit: AuditSettings = field(default_factory=AuditSettings)
    # The Redis connection, its fallbacks and key names are built once, at start.
    state: Annotated[StateSettings, RESTART] = field(default_factory=StateSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    path: str | None = None
    # What the file is worth a look for but does not refuse: (key path, message), e.g. a
    # certificate that expires soon. check-config prints them, `run` logs them (start, reload).
    warnings: tuple[tuple[str, str], ...] = field(default=(), compare=False)
