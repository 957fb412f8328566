"""A real proxyd for sync (hypothesis) tests, and the lenient readers the differential tests ask.

``ProxyStack`` runs proxyd exactly as ``proxyd serve`` does (create_app on an AppRunner behind a
``ListenerSite``), a scripted recording upstream and nothing else (the JWKS is static) in an
event loop on a background thread. A test talks to it over plain sockets, byte for byte::

    with ProxyStack(tmp_dir, roles=ROLES) as stack:
        stack.upstream.script = Script(200, [("Content-Type", "application/json")], [body])
        answer = stack.exchange([raw_request_bytes])  # HttpAnswer(status, headers, body)
        stack.upstream.requests                       # every request it received, raw
        stack.audit_records()                         # audit lines written since the last call

The readers are independent of proxyd's code: what Python's ``json`` reads from a request body
(last-wins, first-wins and case-insensitive member lookups, after inflating the body as a
lenient server would) and every tool name a lenient client could find in an answer (the whole
body as JSON, and every SSE event, BOMs stripped, member names compared case-insensitively).
"""

from __future__ import annotations

import asyncio
import fnmatch
import gzip
import json
import re
import socket
import threading
import time
import zlib
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from proxyd.app import RUNTIME, create_app
from proxyd.config import parse_settings
from proxyd.listener import Listener, ListenerSite
from tests.kit.issuer import TestIssuer
from tests.kit.recording import RawRequest

T = TypeVar("T")

GUARD = 20.0  # seconds: a failure guard only, nothing waits for it when things work
APP = "a"
PATH = f"/mcp/apps/{APP}"
BOM = b"\xef\xbb\xbf"
LATIN1_BOM = BOM.decode("latin-1").encode()  # C3 AF C2 BB C2 BF
# The MCP tool-name rules proxyd enforces under restricting roles (1-128 of these characters).
_TOOL_NAME = re.compile(r"[A-Za-z0-9_\-./]{1,128}")


def tool_allowed(name: object, allow: Sequence[str], deny: Sequence[str]) -> bool:
    """The roles' decision for a tool name, computed here without proxyd's code."""
    if not isinstance(name, str) or _TOOL_NAME.fullmatch(name) is None:
        return False
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in deny):
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allow)


# --- the scripted recording upstream ---------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """One answer of the upstream: written piece by piece (a pause after each, so proxyd reads
    the pieces separately), framed with Content-Length, chunked or by closing the connection."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),)
    pieces: Sequence[bytes] = (b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}',)
    framing: str = "length"  # "length" | "chunked" | "close"
    pause: float = 0.0

    def head(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} Whatever"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        size = sum(len(piece) for piece in self.pieces)
        if self.framing == "length":
            lines.append(f"Content-Length: {size}")
        elif self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class ScriptedUpstream:
    url: str = ""
    script: Script = field(default_factory=Script)
    requests: list[RawRequest] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lengths = RawRequest(head, b"").header("Content-Length")
                    body = await reader.readexactly(int(lengths[0])) if lengths else b""
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(RawRequest(head, body))
                script = self.script
                writer.write(script.head())
                for piece in script.pieces:
                    if not piece:
                        continue
                    if script.framing == "chunked":
                        piece = b"%x\r\n%b\r\n" % (len(piece), piece)
                    writer.write(piece)
                    await writer.drain()
                    if script.pause:
                        await asyncio.sleep(script.pause)
                if script.framing == "chunked":
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                if script.framing == "close":
                    return
        except ConnectionError:
            return
        finally:
            self.writers.discard(writer)
            writer.close()


# --- HTTP over a plain socket ----------------------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    status: int  # 0: the connection ended without an answer
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


def dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


def parse_answer(raw: bytes) -> HttpAnswer:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return HttpAnswer(0, [], b"", raw)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    answer = HttpAnswer(status, headers, b"", raw)
    if any("chunked" in v.lower() for v in answer.header("Transfer-Encoding")):
        body = dechunk(rest)
    elif answer.header("Content-Length"):
        body = rest[: int(answer.header("Content-Length")[0])]
    else:
        body = rest
    return HttpAnswer(status, headers, body, raw)


