"""Client TLS to app servers (``[apps.tls]``): one profile per settings, built on start and on
every reload (issue 13 §2). The contexts themselves are ``proxyd.tls.client_context``'s.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from proxyd.config.model import AppSettings, UpstreamTlsSettings
from proxyd.tls import client_context
from proxyd.upstream.wire import Origin


@dataclass(frozen=True, slots=True)
class TlsProfile:
    """How to connect to one app server over TLS."""

    context: ssl.SSLContext
    server_name: str | None  # SNI and the name verified; None: the URL's host
    insecure: bool  # insecure_skip_verify


def profile(tls: UpstreamTlsSettings) -> TlsProfile:
    context = client_context(tls.ca_file, tls.cert_file, tls.key_file, tls.insecure_skip_verify)
    return TlsProfile(context, tls.server_name or None, tls.insecure_skip_verify)


def app_profiles(apps: Iterable[AppSettings]) -> dict[str, TlsProfile]:
    """Origin key → profile for every https server of an app with ``[apps.tls]`` settings
    (the others use the client's default: the system's CAs)."""
    out: dict[str, TlsProfile] = {}
    default = UpstreamTlsSettings()
    for app in apps:
        if app.tls == default:
            continue
        servers = [Origin.parse(s) for s in app.servers if s.startswith("https://")]
        if not servers:
            continue
        made = profile(app.tls)
        for origin in servers:
            out[origin.key] = made
    return out


def insecure_apps(apps: Iterable[AppSettings]) -> list[str]:
    return [app.name for app in apps if app.tls.insecure_skip_verify]
