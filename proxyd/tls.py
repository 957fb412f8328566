"""TLS on proxyd's own listeners (issue 13 §1): the server context, its reload, the checks.

One ``ssl.SSLContext`` per listener for the process's life. A reload (SIGHUP) first loads the
certificate and key into a scratch context — a file that does not parse, or a key that does
not match the certificate, fails there and the pair in force stays — and only then into the
live context (``load_cert_chain`` again, in place): each new handshake uses the new pair, the
connections already established (SSE streams included) keep theirs.

``check_files`` is what ``check-config`` (every load of the file) adds: the pair loads and
matches, the chain is in order (leaf first, each certificate signed by the next one's
subject), the leaf has not expired (an error) and does not expire within 14 days (a warning),
and the key is readable by its owner only (a warning otherwise).

``client_context`` is the client side (app servers' ``[apps.tls]``, JWKS URLs' ``tls``): a
context verified against a CA file or the system's, with a client certificate for mTLS.
``TlsConfigError`` names the key at fault, so that check-config reports a missing file, a key
without a certificate or a PEM that does not load under its own key path. Nothing here
imports the configuration, which validates its TLS keys with it.
"""

from __future__ import annotations

import itertools
import os
import ssl
import stat
import time
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Final

from cryptography import x509

EXPIRY_WARNING_DAYS: Final = 14
ALPN: Final = ("http/1.1",)


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """What a ``[server.tls]`` / ``[admin.tls]`` table names (the model's ListenerTLSSettings
    has these fields)."""

    cert_file: str
    key_file: str
    min_version: str = "1.2"
    client_ca_file: str = ""


class TLSError(Exception):
    pass


def _versions() -> dict[str, ssl.TLSVersion]:
    return {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _context(files: TLSFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _versions()[files.min_version]
    ctx.set_alpn_protocols(list(ALPN))
    _load_pair(ctx, files)
    if files.client_ca_file:
        try:
            ctx.load_verify_locations(cafile=files.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(f"client_ca_file {files.client_ca_file}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load_pair(ctx: ssl.SSLContext, files: TLSFiles) -> None:
    try:
        ctx.load_cert_chain(files.cert_file, files.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(
            f"cert_file {files.cert_file} / key_file {files.key_file}: {_reason(exc)}"
        ) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc):
        return "the key does not match the certificate"
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        return exc.strerror or str(exc)
    return getattr(exc, "reason", None) or str(exc)


class ServerTLS:
    """A listener's TLS: its live context, reloaded in place, and its leaf's expiry."""

    def __init__(self, name: str, files: TLSFiles) -> None:
        self.name = name
        self.files = files
        self.context = _context(files)
        self.not_after = leaf_not_after(files.cert_file)

    def verify(self) -> None:
        """TLSError when the files on disk do not load or do not match (nothing changes)."""
        _context(self.files)

    def reload(self) -> None:
        """Re-read the pair; TLSError (and nothing changed) when it does not load or match."""
        _context(self.files)  # the scratch load: fails before the live context is touched
        not_after = leaf_not_after(self.files.cert_file)
        _load_pair(self.context, self.files)
        self.not_after = not_after


def read_chain(cert_file: str) -> list[x509.Certificate]:
    try:
        with open(cert_file, "rb") as f:
            data = f.read()
        certs = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError) as exc:
        raise TLSError(f"cert_file {cert_file}: {_reason(exc)}") from None
    return certs


def leaf_not_after(cert_file: str) -> float:
    """The leaf certificate's notAfter, in Unix seconds."""
    return read_chain(cert_file)[0].not_valid_after_utc.timestamp()


def check_files(files: TLSFiles, now: float | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the files, each a sentence naming the file."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        _context(files)
        chain = read_chain(files.cert_file)
    except TLSError as exc:
        return [str(exc)], []
    for index, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        if cert.issuer != issuer.subject:
            errors.append(
                f"cert_file {files.cert_file}: the chain is out of order (certificate "
                f"{index + 1} is not issued by certificate {index + 2}); the leaf comes first, "
                "then each issuer"
            )
            break
    now = time.time() if now is None else now
    not_after = chain[0].not_valid_after_utc
    left = not_after.timestamp() - now
    when = not_after.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if left <= 0:
        errors.append(f"cert_file {files.cert_file}: the certificate expired on {when}")
    elif left < EXPIRY_WARNING_DAYS * 86400:
        warnings.append(
            f"cert_file {files.cert_file}: the certificate expires on {when} "
            f"(in {left / 86400:.1f} days)"
        )
    try:
        mode = os.stat(files.key_file).st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(
            f"key_file {files.key_file}: readable by its group or others "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 0600 it"
        )
    return errors, warnings


class TlsConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


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
    context.set_alpn_protocols(list(ALPN))
    return context
