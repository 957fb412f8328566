"""The secrets of ``[apps.upstream_auth]``: read from their files at start and on every reload.

A secret is never kept in the settings, and never in a message: a problem names the key and the
file, never a byte of the content. The header each app's requests carry is built here once per
configuration, so the hot path only sets it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from proxyd.config.model import AppSettings, ConfigError, UpstreamAuthSettings

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"


class SecretError(ValueError):
    """A secret cannot be used; ``key`` is the key of ``[apps.upstream_auth]`` to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def secret_path(auth: UpstreamAuthSettings) -> tuple[str, Path]:
    """The key that names the secret's file, and the file."""
    if auth.credential is not None:
        directory = os.environ.get(CREDENTIALS_DIRECTORY)
        if not directory:
            raise SecretError(
                "credential",
                f"{CREDENTIALS_DIRECTORY} is not set (LoadCredential= in the systemd unit "
                "provides it; or use secret_file)",
            )
        return "credential", Path(directory) / auth.credential
    if auth.secret_file is None:  # load.py requires one of them
        raise SecretError("secret_file", "no secret configured")
    return "secret_file", Path(auth.secret_file)


def read_secret(auth: UpstreamAuthSettings) -> str:
    """The secret, stripped of one trailing newline; SecretError never holds the content."""
    key, path = secret_path(auth)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecretError(
            key, f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    if not data:
        raise SecretError(key, f"{path} is empty")
    if any((b < 0x20 and b != 0x09) or b == 0x7F for b in data) or not data.isascii():
        # Checked, never shown: a header value is printable ASCII (RFC 9110 §5.5).
        raise SecretError(key, f"{path} is not a valid header value (printable ASCII, one line)")
    if data[:1] in (b" ", b"\t") or data[-1:] in (b" ", b"\t"):
        raise SecretError(key, f"{path} has leading or trailing whitespace")
    return data.decode("ascii")


def credential_header(auth: UpstreamAuthSettings, secret: str) -> tuple[str, str]:
    if auth.type == "header" and auth.header is not None:
        return auth.header, secret
    return "Authorization", f"Bearer {secret}"


def secret_problem(index: int, app: AppSettings, exc: SecretError) -> str:
    return f"apps[{index}].upstream_auth.{exc.key}: app {app.name!r}: {exc}"


def upstream_credentials(apps: Iterable[AppSettings]) -> Mapping[str, tuple[str, str]]:
    """App name → the header (name, value) its upstream requests carry; read now.

    Raises ConfigError listing every app whose secret cannot be used.
    """
    out: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for index, app in enumerate(apps):
        if app.upstream_auth is None:
            continue
        try:
            out[app.name] = credential_header(app.upstream_auth, read_secret(app.upstream_auth))
        except SecretError as exc:
            problems.append(secret_problem(index, app, exc))
    if problems:
        raise ConfigError(problems)
    return out
