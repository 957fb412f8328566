"""TOML → Settings: the walker, the generic section reader, the cross-field rules, the
``config_dir`` load and merge, the entry points, and what a reload keeps (``in_force``).

Every problem is collected with its key path (``apps[1].servers[0]: not an http(s) URL``) so an
operator fixes a file in one pass. Unknown keys are errors: a typo must never pass silently.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from proxyd.auth.keys import KeySetError, parse_jwks
from proxyd.config.model import (
    AdminSettings,
    AppAuthConfig,
    AppSettings,
    AuditSettings,
    ConfigError,
    HealthCheckSettings,
    IdentitySettings,
    JwksSettings,
    JwtSettings,
    JwtTlsSettings,
    Key,
    LimitSettings,
    ListenerTlsSettings,
    LogSettings,
    Parse,
    RateLimitSettings,
    RestartOnly,
    RoleSettings,
    ServerSettings,
    SessionSettings,
    Settings,
    StateSettings,
    TracingSettings,
    UpstreamAuthSettings,
    UpstreamSettings,
    UpstreamTlsSettings,
)
from proxyd.config.secrets import SecretError, read_secret
from proxyd.config.values import (
    ItemErrors,
    SecretHeaders,
    config_name,
    label_selector,
    label_table,
    list_of,
    nonempty_str,
    optional_selector,
    parse_hostport,
    parse_http_url,
    secret_header,
    tool_entry,
    user_entry,
)
from proxyd.labels import LabelSelector
from proxyd.tls import TlsConfigError, client_context
from proxyd.upstream.wire import Origin

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")

# Typed empty defaults for _Table.get (a bare () or {} would make mypy infer T too narrowly).
_NO_STRS: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# The walker: typed access to a TOML table with problem collection.


class _Table:
    """A view of one TOML table that records problems and which keys were read."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        problems: list[str],
        warnings: list[tuple[str, str]] | None = None,
    ) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        # (key path, message): worth a look, not a refusal. Shared by a table's children.
        self.warnings: list[tuple[str, str]] = [] if warnings is None else warnings
        self._seen: set[str] = set()
        # Keys whose value was reported as invalid (a later check may depend on one).
        self.failed: set[str] = set()

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
        except ItemErrors as exc:
            self.failed.add(key)
            # One problem per bad item, with its own path: ``apps[1].servers[0]: …``.
            for index, message in exc.items:
                self.problems.append(f"{self._key(key)}[{index}]: {message}")
            return default
        except ValueError as exc:
            self.failed.add(key)
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
        return _Table(value, self._key(key), self.problems, self.warnings)

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
            yield _Table(item, where, self.problems, self.warnings)

    def mark(self, *keys: str) -> None:
        self._seen.update(keys)

    @contextmanager
    def closed(self) -> Iterator[_Table]:
        """Report every key of this table that no reader asked for."""
        yield self
        for key in self.data:
            if key not in self._seen:
                self.problem(key, "unknown key")


# ---------------------------------------------------------------------------------------------
# The generic section reader, driven by the model's annotations.


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str  # the TOML key (or dotted key, for a restart-only one)
    parse: Parse | None
    restart_only: bool
    section: type | None  # the dataclass this field holds, if it holds one
    default: Any  # dataclasses.MISSING when there is none


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        meta = getattr(hint, "__metadata__", ())
        base = typing.get_args(hint)[0] if meta else hint
        parse = next((m for m in meta if isinstance(m, Parse)), None)
        key = next((m.name for m in meta if isinstance(m, Key)), f.name)
        section = base if isinstance(base, type) and dataclasses.is_dataclass(base) else None
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif default is dataclasses.MISSING and parse is not None:
            default = parse.missing
        restart = any(isinstance(m, RestartOnly) for m in meta)
        out.append(_Field(f.name, key, parse, restart, section, default))
    return tuple(out)


