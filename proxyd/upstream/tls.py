"""Client TLS to app servers (``[apps.tls]``) and JWKS URLs (``[app_auth_configs.jwt.tls]``):
one ``ssl.SSLContext`` per settings, built on start and on every reload (issue 13 §2).

``TlsConfigError`` names the key at fault, so that check-config reports a missing file, a key
without a certificate or a PEM that does not load under its own key path.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from proxyd.config.model import AppSettings, UpstreamTlsSettings
from proxyd.upstream.wire import Origin


class TlsConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class TlsProfile:
    """How to connect to one app server over TLS."""

    context: ssl.SSLContext
    server_name: str | None  # SNI and the name verified; None: the URL's host
    insecure: bool  # insecure_skip_verify


def _readable(key: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise TlsConfigError(key, f"no such file: {path}")
    if not p.is_file():
        raise TlsConfigError(key, f"not a file: {path}")
    if not os.access(p, os.R_OK):
        raise TlsConfigError(key, f"not readable: {path}")


def _has_certificate(path: str) -> bool:
    try:
        return b"-----BEGIN CERTIFICATE-----" in Path(path).read_bytes()
    except OSError:
        return False


def client_context(
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    insecure_skip_verify: bool = False,
) -> ssl.SSLContext:
    """A client context: verified against ``ca_file`` (else the system's CAs), with a client
    certificate when ``cert_file`` is set. Raises TlsConfigError naming the key at fault."""
    if key_file and not cert_file:
        raise TlsConfigError("key_file", "requires cert_file")
    for key, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path:
            _readable(key, path)
    if insecure_skip_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file:
        # Only this CA: a private CA replaces the system's store, it does not add to it.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise TlsConfigError("ca_file", f"no CA certificate loads from it: {exc}") from None
    else:
        context = ssl.create_default_context()
    if cert_file:
        if not _has_certificate(cert_file):
            raise TlsConfigError("cert_file", "no PEM certificate in it")
        try:
            context.load_cert_chain(cert_file, key_file or None)
        except (ssl.SSLError, ValueError) as exc:
            key = "key_file" if key_file else "cert_file"
            raise TlsConfigError(
                key, f"the private key does not load or does not match cert_file: {exc}"
            ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context


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
