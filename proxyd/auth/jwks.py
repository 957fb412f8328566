"""JWKS fetching and caching, done so that identity-provider key rotation never causes an outage.

* Cached per URL with a TTL from ``Cache-Control: max-age`` clamped to [min_ttl, max_ttl].
* A token naming an unknown ``kid`` triggers an immediate refetch (OIDC Core §10.1.1), at most
  once per ``refetch_interval`` per URL, so a flood of forged kids cannot hammer the IdP.
* Single flight: concurrent requests share one fetch; a caller that goes away never cancels
  the fetch the others wait for.
* On failure the last good key set keeps serving (logged), and the next try waits
  ``refetch_interval``.
* Keys proxyd will not trust (RFC 7518 §3.3 key size, curves, ``alg`` that does not fit the
  key) are dropped, each logged once as ``jwks_key_rejected``; a document left with no usable
  key is a failed fetch, exactly like an unreachable IdP.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxyd.auth.keys import ASYMMETRIC_ALGORITHMS, KeySet, KeySetError, RejectedKey, parse_jwks
from proxyd.config import JwksSettings
from proxyd.log import get_logger
from proxyd.tls import client_context
from proxyd.tracing import step

log = get_logger("proxyd.jwks")

_MAX_AGE_RE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_NO_CACHE_RE = re.compile(r"(?:^|,)\s*(no-store|no-cache)\b", re.IGNORECASE)


class JwksUnavailable(Exception):
    """No key set for this URL could ever be fetched."""


class _FetchFailed(Exception):
    reason = "jwks_fetch_failed"  # the error.type of the fetch's span (proxyd/tracing.py)


@dataclass
class _Entry:
    raw: bytes | None = None
    fetched_at: float = 0.0
    expires_at: float = 0.0
    last_attempt: float = float("-inf")
    inflight: asyncio.Task[None] | None = None
    parsed: dict[frozenset[str], KeySet] = field(default_factory=dict)
    fetch_errors: int = 0
    last_error: str | None = None
    # Digest of the last document fetched: its rejected keys are logged when it first
    # arrives, not again on every refetch (each TTL, or each refetch_interval while unusable).
    last_digest: bytes | None = None


def ttl_from_cache_control(value: str | None, settings: JwksSettings) -> float:
    if value:
        if _NO_CACHE_RE.search(value):
            return settings.min_ttl
        match = _MAX_AGE_RE.search(value)
        if match:
            return min(settings.max_ttl, max(settings.min_ttl, float(match.group(1))))
    return settings.default_ttl


class JwksCache:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        settings: JwksSettings,
        clock: Callable[[], float],
    ) -> None:
        self._http = http
        self._settings = settings
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self.fetches = 0  # observable by tests and metrics
        # [app_auth_configs.jwt.tls] ca_file of a JWKS URL ("" : the system's CAs), looked up
        # on each fetch: the config directory's watcher may swap the configs at any time.
        self._ca_file_for: Callable[[str], str] = lambda url: ""
        self._contexts: dict[str, ssl.SSLContext] = {}

    def set_tls(self, ca_file_for: Callable[[str], str]) -> None:
        """Set on start and on each reload (which also re-reads the CA files)."""
        self._ca_file_for = ca_file_for
        self._contexts = {}

    def _ssl(self, url: str) -> ssl.SSLContext | None:
        ca_file = self._ca_file_for(url)
        if not ca_file or not url.startswith("https://"):
            return None
        context = self._contexts.get(ca_file)
        if context is None:
            try:
                context = client_context(ca_file)
            except ValueError as exc:  # checked by the config; the file may be gone since
                raise _FetchFailed(f"upstream_tls: ca_file {ca_file}: {exc}") from None
            self._contexts[ca_file] = context
        return context

    async def keys(self, url: str, algorithms: frozenset[str], kid: str | None) -> KeySet:
        """The key set to verify a token with ``kid``; may refetch; raises JwksUnavailable."""
        entry = self._entries.setdefault(url, _Entry())
        now = self._clock()
        if entry.raw is not None:
            keyset = self._parsed(entry, algorithms)
            fresh = now < entry.expires_at
            if fresh and keyset is not None and (kid is None or keyset.find(kid) is not None):
                return keyset
            may_refetch = not fresh or now - entry.last_attempt >= self._settings.refetch_interval
            if may_refetch:
                await self._refresh(url, entry)
                keyset = self._parsed(entry, algorithms)
            if keyset is None:
                raise JwksUnavailable(f"JWKS at {url} has no usable key")
            return keyset
        recently_failed = now - entry.last_attempt < self._settings.refetch_interval
        if entry.inflight is not None or not recently_failed:
            await self._refresh(url, entry)
        # else: never fetched and the last try failed moments ago. Answer at once instead of
        # sending every new token's request to an identity provider that is down.
        keyset = self._parsed(entry, algorithms) if entry.raw is not None else None
        if keyset is None:
            raise JwksUnavailable(entry.last_error or f"JWKS at {url} unavailable")
        return keyset

    def stats(self) -> list[tuple[str, float | None, int]]:
        """(url, age of the cached key set or None, failed fetches) for metrics."""
        now = self._clock()
        return [
            (url, None if e.raw is None else now - e.fetched_at, e.fetch_errors)
            for url, e in self._entries.items()
        ]

    def age(self, url: str) -> float | None:
        entry = self._entries.get(url)
        if entry is None or entry.raw is None:
            return None
        return self._clock() - entry.fetched_at

    def _parsed(self, entry: _Entry, algorithms: frozenset[str]) -> KeySet | None:
        keyset = entry.parsed.get(algorithms)
        if keyset is None and entry.raw is not None:
            try:
                # Rejections here are the ones _fetch logged: they do not depend on algorithms.
                keyset = parse_jwks(entry.raw, algorithms)
            except KeySetError:
                return None
            entry.parsed[algorithms] = keyset
        return keyset

    async def _refresh(self, url: str, entry: _Entry) -> None:
        if entry.inflight is None:
            entry.inflight = asyncio.create_task(self._fetch(url, entry), name=f"jwks:{url}")
        # shield: a client that disconnects must not cancel the fetch others are waiting on.
        await asyncio.shield(entry.inflight)

    async def _fetch(self, url: str, entry: _Entry) -> None:
        entry.last_attempt = self._clock()
        self.fetches += 1
        try:
            # A child span of the request whose verification needed it, when traced.
            with step("proxyd.jwks.fetch", {"url.full": url}, client=True):
                raw, cache_control = await self._download(url)
            try:
                # Structural check: at least one key usable by SOME config. Not frozenset():
                # keys without "alg" (Entra, …) are usable by configs that list `algorithms`,
                # and must not turn every fetch into a failure. Per-config algorithms apply in
                # _parsed.
                keyset = parse_jwks(raw, ASYMMETRIC_ALGORITHMS)
            except KeySetError as exc:
                self._log_rejected(url, entry, raw, exc.rejected)
                raise
            self._log_rejected(url, entry, raw, keyset.rejected)
        except _FetchFailed as exc:
            self._failed(url, entry, str(exc))
        except KeySetError as exc:
            self._failed(url, entry, f"invalid JWKS: {exc}")
        else:
            now = self._clock()
            ttl = ttl_from_cache_control(cache_control, self._settings)
            entry.raw, entry.parsed = raw, {}
            entry.fetched_at, entry.expires_at = now, now + ttl
            entry.last_error = None
            log.info("jwks_fetched", url=url, ttl=ttl, bytes=len(raw))
        finally:
            entry.inflight = None

    def _log_rejected(
        self, url: str, entry: _Entry, raw: bytes, rejected: tuple[RejectedKey, ...]
    ) -> None:
        digest = hashlib.sha256(raw).digest()
        if digest == entry.last_digest:
            return
        entry.last_digest = digest
        for key in rejected:
            # kid and reason only: never key material. A kid is bounded so that a hostile
            # document cannot turn each line into kilobytes.
            kid = key.kid if key.kid is None or len(key.kid) <= 200 else key.kid[:200] + "…"
            log.warning("jwks_key_rejected", url=url, kid=kid, index=key.index, reason=key.reason)

    def _failed(self, url: str, entry: _Entry, error: str) -> None:
        entry.fetch_errors += 1
        entry.last_error = f"JWKS fetch from {url} failed: {error}"
        # Keep serving the last good key set; try again after refetch_interval.
        entry.expires_at = entry.last_attempt + self._settings.refetch_interval
        log.warning(
            "jwks_fetch_failed",
            url=url,
            error=error,
            serving_cached=entry.raw is not None,
            cached_age=None if entry.raw is None else round(self._clock() - entry.fetched_at, 1),
        )

    async def _download(self, url: str) -> tuple[bytes, str | None]:
        timeout = aiohttp.ClientTimeout(total=self._settings.fetch_timeout)
        limit = self._settings.max_size
        context = self._ssl(url)
        extra: dict[str, Any] = {} if context is None else {"ssl": context}
        try:
            async with self._http.get(
                url,
                timeout=timeout,
                allow_redirects=False,
                headers={"Accept": "application/json"},
                **extra,
            ) as resp:
                if resp.status != 200:
                    raise _FetchFailed(f"HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise _FetchFailed(f"larger than {limit} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > limit:
                        raise _FetchFailed(f"larger than {limit} bytes")
                return bytes(body), resp.headers.get("Cache-Control")
        except TimeoutError:
            raise _FetchFailed(f"timed out after {self._settings.fetch_timeout:g}s") from None
        except aiohttp.ClientSSLError as exc:
            raise _FetchFailed(f"upstream_tls: {exc}") from None
        except aiohttp.ClientError as exc:
            raise _FetchFailed(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        tasks = [e.inflight for e in self._entries.values() if e.inflight is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