def read_section(t: _Table, cls: type[D], base: D | None = None, **given: Any) -> D:
    """Read ``t`` into ``cls``, field by field in declaration order (the order problems are
    reported in), then report its unknown keys.

    A field with ``Parse`` is read from its key and falls back to its default when absent or
    invalid. That default is ``given[name]``, else ``base``'s value (``limits.per_user`` has
    its own defaults), else the model's. A field without ``Parse`` takes ``given[name]``: its
    section's reader has read it (keys it read before this call count as known).
    """
    values: dict[str, Any] = {}
    with t.closed():
        for f in _fields(cls):
            if f.name in given:
                default = given[f.name]
            elif base is not None:
                default = getattr(base, f.name)
            else:
                default = f.default
            if f.parse is None:
                values[f.name] = default
            elif f.parse.required:
                values[f.name] = t.require(f.key, f.parse.fn, default)
            else:
                values[f.name] = t.get(f.key, f.parse.fn, default)
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Sections: what the generic reader cannot say (defaults derived from another key, tables of
# tables, lists of tables) and the cross-field rules.


def _parse_server(t: _Table) -> ServerSettings:
    d = ServerSettings()
    host, port = t.get("listen", parse_hostport, (d.listen_host, d.listen_port))
    tls = _parse_listener_tls(t)
    server = read_section(
        t,
        ServerSettings,
        listen_host=host,
        listen_port=port,
        public_url=f"{'https' if tls else 'http'}://{_netloc(host, port)}",
        tls=tls,
    )
    if server.max_header_size < 1024:
        t.problem("max_header_size", "must be at least 1KiB")
    return server


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_admin(t: _Table) -> AdminSettings:
    d = AdminSettings()
    host, port = t.get("listen", parse_hostport, (d.listen_host, d.listen_port))
    tls = _parse_listener_tls(t)
    return read_section(t, AdminSettings, listen_host=host, listen_port=port, tls=tls)


def _parse_listener_tls(parent: _Table) -> ListenerTlsSettings | None:
    """``[server.tls]`` / ``[admin.tls]``: absent is plain HTTP. The files are checked here,
    so check-config, the start and a reload all refuse a pair that does not load (proxyd/tls.py);
    the warnings (expiry near, a key others can read) go to ``Settings.warnings``."""
    if "tls" not in parent.data:
        parent.mark("tls")
        return None
    t = parent.table("tls")
    tls = read_section(t, ListenerTlsSettings)
    if tls.cert_file and tls.key_file and not t.failed:
        from proxyd import tls as tls_files  # (cryptography: only when used)

        errors, warnings = tls_files.check_files(
            tls_files.TLSFiles(tls.cert_file, tls.key_file, tls.min_version, tls.client_ca_file)
        )
        for message in errors:
            t.problem(None, message)
        for message in warnings:
            t.warnings.append((t.path, message))
    return tls


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
    limit = read_section(t, RateLimitSettings, d)
    if limit.ipv6_prefix > 128:
        t.problem("ipv6_prefix", "at most 128")
    return limit


def _parse_identity(t: _Table) -> IdentitySettings:
    settings = read_section(t, IdentitySettings)
    if settings.ttl > 600:
        t.problem("ttl", "at most 10m: the assertion is a short-lived credential")
    return settings


def _parse_jwks(t: _Table) -> JwksSettings:
    s = read_section(t, JwksSettings)
    if s.min_ttl > s.max_ttl:
        t.problem("min_ttl", "must not exceed max_ttl")
    return s


def _parse_apps(root: _Table) -> tuple[AppSettings, ...]:
    apps: list[AppSettings] = []
    names: set[str] = set()
    for t in root.tables("apps"):
        with t.closed():
            name = t.require("name", config_name, "")
            labels: dict[str, str] = t.get("labels", label_table, {})
            servers = t.require("servers", list_of(parse_http_url), _NO_STRS)
            health = _parse_health(t.table("health_check"))
            tls = _parse_upstream_tls(t.table("tls"))
            upstream_auth = None
            if "upstream_auth" in t.data:
                auth_table = t.table("upstream_auth")
                if isinstance(t.data["upstream_auth"], Mapping):
                    upstream_auth = _parse_upstream_auth(auth_table, name)
        # Only an empty list: when items were invalid, `servers` is the () default and the
        # item problems are already reported (claiming "none given" would be wrong).
        if t.data.get("servers") == []:
            t.problem("servers", "at least one server is required")
        if name and name in names:
            t.problem("name", f"duplicate app name {name!r}")
        names.add(name)
        apps.append(
            AppSettings(
                name=name,
                labels=labels,
                servers=servers,
                health_check=health,
                upstream_auth=upstream_auth,
                tls=tls,
            )
        )
    _check_shared_servers(root, apps)
    return tuple(apps)


def _parse_upstream_tls(t: _Table) -> UpstreamTlsSettings:
    """``[apps.tls]``: the files must exist and load (check-config catches a bad PEM)."""
    before = len(t.problems)
    tls = read_section(t, UpstreamTlsSettings)
    if len(t.problems) == before:
        _check_tls_files(t, tls.ca_file, tls.cert_file, tls.key_file, tls.insecure_skip_verify)
    return tls


def _check_tls_files(
    t: _Table, ca_file: str, cert_file: str = "", key_file: str = "", insecure: bool = False
) -> None:
    try:
        client_context(ca_file, cert_file, key_file, insecure)
    except TlsConfigError as exc:
        t.problem(exc.key, str(exc))


def _check_shared_servers(root: _Table, apps: list[AppSettings]) -> None:
    # Connections are pooled, and TLS profiles chosen, per origin (scheme, host, port: the
    # pool's Origin.key), not per URL: two URLs on one origin in two apps need one TLS setting,
    # or one app's verification would silently be the other's.
    seen: dict[str, AppSettings] = {}
    for index, app in enumerate(apps):
        for server in app.servers:
            if not server.startswith("https://"):
                continue
            other = seen.setdefault(Origin.parse(server).key, app)
            if other is not app and other.tls != app.tls:
                root.problem(
                    f"apps[{index}].tls",
                    f"server {server} is also in app {other.name!r} (the same scheme, host and"
                    " port) with other TLS settings",
                )


# Lines of an upstream request proxyd itself writes (framing, hop-by-hop, forwarding, MCP).
_PROXYD_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "content-type",
        "keep-alive",
        "mcp-session-id",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-forwarded-host",
        "x-forwarded-proto",
    }
)