def send_raw(port: int, pieces: Sequence[bytes], guard: float = GUARD) -> HttpAnswer:
    """Write each piece, then read to EOF (the request says Connection: close)."""
    received = []
    with socket.create_connection(("127.0.0.1", port), timeout=guard) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in pieces:
                sock.sendall(piece)
            while chunk := sock.recv(65536):
                received.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass  # answered before the whole body was read: what arrived is the answer
    return parse_answer(b"".join(received))


# --- proxyd on a background event loop -------------------------------------------------------


class ProxyStack:
    """proxyd + a ScriptedUpstream + static JWKS, on a loop in a background thread."""

    def __init__(
        self,
        tmp_dir: Path,
        roles: list[dict[str, Any]],
        *,
        user: str = "alice@example.com",
    ) -> None:
        self.tmp_dir = tmp_dir
        self.roles = roles
        self.issuer = TestIssuer()
        self.issuer.add_key("k1", "ES256")
        self.audit_path = tmp_dir / "audit.jsonl"
        self.upstream = ScriptedUpstream()
        self.user = user
        self.port = 0
        self._audit_offset = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy-stack")
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T], guard: float = GUARD) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(guard)

    def config(self) -> dict[str, Any]:
        return {
            "server": {
                "listen": "127.0.0.1:0",
                "state_dir": str(self.tmp_dir),
                "public_url": "https://proxyd.test",
            },
            "apps": [
                {
                    "name": APP,
                    "labels": {"env": "test"},
                    "servers": [self.upstream.url],
                    # Answers with status 500 are part of the inputs: never eject the server.
                    "health_check": {"type": "none", "passive_failures": 1_000_000},
                }
            ],
            "app_auth_configs": [
                {
                    "name": "test-idp",
                    "app_labels": {"env": "test"},
                    "jwt": {
                        "issuer": self.issuer.issuer,
                        "audience": self.issuer.audience,
                        "static_jwks": json.dumps(self.issuer.jwks()),
                    },
                }
            ],
            "roles": self.roles,
            "audit": {"file": str(self.audit_path)},
            "limits": {"unauthenticated": {"enabled": False}},
        }

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self.upstream.handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.upstream.url = f"http://127.0.0.1:{port}/mcp"
        app = create_app(parse_settings(self.config()))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self._runner = runner
        await runner.setup()
        runtime = app[RUNTIME]
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await ListenerSite(runner, Listener(lambda: runtime.settings.server), sock=sock).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            self._server.close()
            for writer in list(self.upstream.writers):
                writer.close()
            await self._server.wait_closed()
        current = asyncio.current_task()
        rest = [task for task in asyncio.all_tasks() if task is not current]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def close(self) -> None:
        loop = self._loop
        if loop.is_closed():
            return
        try:
            if self._thread.is_alive():
                self.run(self._stop())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(GUARD)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self) -> ProxyStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def token(self) -> str:
        return self.issuer.token(time.time(), email=self.user)

    def exchange(self, pieces: Sequence[bytes]) -> HttpAnswer:
        return send_raw(self.port, pieces)

    def audit_records(self) -> list[dict[str, Any]]:
        """The audit lines written since the last call (each request's lines are written
        before its answer reaches the client)."""
        with self.audit_path.open("rb") as f:
            f.seek(self._audit_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._audit_offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


# --- lenient readers -------------------------------------------------------------------------


def lenient_inflate(body: bytes, codings: Sequence[str]) -> bytes | None:
    """The body as a lenient server inflates it (every gzip member, trailing bytes ignored),
    None when it cannot (an unknown coding)."""
    tokens = [t.strip().lower() for value in codings for t in value.split(",")]
    for coding in reversed(tokens):
        if coding in ("", "identity"):
            continue
        if coding in ("gzip", "x-gzip"):
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                try:
                    body = zlib.decompressobj(47).decompress(body)
                except zlib.error:
                    return None
        elif coding == "deflate":
            for wbits in (15, -15):
                try:
                    body = zlib.decompressobj(wbits).decompress(body)
                    break
                except zlib.error:
                    continue
            else:
                return None
        else:
            return None
    return body


class Members(list[tuple[str, Any]]):
    """A JSON object as every member in order (duplicates kept)."""


def _members(pairs: list[tuple[str, Any]]) -> Members:
    return Members(pairs)


def _loads_members(data: str | bytes) -> Any:
    return json.loads(data, object_pairs_hook=_members)


@dataclass(frozen=True)
class Lookup:
    """How one reader finds a member: its name compared exactly, case-insensitively (Go's
    encoding/json folds Unicode: "param\u017f" is params) or as a C string (cJSON: cut at the
    first NUL, ASCII case-insensitive, string values cut at the first NUL too); the first or
    the last of several matches."""

    label: str
    compare: str  # exact | fold | cstring
    last: bool

    def key(self, key: str) -> str:
        if self.compare == "fold":
            return key.casefold()
        if self.compare == "cstring":
            return key.split("\x00", 1)[0].lower()
        return key

    def value(self, value: Any) -> Any:
        if self.compare == "cstring" and isinstance(value, str):
            return value.split("\x00", 1)[0]
        return value


LOOKUPS = (
    Lookup("python json (last wins)", "exact", last=True),
    Lookup("first wins", "exact", last=False),
    Lookup("Go-like (case-insensitive, last wins)", "fold", last=True),
    Lookup("case-insensitive (first wins)", "fold", last=False),
    Lookup("cJSON-like (C strings, first wins)", "cstring", last=False),
)
LENIENT = Lookup("lenient", "fold", last=True)


def values_of(obj: Any, name: str, lookup: Lookup = LENIENT) -> list[Any]:
    """Every value of members that ``lookup`` takes for ``name``, in order."""
    if not isinstance(obj, Members):
        return []
    return [lookup.value(value) for key, value in obj if lookup.key(key) == name]


def _messages(document: Any) -> list[Any]:
    """The messages of a batch (a JSON array), or the one message."""
    if isinstance(document, list) and not isinstance(document, Members):
        return document
    return [document]


@dataclass(frozen=True)
class Reading:
    reader: str
    method: Any
    name: Any
    has_id: bool


_MISSING = object()


def _pick(obj: Any, name: str, lookup: Lookup) -> Any:
    values = values_of(obj, name, lookup)
    if not values:
        return _MISSING
    return values[-1] if lookup.last else values[0]


def python_readings(body: bytes) -> list[Reading]:
    """(method, params.name, has id) of every message in ``body`` as Python's json reads it
    (json.loads(bytes): UTF-8/16/32 guessed, a UTF-8 BOM skipped, NaN accepted), with the
    member lookups of LOOKUPS."""
    try:
        document = _loads_members(body)
    except (ValueError, RecursionError):
        return []
    out = []
    for lookup in LOOKUPS:
        for message in _messages(document):
            if not isinstance(message, Members):
                continue
            method = _pick(message, "method", lookup)
            name = _pick(_pick(message, "params", lookup), "name", lookup)
            out.append(
                Reading(
                    lookup.label,
                    None if method is _MISSING else method,
                    None if name is _MISSING else name,
                    _pick(message, "id", lookup) is not _MISSING,
                )
            )
    return out


def node_readings(answer: dict[str, Any]) -> list[Reading]:
    """JsonReader.read_request's answer as readings (one per message of a batch)."""
    if not answer.get("ok"):
        return []
    if answer.get("batch"):
        return [
            Reading("node(express.json)", m.get("method"), m.get("name"), bool(m.get("has_id")))
            for m in answer.get("messages", [])
        ]
    return [
        Reading(
            "node(express.json)", answer.get("method"), answer.get("name"), bool(answer["has_id"])
        )
    ]


def _strip_boms(text: str, *, every: bool = True) -> str:
    """Leading BOMs (U+FEFF, and the Latin-1-read BOM eventsource-parser drops) removed: all
    of them, or (``every=False``) one of each, as TextDecoder + eventsource-parser do."""
    if not every:
        text = text.removeprefix("\ufeff")
        return text.removeprefix(LATIN1_BOM.decode("utf-8"))
    while True:
        for bom in ("\ufeff", LATIN1_BOM.decode("utf-8")):
            if text.startswith(bom):
                text = text[len(bom) :]
                break
        else:
            return text


_SSE_LINE = re.compile(r"\r\n|\r|\n")


def sse_texts(body: bytes, *, line_boms: bool = True) -> list[str]:
    """Every text a lenient SSE reader could hand to JSON: each event's data lines joined
    (WHATWG), each data line alone, the unfinished last event too; BOMs stripped from the
    stream and (``line_boms``) from every line and value, as @microsoft/fetch-event-source
    does (it decodes each field and value with a non-streaming TextDecoder, which drops a
    leading BOM on every call)."""
    text = _strip_boms(body.decode("utf-8", "replace"), every=line_boms)
    events: list[str] = []
    lines: list[str] = []
    data: list[str] = []
    for line in _SSE_LINE.split(text):
        if line_boms:
            line = line.lstrip("\ufeff")
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if line_boms:
            value = value.lstrip("\ufeff")
        if name == "data":
            data.append(value)
            lines.append(value)
    if data:
        events.append("\n".join(data))
    return events + lines


def tools_in(document: Any) -> set[str]:
    """Tool names under result.tools of every message, every duplicate member read, member
    names case-insensitive (Unicode folding), or as cJSON reads them."""
    names: set[str] = set()
    for lookup in (LENIENT, LOOKUPS[-1]):
        for message in _messages(document):
            for result in values_of(message, "result", lookup):
                for tools in values_of(result, "tools", lookup):
                    for tool in tools if isinstance(tools, list) else []:
                        names |= {n for n in values_of(tool, "name", lookup) if isinstance(n, str)}
    return names


def answer_forms(content_types: Sequence[str]) -> set[str]:
    """How a lenient client reads an answer with these Content-Type lines, whatever the
    status: as an event stream when a line mentions text/event-stream (any case), as JSON
    otherwise (no type, text/plain...), both when JSON is named too."""
    value = ", ".join(content_types).lower()
    if "text/event-stream" not in value:
        return {"json"}
    return {"json", "sse"} if "json" in value else {"sse"}


def python_answer_tools(
    body: bytes, forms: Sequence[str] = ("json", "sse"), *, line_boms: bool = True
) -> set[str]:
    """Every tool name a lenient Python client could read from an answer in these forms: the
    body as JSON (bytes with encoding guessed, or UTF-8 with BOMs stripped) and as an event
    stream."""
    texts: list[str | bytes] = []
    if "json" in forms:
        texts += [body, _strip_boms(body.decode("utf-8", "replace"))]
    if "sse" in forms:
        texts += sse_texts(body, line_boms=line_boms)
    names: set[str] = set()
    for text in texts:
        try:
            names |= tools_in(_loads_members(text))
        except (ValueError, RecursionError):
            continue
    return names


def node_answer_tools(answer: dict[str, Any]) -> set[str]:
    """Every tool name in a JsonReader answer (read_answer, read_sse or read_http_answer):
    "tools" (JSON.parse, any message), "sdk_tools" (what Client.listTools() returns) and the
    same per SSE event."""
    names: set[str] = set()
    lists = [answer.get("tools"), answer.get("sdk_tools")]
    for item in answer.get("items", []):
        lists += [item.get("tools"), item.get("sdk_tools")]
    for event in answer.get("events", []):
        lists += [event.get("tools"), event.get("sdk_tools")]
    for names_list in lists:
        for name in names_list or []:
            if isinstance(name, str):
                names.add(name)
    return names


def iter_chunks(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut at the given offsets (any order, out of range ignored)."""
    start = 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}):
        yield data[start:cut]
        start = cut
    yield data[start:]
