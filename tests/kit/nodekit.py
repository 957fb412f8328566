"""Node side of the differential tests: the official TypeScript MCP SDK (v1.x) and express.

Proves "what proxyd decides on is exactly what the other side reads" against the readers most
MCP deployments use. The Node programs live in ``tests/node`` (``package.json`` and its lock pin
every version; ``make test`` runs ``npm ci`` there when npm is present). Without ``node`` or
``tests/node/node_modules`` the tests that need them are skipped locally and FAIL when ``CI`` is
set (``.ci/run`` installs node and npm).

    from tests.kit.nodekit import JsonReader, node_upstream, require_node, run_client

    async with node_upstream(stateless=True, json_response=False) as up:
        up.url                       # http://127.0.0.1:PORT/mcp
        await run_client(up.url, "token", "list")              # {"tools": [...]}
        await run_client(up.url, "token", "call", "echo", '{"text": "hi"}')
        await up.calls()             # everything the upstream recorded (see upstream.mjs)
        await up.tools_run()         # [("echo", {"text": "hi"})]: tools it EXECUTED

    with JsonReader() as reader:     # one long-running node process, thousands of reads
        reader.read_request(body_bytes)        # what express.json() reads from a POST body
        reader.read_answer(json_answer_bytes)  # what the SDK client reads from a JSON answer
        reader.read_sse(sse_bytes)             # ... from a text/event-stream answer
        reader.read_http_answer(203, "text/event-stream", sse_bytes)  # ... from a whole answer

Upstream (``tests/node/upstream.mjs``)
    express + ``app.use(express.json())`` (default options: the Content-Type charset is honoured,
    utf-7 included) + ``StreamableHTTPServerTransport``, as the SDK documents it. ``stateless``:
    ``sessionIdGenerator: undefined`` and a new server per POST; otherwise sessions.
    ``json_response``: ``enableJsonResponse``. Tools: ``echo(text)``, ``get_time``,
    ``get_secret``, ``delete_everything`` (the denied one), ``search_docs(query?)``; every tool
    accepts extra arguments. Readiness is its ``LISTENING <port>`` line, never a sleep.

Client (``tests/node/client.mjs``)
    ``Client`` + ``StreamableHTTPClientTransport`` with ``Authorization: Bearer <token>`` (the
    token goes through the environment, never argv, and is never printed). One action per run.

Reader (``tests/node/jsonread.mjs``)
    The exact libraries and code paths Node uses (the real express.json() middleware, undici's
    ``Response.json()``, ``TextDecoderStream`` + the SDK's own ``eventsource-parser``); its header
    comment documents every field of the answers and what each library accepts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp
import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
NODE_MODULES = NODE_DIR / "node_modules"
UPSTREAM_JS = NODE_DIR / "upstream.mjs"
CLIENT_JS = NODE_DIR / "client.mjs"
JSONREAD_JS = NODE_DIR / "jsonread.mjs"
# The packages the scripts import: their presence is what "installed" means.
REQUIRED_PACKAGES = ("@modelcontextprotocol/sdk", "express", "zod")

# Failure guards only: nothing waits for them to pass when things work.
START_GUARD = 30.0  # seconds for a node program to say it is ready
STOP_GUARD = 10.0  # seconds for a node program to exit after SIGTERM, then SIGKILL
CLIENT_GUARD = 60.0  # seconds for one client.mjs run
READ_GUARD = 30.0  # seconds for one JsonReader answer

Json = dict[str, Any]
Bytes = bytes | Sequence[bytes]


class NodeKitError(RuntimeError):
    """A node program of the kit failed (not a finding about proxyd: a broken kit)."""


class NodeClientError(NodeKitError):
    """client.mjs exited non-zero: it could not connect (refused, HTTP error, timeout...)."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"client.mjs exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def node_binary() -> str | None:
    return shutil.which("node")


def node_available() -> bool:
    """``node`` is on PATH and ``tests/node/node_modules`` holds the kit's packages."""
    return node_binary() is not None and all(
        (NODE_MODULES / package / "package.json").is_file() for package in REQUIRED_PACKAGES
    )


def require_node() -> str:
    """The node binary; else skip the test locally, fail it under CI (tests never skip in CI)."""
    node = node_binary()
    if node is not None and node_available():
        return node
    if node is None:
        message = "node is not installed (apt-get install nodejs npm)"
    else:
        message = "tests/node/node_modules is missing (make test, or npm ci --prefix tests/node)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must install it (.ci/run)")
    pytest.skip(message)