def _parse_upstream_auth(t: _Table, app: str) -> UpstreamAuthSettings | None:
    """``[apps.upstream_auth]``; its secret is read now, so a missing or empty one is a
    problem of this file (check-config, start, reload), named by key, never shown."""
    before = len(t.problems)
    auth = read_section(t, UpstreamAuthSettings)
    if auth.type == "header" and "header" not in t.data:
        t.problem("header", 'required with type = "header"')
    if auth.header is not None and auth.header.lower() in _PROXYD_HEADERS:
        t.problem("header", f"{auth.header} is set by proxyd or the HTTP framing")
    if auth.type == "bearer" and "header" in t.data:
        t.problem("header", 'only used with type = "header" (bearer uses Authorization)')
    if ("credential" in t.data) == ("secret_file" in t.data):
        t.problem(None, "exactly one of credential or secret_file is required")
    if len(t.problems) > before:
        return None
    try:
        read_secret(auth)
    except SecretError as exc:
        t.problem(exc.key, f"app {app!r}: {exc}")
    return auth


def _parse_health(t: _Table) -> HealthCheckSettings:
    h = read_section(t, HealthCheckSettings)
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
        name = t.require("name", config_name, "")
        selector = t.require("app_labels", label_selector, LabelSelector(()))
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


def _parse_roles(root: _Table) -> tuple[RoleSettings, ...]:
    roles: list[RoleSettings] = []
    names: set[str] = set()
    for t in root.tables("roles"):
        with t.closed():
            name = t.require("name", config_name, "")
            users = t.get("users", list_of(user_entry), _NO_STRS)
            claims = t.get("claims", optional_selector, None)
            app_labels = t.get("app_labels", optional_selector, None)
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
        return t.get("tools", list_of(tool_entry), _NO_STRS)


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
    tt = t.table("tls")
    with tt.closed():
        before = len(tt.problems)
        jwt_tls = read_section(tt, JwtTlsSettings)
        if len(tt.problems) == before and jwt_tls.ca_file:
            _check_tls_files(tt, jwt_tls.ca_file)
    settings = read_section(t, JwtSettings, tls=jwt_tls)
    has_url, has_static = "jwks_url" in t.data, "static_jwks" in t.data
    if has_url == has_static:
        t.problem(None, "exactly one of jwks_url or static_jwks is required")
    if settings.leeway > 300:
        t.problem("leeway", "at most 5m")
    if not settings.audience and not settings.resource_audience and "audience" not in t.failed:
        t.problem(None, "accepts no audience: set audience, or leave resource_audience = true")
    if settings.static_jwks is not None and "algorithms" not in t.failed:
        # Check the keys with the config's own algorithms, exactly as AppAuthStore will parse
        # them: keys without an "alg" are usable once `algorithms` is set, and a key set that
        # `algorithms` filters down to nothing must fail here, not crash the daemon at start.
        _check_static_jwks(t, settings.static_jwks, settings.algorithms)
    return settings


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


