"""A REAL proxyd daemon for the process tests: `python -m proxyd run -c FILE` as a child process.

``Daemon`` collects its JSON log lines from stdout as they come; ``launching`` starts daemons
and kills them at teardown (then checks their output: no traceback, no token); ``Upstream`` is
an MCP server with JSON answers, SSE streams fed by the test and answers held on a gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import base_config
from tests.kit.echo import Upstreams
from tests.kit.issuer import MINTED, TestIssuer
from tests.kit.net import free_port
from tests.kit.proxy import bearer
from tests.kit.tomltext import toml_tables
from tests.kit.wait import GUARD

SSE = "text/event-stream"
HELD_ANSWER = 256 * 1024  # the in-flight answer is big enough to be streamed, not one write


async def spawn_proxyd(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


class Daemon:
    """A running `proxyd run`; its stdout JSON lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, admin: int) -> None:
        self.proc = proc
        self.port = port
        self.admin = admin
        self.lines: list[dict[str, Any]] = []
        self.stderr = bytearray()
        self.eof = False
        self._wake = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read_stdout(), name="proxyd-stdout"),
            asyncio.create_task(self._read_stderr(), name="proxyd-stderr"),
        ]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, app: str) -> str:
        return f"{self.base}/mcp/apps/{app}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"

    def mark(self) -> int:
        """Index of the next log line: wait for events after this point."""
        return len(self.lines)

    async def sync(self, http: aiohttp.ClientSession) -> int:
        """Like mark(), but only after every line logged so far has been read: a request to
        an unknown app logs an access line with a unique path, and all before it are in."""
        path = f"/mcp/apps/sync-{uuid.uuid4().hex[:12]}"
        async with http.post(f"{self.base}{path}", json=rpc()) as resp:
            assert resp.status == 404
        line = await self.wait_for("request", path=path)
        return self.lines.index(line) + 1

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            text = raw.decode(errors="replace")
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            self.lines.append(line if isinstance(line, dict) else {"event": None, "raw": text})
            self._notify()
        self.eof = True
        self._notify()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr.extend(chunk)

    def find(
        self,
        event: str,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> list[dict[str, Any]]:
        """Lines ``event`` logged at or after ``since`` with ``fields`` (and ``where``)."""
        return [
            line
            for line in self.lines[since:]
            if line.get("event") == event
            and all(line.get(k) == v for k, v in fields.items())
            and (where is None or where(line))
        ]

    async def wait_for(
        self,
        event: str,
        since: int = 0,
        within: float = GUARD,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The first line ``event`` (with ``fields``) logged at or after ``since``."""
        deadline = time.monotonic() + within
        while True:
            found = self.find(event, since, where, **fields)
            if found:
                return found[0]
            wake = self._wake
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                raise AssertionError(
                    f"no {event} {fields} within {within}s (eof={self.eof}); "
                    f"log: {self.lines[since:]}; stderr: {self.stderr.decode(errors='replace')}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), remaining)

    def signal(self, sig: int) -> None:
        assert self.proc.returncode is None, "proxyd exited early"
        self.proc.send_signal(sig)

    async def exit_code(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), GUARD)
        await asyncio.wait_for(asyncio.gather(*self._readers), GUARD)
        return code

    def check_output(self) -> None:
        """No traceback on stderr, no token in the log (the daemon's own log guard)."""
        err = self.stderr.decode(errors="replace")
        assert "Traceback" not in err, err
        out = json.dumps(self.lines)
        for token in MINTED:
            signature = token.rsplit(".", 1)[-1]
            assert token not in out, "a token reached the daemon's log"
            assert not signature or signature not in out, "a token signature reached the log"

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


Launch = Callable[[Path], Awaitable[Daemon]]


def ports_of(path: Path) -> tuple[int, int]:
    """The MCP and admin ports a config file asks for."""
    doc = tomllib.loads(path.read_text())
    port, admin = (int(doc[s]["listen"].rsplit(":", 1)[1]) for s in ("server", "admin"))
    return port, admin


def proxyd_config(
    issuer: TestIssuer,
    tmp_path: Path,
    apps: dict[str, list[str]],
    *,
    port: int | None = None,
    admin: int | None = None,
    config_dir: Path | None = None,
    **sections: Any,
) -> dict[str, Any]:
    server = {
        "listen": f"127.0.0.1:{port or free_port()}",
        "state_dir": str(tmp_path / "state"),
        **sections.pop("server", {}),
    }
    doc = base_config(
        issuer,
        apps,
        tmp_path / "state",
        server=server,
        admin={"listen": f"127.0.0.1:{admin or free_port()}"},
        log={"format": "json", "level": "info", **sections.pop("log", {})},
        # Generous by default: tests that poll with new tokens must not trip the limiter.
        limits=sections.pop(
            "limits", {"unauthenticated": {"average": 10000, "burst": 10000, "period": "1s"}}
        ),
        **sections,
    )
    for app in doc["apps"]:
        # No active checks unless a test asks: each test here is about its own subject; probes
        # in flight at a reload or shutdown have their own test (..._on_active_health_checks).
        app.setdefault("health_check", {"type": "none"})
    if config_dir is not None:
        doc["app_auth"] = {"config_dir": str(config_dir)}
    return doc


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(toml_tables(doc))
    return path


class Upstream:
    def __init__(self) -> None:
        self.events: asyncio.Queue[str | None] = asyncio.Queue()
        self.stream_open = asyncio.Event()
        self.stream_closed = asyncio.Event()
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.json()
        if body.get("method") == "stream":
            return await self._stream(request)
        if body.get("method") == "hold":
            self.holding.set()
            await self.release.wait()
            blob = "x" * HELD_ANSWER
            return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": blob})
        return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": {}})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": SSE, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.stream_open.set()
        try:
            while (item := await self.events.get()) is not None:
                await resp.write(f"event: message\ndata: {item}\n\n".encode())
            await resp.write_eof()
        finally:
            self.stream_closed.set()
        return resp


async def start_upstream(upstreams: Upstreams) -> tuple[Upstream, str]:
    upstream = Upstream()
    # TestServer cancels handlers whose client left: a stream proxyd cuts ends upstream too.
    url = await upstreams.start(upstream.app())
    return upstream, url


def rpc(method: str = "ping", **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


async def post(
    http: aiohttp.ClientSession,
    url: str,
    token: str | None,
    method: str = "ping",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST a JSON-RPC message; the status and the JSON body (an answer or an error)."""
    all_headers = {**(bearer(token) if token else {}), **(headers or {})}
    async with http.post(url, json=rpc(method), headers=all_headers) as resp:
        body = await resp.json(content_type=None)
        assert isinstance(body, dict)
        return resp.status, body


class Stream:
    """An SSE answer relayed by proxyd, read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse, upstream: Upstream) -> None:
        self.resp = resp
        self.upstream = upstream
        self.received: list[str] = []

    async def relay(self, item: str) -> None:
        """The upstream sends ``item``; it must come out of proxyd as the next event."""
        await self.upstream.events.put(item)
        assert await self.next() == item
        self.received.append(item)

    async def next(self) -> str:
        async def read() -> str:
            while True:
                line = await self.resp.content.readline()
                if not line:
                    raise AssertionError(f"stream ended; received so far: {self.received}")
                if line.startswith(b"data:"):
                    # The blank line ending the event is relayed with it.
                    assert await self.resp.content.readline() == b"\n"
                    return line[5:].strip().decode()

        return await asyncio.wait_for(read(), GUARD)

    async def finish(self) -> bytes:
        """The upstream ends the stream: the client sees a clean end, nothing left over."""
        await self.upstream.events.put(None)
        return await asyncio.wait_for(self.resp.content.read(), GUARD)


async def open_stream(
    http: aiohttp.ClientSession, url: str, token: str, upstream: Upstream
) -> Stream:
    resp = await asyncio.wait_for(
        http.post(url, json=rpc("stream"), headers={**bearer(token), "Accept": SSE}), GUARD
    )
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith(SSE)
    return Stream(resp, upstream)


def notify_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


async def notify_message(sock: socket.socket) -> dict[str, str]:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), GUARD)
    fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
    return fields


def notify_pending(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


class Scrape:
    """One /metrics answer, parsed by prometheus_client's text parser."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when absent (a labelled counter not yet incremented)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def labelled(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for n, labels in self.samples if n == name]


async def scrape(http: aiohttp.ClientSession, proxyd: Daemon) -> Scrape:
    async with http.get(proxyd.admin_url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await resp.text())


@contextlib.asynccontextmanager
async def launching(
    ready: str = "proxyd_started", before_kill: Callable[[Daemon], None] | None = None
) -> AsyncIterator[Launch]:
    """Start `proxyd run -c FILE` (ports from the file) and wait for the ``ready`` event;
    at the end every daemon is killed (``before_kill`` first) and its output checked."""
    daemons: list[Daemon] = []

    async def start(path: Path) -> Daemon:
        daemon = Daemon(await spawn_proxyd("run", "-c", str(path)), *ports_of(path))
        daemons.append(daemon)
        await daemon.wait_for(ready)
        return daemon

    try:
        yield start
    finally:
        for daemon in daemons:
            if before_kill is not None:
                before_kill(daemon)
            await daemon.kill()
    for daemon in daemons:
        daemon.check_output()
