"""Value parsers: each takes a TOML value and returns the parsed value or raises ValueError with
a short message (the walker in ``load.py`` prefixes it with the key path).

The model (``model.py``) names one of these per field; none of them knows its key or section.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from proxyd.auth.keys import ASYMMETRIC_ALGORITHMS
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


def string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def nonempty_str(value: object) -> str:
    text = string(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def one_or_more(parse: Callable[[object], T]) -> Callable[[object], tuple[T, ...]]:
    """A string or a list of them (``audience = "a"`` or ``["a", "b"]``); order kept, repeats
    dropped. An empty list is refused: leave the key out instead."""
    parse_list = list_of(parse)

    def parse_one_or_more(value: object) -> tuple[T, ...]:
        if isinstance(value, str):
            return (parse(value),)
        if not isinstance(value, list) or not value:
            raise ValueError("expected a string or a non-empty list of strings")
        return tuple(dict.fromkeys(parse_list(value)))

    return parse_one_or_more


_SCOPE_RE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]+$")


def scope_token(value: object) -> str:
    """One OAuth scope token (RFC 6749 §3.3: printable ASCII without space, '"' and '\\')."""
    text = string(value)
    if not _SCOPE_RE.fullmatch(text):
        raise ValueError("not an OAuth scope token (no spaces, quotes or backslashes)")
    return text


def scope_list(value: object) -> tuple[str, ...]:
    """A list of scope tokens, order kept, repeats dropped."""
    return tuple(dict.fromkeys(list_of(scope_token)(value)))


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def positive_int(value: object) -> int:
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


def non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected an integer, 0 or more")
    return value


def positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def config_name(value: object) -> str:
    text = string(value)
    if not _NAME_RE.fullmatch(text):
        raise ValueError("names are 1-63 characters of letters, digits, '.', '_' and '-'")
    return text


class ItemErrors(ValueError):
    """Problems of individual list items; _Table.get reports each as ``key[index]: message``."""

    def __init__(self, items: list[tuple[int, str]]) -> None:
        super().__init__("; ".join(f"[{index}]: {message}" for index, message in items))
        self.items = items


def list_of(parse: Callable[[object], T]) -> Callable[[object], tuple[T, ...]]:
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
            raise ItemErrors(errors)
        return tuple(out)

    return parse_list


def cidr(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError('expected a CIDR such as "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not a CIDR: {value!r}") from None


def label_table(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError('expected a table of label = "value"')
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise ValueError(f"label {key!r}: value must be a string")
        out[str(key)] = item
    return out


def label_selector(value: object) -> LabelSelector:
    if not isinstance(value, Mapping):
        raise ValueError("expected a table of label = value | [values]")
    try:
        return parse_selector(value)
    except SelectorError as exc:
        raise ValueError(str(exc)) from None


def log_level(value: object) -> str:
    text = string(value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError("one of debug, info, warning, error")
    return text


def log_format(value: object) -> str:
    text = string(value).lower()
    if text not in ("json", "console", "auto"):
        raise ValueError("one of json, console, auto")
    return text


def header_name(value: object) -> str:
    text = string(value)
    if not _HEADER_NAME_RE.fullmatch(text):
        raise ValueError("not a valid HTTP header name")
    if text.lower() in ("authorization", "host", "cookie", "x-forwarded-for"):
        raise ValueError(f"{text} is reserved")
    return text


def jwt_algorithms(value: object) -> frozenset[str]:
    names = list_of(string)(value)
    bad = sorted(set(names) - ASYMMETRIC_ALGORITHMS)
    if bad:
        raise ValueError(
            f"not allowed: {', '.join(bad)} (only {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
        )
    return frozenset(names)


def aes_key(value: object) -> bytes:
    text = string(value)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (generate one with: openssl rand -base64 32)") from None
    if len(key) != 32:
        raise ValueError(f"must be 32 bytes (AES-256), got {len(key)}")
    return key


def upstream_auth_type(value: object) -> str:
    text = string(value)
    if text not in ("bearer", "header"):
        raise ValueError("one of bearer, header")
    return text


def credential_name(value: object) -> str:
    """A systemd credential's name: one file name inside $CREDENTIALS_DIRECTORY."""
    text = nonempty_str(value)
    if "/" in text or "\0" in text or text in (".", ".."):
        raise ValueError("a credential name is a file name (no '/')")
    return text


def health_check_type(value: object) -> str:
    text = string(value)
    if text not in ("tcp", "http", "none"):
        raise ValueError("one of tcp, http, none")
    return text


def http_status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError("expected an HTTP status code (100-599)")
    return value


def url_path(value: object) -> str:
    text = string(value)
    if not text.startswith("/"):
        raise ValueError("must start with /")
    return text


