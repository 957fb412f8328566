"""Who is the client: the peer, or the right-most untrusted X-Forwarded-For hop when the peer
is a trusted proxy. A spoofed X-Forwarded-For from an untrusted peer changes nothing."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ClientView:
    address: str  # the client's IP as proxyd believes it
    forwarded_for: str  # the X-Forwarded-For chain to send upstream
    proto: str
    host: str


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from an X-Forwarded-For hop: bare, ``[v6]``, ``v4:port`` or ``[v6]:port``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # IPv4 with a port (some proxies append one)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            # "fe80::1%<anything>" parses, zone and all: a zone means nothing beyond the hop
            # that wrote it, and kept it made an unbounded limiter key (issue 10).
            return None
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
    return addr


def is_trusted(address: str | None, trusted: Sequence[Network]) -> bool:
    if not trusted or address is None:
        return False
    addr = _ip(address)
    return addr is not None and any(addr in net for net in trusted)


def client_view(
    peer: str | None,
    *,
    xff: str | None,
    xfp: str | None,
    xfh: str | None,
    scheme: str,
    host: str,
    trusted: Sequence[Network],
) -> ClientView:
    peer_text = peer or "unknown"
    if not is_trusted(peer, trusted):
        return ClientView(peer_text, peer_text, scheme, host)
    hops = [h.strip() for h in xff.split(",")] if xff else []
    hops = [h for h in hops if h]
    client = peer_text
    # Walk right to left: the first hop that is not one of our proxies is the client. A hop
    # that is not an address ends the walk at the last address seen (the trusted proxy's own
    # when none): the client's key for the limiter and the audit is always an address, never
    # 12 KB of whatever a client wrote (issue 10).
    for hop in reversed(hops):
        parsed = _ip(hop)
        if parsed is None:
            break
        # The normalized address, so "198.51.100.7:5555" or "[2001:db8::1]" cannot become a
        # fresh rate-limit key per connection.
        client = str(parsed)
        if not any(parsed in net for net in trusted):
            break
    chain = ", ".join([*hops, peer_text])
    proto = xfp.split(",")[0].strip().lower() if xfp else scheme
    if proto not in ("http", "https"):
        proto = scheme
    return ClientView(client, chain, proto, (xfh.split(",")[0].strip() if xfh else host) or host)