def _parse_tracing(t: _Table) -> TracingSettings:
    raw = t.get("headers", _table, _NO_HEADERS)
    pairs: list[tuple[str, str]] = []
    for name, value in raw.items():
        try:
            pairs.append(secret_header(str(name), value))
        except ValueError as exc:
            # The header's name is in the message; its value (a secret) never is.
            t.failed.add("headers")
            t.problem("headers", str(exc))
    return read_section(t, TracingSettings, headers=SecretHeaders(tuple(pairs)))


_NO_HEADERS: Mapping[str, object] = {}


def _table(value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError('expected a table of header = "value"')
    return value


def _parse_app_auth_section(t: _Table) -> str | None:
    with t.closed():
        return t.get("config_dir", nonempty_str, None)


def _parse_state(t: _Table) -> StateSettings:
    state = read_section(t, StateSettings)
    if state.backend == "redis" and "url" not in t.data:
        t.problem("url", 'required with backend = "redis"')
    if state.backend == "memory" and "url" in t.data:
        t.problem("url", 'only used with backend = "redis"')
    if state.timeout > 10:
        t.problem("timeout", "at most 10s: every request may wait this long for Redis")
    return state


# ---------------------------------------------------------------------------------------------
# Files, directories and the entry points.


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
        log = read_section(root.table("log"), LogSettings)
        limit = _parse_limits(root.table("limits"))
        sessions = read_section(root.table("sessions"), SessionSettings)
        upstream = read_section(root.table("upstream"), UpstreamSettings)
        identity = _parse_identity(root.table("identity"))
        jwks = _parse_jwks(root.table("jwks"))
        apps = _parse_apps(root)
        main_configs = _parse_main_app_auth_configs(root)
        config_dir = _parse_app_auth_section(root.table("app_auth"))
        roles = _parse_roles(root)
        audit = read_section(root.table("audit"), AuditSettings)
        state = _parse_state(root.table("state"))
        tracing = _parse_tracing(root.table("tracing"))
    for index, app in enumerate(apps):
        auth = app.upstream_auth
        if auth is not None and auth.header and auth.header.lower() == identity.header.lower():
            problems.append(
                f"apps[{index}].upstream_auth.header: {auth.header} is identity.header "
                "(the identity assertion would be replaced)"
            )
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
        tracing=tracing,
        path=path,
        warnings=tuple(root.warnings),
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


# ---------------------------------------------------------------------------------------------
# Reload: what a running process keeps. Computed from the model's RESTART markers, so a field
# cannot be restart-only for one purpose and reloadable for the other.


def _restart_only_paths(
    cls: type, prefix: str = "", path: tuple[str, ...] = ()
) -> dict[str, list[tuple[str, ...]]]:
    """Dotted key → the attribute paths it covers (``server.listen`` covers two fields)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for f in _fields(cls):
        if f.restart_only:
            out.setdefault(prefix + f.key, []).append((*path, f.name))
        elif f.section is not None:
            for key, paths in _restart_only_paths(
                f.section, f"{prefix}{f.key}.", (*path, f.name)
            ).items():
                out.setdefault(key, []).extend(paths)
    return out


def _getter(paths: list[tuple[str, ...]]) -> Callable[[Settings], Any]:
    def value(settings: Settings, path: tuple[str, ...]) -> Any:
        return functools.reduce(getattr, path, settings)

    if len(paths) == 1:
        return lambda s: value(s, paths[0])
    return lambda s: tuple(value(s, path) for path in paths)


# Settings a running process cannot change (reload keeps the values it started with).
RESTART_ONLY: dict[str, Callable[[Settings], Any]] = {
    key: _getter(paths) for key, paths in _restart_only_paths(Settings).items()
}


@functools.cache
def _holds_restart_only(cls: type) -> bool:
    return any(
        f.restart_only or (f.section is not None and _holds_restart_only(f.section))
        for f in _fields(cls)
    )


def _keep_restart_only(new: D, boot: D) -> D:
    changes: dict[str, Any] = {}
    for f in _fields(type(new)):
        if f.restart_only:
            changes[f.name] = getattr(boot, f.name)
        elif f.section is not None and _holds_restart_only(f.section):
            changes[f.name] = _keep_restart_only(getattr(new, f.name), getattr(boot, f.name))
    return dataclasses.replace(new, **changes) if changes else new


def in_force(new: Settings, boot: Settings) -> Settings:
    """The new settings with the restart-only values of the running process, so nothing is
    half applied (e.g. a 431 limit above what aiohttp's parser was built with)."""
    return _keep_restart_only(new, boot)