def _tail(stream: IO[bytes], limit: int = 4000) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read().decode("utf-8", "replace")[-limit:]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _as_object(line: bytes, source: str) -> Json:
    try:
        value = json.loads(line)
    except ValueError as error:
        raise NodeKitError(f"{source} printed something that is not JSON: {line!r}") from error
    if not isinstance(value, dict):
        raise NodeKitError(f"{source} printed a JSON {type(value).__name__}, not an object")
    return value


# --- upstream ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeUpstream:
    port: int
    stateless: bool
    json_response: bool

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    async def calls(self) -> list[Json]:
        """Everything recorded, oldest first: "body" (req.body as express.json() parsed it),
        "body_error" (a body express.json() refused), "rpc" (a JSON-RPC message the SDK
        transport handed to the server), "tool" (a tool the server executed)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.base_url}/_calls") as response,
        ):
            response.raise_for_status()
            records = await response.json()
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise NodeKitError(f"GET /_calls: a list of objects expected, got {records!r}")
        return records

    async def tools_run(self) -> list[tuple[str, Json]]:
        """(name, arguments) of every tool the upstream executed, in order."""
        return [
            (str(record["name"]), dict(record["arguments"]))
            for record in await self.calls()
            if record.get("kind") == "tool"
        ]

    async def clear_calls(self) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.delete(f"{self.base_url}/_calls") as response,
        ):
            response.raise_for_status()


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None:
        process.stdin.close()
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GUARD)
        except TimeoutError:
            process.kill()
            await process.wait()
    if process.stdout is not None:
        await process.stdout.read()  # to EOF: the pipe is closed, nothing is left behind


@asynccontextmanager
async def node_upstream(
    stateless: bool, json_response: bool, *, port: int = 0
) -> AsyncIterator[NodeUpstream]:
    """upstream.mjs on 127.0.0.1 (a free port unless ``port`` is given), stopped on exit."""
    node = require_node()
    argv = [
        node,
        str(UPSTREAM_JS),
        "--stateless" if stateless else "--stateful",
        "--json" if json_response else "--sse",
        "--port",
        str(port),
        "--exit-on-eof",  # it also exits if this process dies without stopping it
    ]
    async with listening(argv, "upstream.mjs") as (port, _):
        yield NodeUpstream(port, stateless, json_response)


@asynccontextmanager
async def listening(argv: list[str], name: str) -> AsyncIterator[tuple[int, IO[bytes]]]:
    """A Node server started from ``argv`` (run in tests/node) until it prints ``LISTENING
    <port>``: its port and its stderr (a file, read for diagnostics); stopped and awaited on
    exit. Its stdin is a pipe: ``--exit-on-eof`` servers end if this process dies."""
    with tempfile.TemporaryFile() as stderr:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=NODE_DIR,
        )
        try:
            assert process.stdout is not None
            try:
                line = await asyncio.wait_for(process.stdout.readline(), START_GUARD)
            except TimeoutError:
                raise NodeKitError(f"{name} did not print LISTENING in time") from None
            words = line.decode("utf-8", "replace").split()
            if len(words) != 2 or words[0] != "LISTENING" or not words[1].isdigit():
                raise NodeKitError(f"{name} did not start: {line!r} {_tail(stderr)}")
            yield int(words[1]), stderr
        finally:
            await _stop(process)


# --- client --------------------------------------------------------------------------------


async def run_client(
    url: str,
    token: str,
    *args: str,
    headers: Mapping[str, str] | None = None,
    timeout_ms: int = 10_000,
) -> Json:
    """One client.mjs run: ``"list"`` -> {"tools": [...]}; ``"call", NAME, JSONARGS`` ->
    {"result": ...} or {"error": "...", "code": N|None}. Either may carry "transport_errors"
    (what the transport reported without failing: an answer with an unknown id...).
    Raises NodeClientError when the client could not connect (it exited non-zero)."""
    node = require_node()
    argv = [node, str(CLIENT_JS), url, "--timeout-ms", str(timeout_ms)]
    for name, value in (headers or {}).items():
        argv += ["--header", f"{name}: {value}"]
    argv += args
    env = dict(os.environ, MCP_TOKEN=token)
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=NODE_DIR,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLIENT_GUARD)
    except TimeoutError:
        raise NodeKitError(f"client.mjs did not finish in {CLIENT_GUARD}s: {args!r}") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    err = stderr.decode("utf-8", "replace")
    if process.returncode != 0:
        raise NodeClientError(process.returncode or 0, err)
    lines = stdout.strip().splitlines()
    if len(lines) != 1:
        raise NodeKitError(f"client.mjs: one line expected, got {stdout!r} (stderr: {err})")
    return _as_object(lines[0], "client.mjs")


# --- reader --------------------------------------------------------------------------------


class JsonReader:
    """What Node reads from bytes, answered by one long-running ``jsonread.mjs`` process.

    Synchronous (a pipe round trip, well under a millisecond of node time), so it serves sync
    hypothesis tests and async tests alike. Use it as a context manager or call ``close()``;
    a module- or session-scoped fixture keeps one process for thousands of examples::

        @pytest.fixture(scope="module")
        def reader() -> Iterator[JsonReader]:
            with JsonReader() as r:
                yield r

    ``bytes | Sequence[bytes]``: a sequence is delivered chunk by chunk (a network split).
    The fields of each answer are documented at the top of tests/node/jsonread.mjs.
    """

    def __init__(self) -> None:
        node = require_node()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._buffer = b""
        # argv: the node binary and the kit's own script.
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(  # noqa: S603
            [node, str(JSONREAD_JS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=NODE_DIR,
        )
        try:
            ready = self._readline(START_GUARD)
            if ready != b"READY":
                raise NodeKitError(f"jsonread.mjs did not start: {ready!r}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> JsonReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops the node process and waits for it; idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                with suppress(BrokenPipeError):
                    process.stdin.close()  # jsonread.mjs ends at EOF
            try:
                process.wait(timeout=STOP_GUARD)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            if process.stdout is not None:
                process.stdout.close()
            self._stderr.close()

    def _readline(self, guard: float) -> bytes:
        process = self._process
        if process is None or process.stdout is None:
            raise NodeKitError("JsonReader is closed")
        fd = process.stdout.fileno()
        deadline = time.monotonic() + guard
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NodeKitError("jsonread.mjs did not answer in time")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                process.wait(timeout=STOP_GUARD)
                raise NodeKitError(
                    f"jsonread.mjs exited ({process.returncode}): {_tail(self._stderr)}"
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _ask(self, request: Json, data: Bytes) -> Json:
        process = self._process
        if process is None or process.stdin is None:
            raise NodeKitError("JsonReader is closed")
        if isinstance(data, bytes | bytearray | memoryview):
            request["body_b64"] = _b64(bytes(data))
        else:
            request["chunks_b64"] = [_b64(bytes(chunk)) for chunk in data]
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.flush()
        answer = _as_object(self._readline(READ_GUARD), "jsonread.mjs")
        if answer.get("bad_request"):
            raise NodeKitError(f"jsonread.mjs refused the request: {answer.get('error')}")
        return answer

    def read_request(
        self,
        body: Bytes,
        content_type: str | None = "application/json",
        content_encoding: str | None = None,
    ) -> Json:
        """What ``express.json()`` (default options) makes of a POST body with these headers
        (``content_type=None``: no Content-Type header). {"ok": true, "method", "name", "id",
        "has_id", "arguments", "batch", "messages", "sdk_ok"} or {"ok": false, "status",
        "type", "error"}, or {"ok": false, "skipped": true} when it does not parse it at all."""
        return self._ask(
            {"mode": "request", "content_type": content_type, "content_encoding": content_encoding},
            body,
        )

    def read_answer(self, body: Bytes) -> Json:
        """What the SDK client reads from a JSON answer body (``response.json()``):
        {"ok": true, "messages", "tools", "ids", "sdk_ok", "sdk_tools", "items"}."""
        return self._ask({"mode": "answer"}, body)

    def read_sse(self, body: Bytes) -> Json:
        """What the SDK client reads from a text/event-stream body:
        {"ok": true, "events": [{"event", "id", "jsonrpc_id", "tools", "sdk_reads",
        "sdk_tools"}], "unparsed", "dispatched", "sdk_tools"}."""
        return self._ask({"mode": "sse"}, body)

    def read_http_answer(self, status: int, content_type: str | None, body: Bytes) -> Json:
        """How StreamableHTTPClientTransport.send() takes a whole answer to a request:
        {"ok": true, "outcome": "http_error"|"accepted"|"json"|"sse"|"unexpected_content_type",
        "media_type", ...the read_answer or read_sse fields}."""
        return self._ask(
            {"mode": "http_answer", "status": status, "content_type": content_type}, body
        )