def tool_entry(value: object) -> str:
    text = nonempty_str(value)
    if text.startswith("^") and text.endswith("$"):
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"bad regular expression {text!r}: {exc}") from None
    return text


def user_entry(value: object) -> str:
    return tool_entry(value)


def optional_selector(value: object) -> LabelSelector | None:
    return label_selector(value)


def jwks_json(value: object) -> str:
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


def state_backend(value: object) -> str:
    text = string(value)
    if text not in ("memory", "redis"):
        raise ValueError("one of memory, redis")
    return text


def limiter_failure_mode(value: object) -> str:
    text = string(value)
    if text not in ("open", "closed", "local"):
        raise ValueError("one of open, closed, local")
    return text


def redis_key_prefix(value: object) -> str:
    text = string(value)
    if len(text) > 64 or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("at most 64 printable characters without spaces")
    return text


def base_url(value: object) -> str:
    """``server.public_url``: an http(s) URL, kept without a trailing slash."""
    return parse_http_url(value).rstrip("/")


def http_method(value: object) -> str:
    return nonempty_str(value).upper()


def frozenset_of(parse: Callable[[object], T]) -> Callable[[object], frozenset[T]]:
    """A list whose order and repeats do not matter (each bad item still reported by index)."""
    parse_list = list_of(parse)

    def parse_set(value: object) -> frozenset[T]:
        return frozenset(parse_list(value))

    return parse_set


def tls_min_version(value: object) -> str:
    """``server.tls.min_version`` / ``admin.tls.min_version``."""
    text = string(value)
    if text not in ("1.2", "1.3"):
        raise ValueError('one of "1.2", "1.3"')
    return text


# ---------------------------------------------------------------------------------------------
# [tracing] (issue 14 §1)


def otlp_base_url(value: object) -> str:
    """``tracing.otlp_endpoint``: the OTLP/HTTP base URL (spans go to ``<it>/v1/traces``), kept
    without a trailing slash; "" leaves tracing off."""
    if value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError('expected an http(s) URL such as "http://127.0.0.1:4318"')
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            'expected an http:// or https:// URL (OTLP/HTTP) such as "http://127.0.0.1:4318"'
        )
    try:
        parts.port  # noqa: B018 - ValueError when not a number in 0-65535
    except ValueError:
        raise ValueError("not a valid port") from None
    if parts.username or parts.password:
        raise ValueError("credentials in URLs are not allowed (they would reach logs); use headers")
    if parts.query or parts.fragment:
        raise ValueError("the base URL takes no query or fragment")
    base = value.rstrip("/")
    if base.endswith("/v1/traces"):
        raise ValueError("give the collector's base URL: proxyd appends /v1/traces")
    return base


def unit_ratio(value: object) -> float:
    """A probability: a number from 0 to 1 (``tracing.sample_ratio``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError("expected a number from 0 to 1")
    if not 0 <= value <= 1:
        raise ValueError("expected a number from 0 to 1")
    return float(value)


class SecretHeaders:
    """Headers holding a secret (``tracing.headers``: a hosted collector's API key). Compared by
    value (a change is a restart-only change like any other), shown by name only: a settings
    repr, a log line or an error never carries a value."""

    __slots__ = ("_items",)

    def __init__(self, items: tuple[tuple[str, str], ...] = ()) -> None:
        self._items = items

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretHeaders) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"SecretHeaders({', '.join(name for name, _ in self._items)})"

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._items)

    def reveal(self) -> dict[str, str]:
        """The values, for the exporter alone."""
        return dict(self._items)


# What the OTLP exporter writes itself: a configured one would break the request.
_EXPORTER_HEADERS = frozenset(
    {"content-type", "content-length", "content-encoding", "transfer-encoding", "host"}
)
_HEADER_VALUE_RE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def secret_header(name: str, value: object) -> tuple[str, str]:
    """One ``tracing.headers`` entry; a message names the header, never quotes the value."""
    # fullmatch: "$" also matches before a final newline, which would end a header line.
    if not _HEADER_NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name")
    if name.lower() in _EXPORTER_HEADERS:
        raise ValueError(f"{name} is set by the exporter itself")
    if not isinstance(value, str):
        raise ValueError(f"{name}: the value must be a string")
    if len(value) > 8192 or not _HEADER_VALUE_RE.fullmatch(value):
        # RFC 9110 §5.5: visible ASCII, inner spaces; no CR/LF (header injection), no
        # leading or trailing whitespace. The value is a secret: never quoted.
        raise ValueError(
            f"{name}: the value must be 1 to 8192 visible ASCII characters (inner spaces "
            "allowed); the value is not shown"
        )
    return name, value
