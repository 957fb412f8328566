"""What goes out: an app server's URL parsed once (``Origin``) and the request head as bytes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from yarl import URL

from proxyd.errors import UpstreamError


def _host_header(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:  # an IPv6 literal, bracketed as in the URI (RFC 9110 §7.2, RFC 3986 §3.2.2)
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


@dataclass(frozen=True, slots=True)
class Origin:
    """One app server URL, parsed once."""

    key: str  # scheme://host:port: the pool it belongs to
    host: str
    port: int
    tls: bool
    host_header: str
    path: str  # the raw path of the target URL, never re-encoded
    query: str  # the target URL's own raw query ("" if none), e.g. a tenant parameter
    label: str  # host[:port] for messages

    @classmethod
    def parse(cls, target: str) -> Origin:
        url = URL(target)
        if url.scheme not in ("http", "https") or not url.raw_host or url.port is None:
            raise ValueError(f"not an http(s) URL: {target!r}")
        host_header = _host_header(url)
        return cls(
            key=f"{url.scheme}://{host_header}",
            host=url.raw_host,
            port=url.port,
            tls=url.scheme == "https",
            host_header=host_header,
            path=url.raw_path or "/",
            query=url.raw_query_string,
            label=target.split("/")[2],
        )


def request_head(
    method: str,
    origin: Origin,
    raw_query: str,
    headers: Iterable[tuple[str, str]],
    framing: str,
) -> bytes:
    """The request line and fields (RFC 9112 §3, §5); ``framing`` is the body's own field.

    A CR or LF in a field would split it into two (request smuggling): refused, as aiohttp's
    writer refused it before.
    """
    if method in ("HEAD", "CONNECT"):
        # llhttp cannot be told that an answer to HEAD has no body; CONNECT is no proxy's job.
        raise ValueError(f"{method} is not forwarded")
    # The configured URL's own query first, then the client's (RFC 3986 §3.4 leaves the
    # joining to the application; "&" is what form-style queries, the common case, expect).
    query = "&".join(q for q in (origin.query, raw_query) if q)
    target = f"{origin.path}?{query}" if query else origin.path
    fields = [f"{name}: {value}\r\n" for name, value in headers]
    block = "".join(fields)
    # Exactly one CRLF per field: anything more came from a name or a value. (The target is
    # the configured path and the client's raw query, which aiohttp's parser already bounded.)
    if block.count("\n") != len(fields) or block.count("\r") != len(fields):
        raise UpstreamError("request header contains a line break", reason="bad_request_header")
    head = f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n{block}{framing}\r\n"
    return head.encode("utf-8", "surrogateescape")
