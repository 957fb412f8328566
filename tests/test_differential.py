"""Issue 10, differential: what proxyd decides on is exactly what the other side reads.

Hypothesis generates hostile requests and answers and sends them, byte for byte, through a real
proxyd (roles: echo and get_* allowed, delete_everything denied) to a recording upstream. The
invariants, both ways:

* Requests: whenever a tools/call reaches the upstream, the tool name every independent reader
  reads from the FORWARDED bytes and headers is the name proxyd audited (``mcp.session.request``)
  and allowed, and the roles allow it; whenever any reader reads a denied tool from what the
  client sent, nothing reaches the upstream. Readers: Node's real express.json() middleware
  (JsonReader.read_request with the forwarded Content-Type and Content-Encoding), and Python's
  json after inflating the body as a lenient server would, with the member lookups of
  tests/kit/harness.py LOOKUPS (last wins, first wins, Go's case-insensitive encoding/json,
  cJSON's C strings).
* Answers: whatever reaches the client, no denied tool is in what the TypeScript SDK client
  reads (status, Content-Type and body as received), in what Node reads from the body in the
  form its Content-Type names whatever the status, nor in what a lenient Python reader reads
  (the body as JSON and each SSE event's data, BOMs stripped, member names case-insensitive or
  as C strings). Readings against the Content-Type (an event stream read as one JSON document)
  are only counted (hypothesis statistics): no client is known to read them.

Counterexamples hypothesis found are pinned with @example (each run tries them first). Example
counts come from the hypothesis profile (tests/conftest.py): "dev" keeps ``make test`` fast,
``--hypothesis-profile=ci`` (.ci/run) runs ten times more.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from tests.kit.harness import (
    BOM,
    LATIN1_BOM,
    PATH,
    HttpAnswer,
    ProxyStack,
    Reading,
    Script,
    answer_forms,
    iter_chunks,
    lenient_inflate,
    node_answer_tools,
    node_readings,
    python_answer_tools,
    python_readings,
    tool_allowed,
)
from tests.kit.issuer import MINTED
from tests.kit.nodekit import JsonReader
from tests.kit.recording import RawRequest

ALLOW = ("echo", "get_*")
DENY = ("delete_everything",)
ROLES = [
    {
        "name": "readers",
        "users": ["alice@example.com"],
        "app_labels": {"env": "test"},
        "mcp": {"tools": list(ALLOW)},
        "deny": {"mcp": {"tools": list(DENY)}},
    }
]

# Network round trips: no per-example deadline; examples are slow by design.
DIFFERENTIAL = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def allowed(name: object) -> bool:
    return tool_allowed(name, ALLOW, DENY)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyStack]:
    with ProxyStack(tmp_path_factory.mktemp("differential"), ROLES) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def reader() -> Iterator[JsonReader]:
    with JsonReader() as r:
        yield r


@pytest.fixture(scope="module")
def token(stack: ProxyStack) -> str:
    return stack.token()


# --------------------------------------------------------------------------------------------
# JSON texts with hostile spellings


@dataclass(frozen=True)
class Obj:
    """A JSON object as written: members in order, duplicates allowed."""

    members: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Raw:
    """Text written verbatim (a number spelled oddly, NaN, a pre-built hostile fragment)."""

    text: str


Node = Obj | Raw | str | int | bool | None | list[Any]

T = TypeVar("T")


def chance(draw: st.DrawFn, percent: int) -> bool:
    """True ``percent`` times in a hundred; shrinks to False (towards the clean input)."""
    return draw(st.integers(0, 99)) >= 100 - percent


def mostly(draw: st.DrawFn, usual: T, others: Sequence[T], percent: int) -> T:
    """``usual``, or one of ``others`` ``percent`` times in a hundred (shrinks to usual)."""
    return draw(st.sampled_from(others)) if chance(draw, percent) else usual


LEGAL_WS = ["", "", "", " ", "  ", "\n", "\t", "\r\n", "\r", " \n "]
# Whitespace to nobody or to some: JSON allows only space, tab, LF and CR.
ILLEGAL_WS = ["\x0c", "\x0b", "\xa0", "\u2028", "\u2029", "\u3000", "\ufeff", "\x85", "\x00"]
SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b"}
SHORT_ESCAPES |= {"\f": "\\f", "/": "\\/"}


@dataclass(frozen=True)
class Style:
    ws: str  # compact | spaced | random
    escapes: str  # none | some | all
    upper_hex: bool
    raw_controls: bool  # control characters in strings left raw (not JSON)
    raw_surrogates: bool  # lone surrogates written raw (encoded with surrogatepass)
    illegal_ws: str | None  # one illegal whitespace character at a random token boundary


@st.composite
def styles(draw: st.DrawFn) -> Style:
    return Style(
        ws=mostly(draw, "compact", ["spaced", "random", "random"], 40),
        escapes=mostly(draw, "none", ["some", "some", "all"], 35),
        upper_hex=draw(st.booleans()),
        raw_controls=chance(draw, 4),
        raw_surrogates=chance(draw, 4),
        illegal_ws=mostly(draw, None, ILLEGAL_WS, 8),
    )


class _Writer:
    def __init__(self, draw: st.DrawFn, style: Style) -> None:
        self.draw = draw
        self.style = style
        self.parts: list[str | None] = []  # None: a token boundary (whitespace goes there)

    def ws(self) -> None:
        self.parts.append(None)

    def string(self, text: str) -> None:
        style = self.style
        out = ['"']
        for ch in text:
            cp = ord(ch)
            surrogate = 0xD800 <= cp <= 0xDFFF
            if (cp < 0x20 and style.raw_controls) or (surrogate and style.raw_surrogates):
                out.append(ch)
                continue
            forced = ch in '"\\' or cp < 0x20 or surrogate
            escape = forced or style.escapes == "all"
            if not escape and style.escapes == "some":
                escape = self.draw(st.booleans())
            if not escape:
                out.append(ch)
            elif ch in SHORT_ESCAPES and (style.escapes != "all" or ch in '"\\'):
                out.append(SHORT_ESCAPES[ch])
            elif cp > 0xFFFF:
                high, low = divmod(cp - 0x10000, 0x400)
                out.append(self._u(0xD800 + high) + self._u(0xDC00 + low))
            else:
                out.append(self._u(cp))
        out.append('"')
        self.parts.append("".join(out))

    def _u(self, cp: int) -> str:
        return ("\\u%04X" if self.style.upper_hex else "\\u%04x") % cp

    def value(self, node: Node) -> None:
        if isinstance(node, Obj):
            self.parts.append("{")
            for i, (key, value) in enumerate(node.members):
                if i:
                    self.parts.append(",")
                self.ws()
                self.string(key)
                self.ws()
                self.parts.append(":")
                self.ws()
                self.value(value)
                self.ws()
            self.parts.append("}")
        elif isinstance(node, list):
            self.parts.append("[")
            for i, item in enumerate(node):
                if i:
                    self.parts.append(",")
                self.ws()
                self.value(item)
                self.ws()
            self.parts.append("]")
        elif isinstance(node, Raw):
            self.parts.append(node.text)
        elif isinstance(node, str):
            self.string(node)
        else:
            self.parts.append(json.dumps(node))

    def text(self) -> str:
        style = self.style
        slots = self.parts.count(None)
        illegal_at = -1
        if style.illegal_ws is not None and slots:
            illegal_at = self.draw(st.integers(0, slots - 1))
        out = []
        slot = 0
        for part in self.parts:
            if part is not None:
                out.append(part)
                continue
            if style.ws == "spaced":
                out.append(" ")
            elif style.ws == "random":
                out.append(self.draw(st.sampled_from(LEGAL_WS)))
            if slot == illegal_at:
                assert style.illegal_ws is not None
                out.append(style.illegal_ws)
            slot += 1
        return "".join(out)


def write_json(draw: st.DrawFn, node: Node, style: Style) -> str:
    writer = _Writer(draw, style)
    writer.ws()
    writer.value(node)
    writer.ws()
    return writer.text()


# --------------------------------------------------------------------------------------------
# Names, ids and member-name variants

ALLOWED_NAMES = ["echo", "get_time"]
DENIED_NAMES = ["delete_everything", "search_docs"]
HOSTILE_NAMES = [
    "echo\x00",
    "get_time\x00",
    "get_\x00delete_everything",
    "delete_everything\x00",
    "get_time\n",
    "get_time\r\ndelete_everything",
    "get_\u0085x",
    "get_time\u200b",
    "get_time\ufeff",
    "echo\u2028",
    "get_t\u0131me",  # dotless i
    "ech\u043e",  # Cyrillic o
    "\u0435cho",  # Cyrillic e
    "\uff45\uff43\uff48\uff4f",  # fullwidth echo
    "get_\uff54\uff49\uff4d\uff45",
    "e\u0301cho",
    "get_\u202etime",
    "get_\U0001f600",
    "echo\ud800",  # lone surrogates
    "get_time\udc00",
    "get_" + "x" * 125,  # 129 characters
    "get_" + "x" * 124,  # 128: allowed
    "get_time ",
    " echo",
    "Echo",
    "ECHO",
    "DELETE_EVERYTHING",
    "get_time/../delete_everything",
    "",
]


@st.composite
def tool_names(draw: st.DrawFn) -> str:
    """Allowed names half the time, else denied, hostile or generated ones."""
    which = draw(st.integers(0, 9))
    if which < 5:
        return draw(st.sampled_from(ALLOWED_NAMES))
    if which < 7:
        return draw(st.sampled_from(DENIED_NAMES))
    if which < 9:
        return draw(st.sampled_from(HOSTILE_NAMES))
    return "get_" + draw(st.text(max_size=6))


@st.composite
def ids(draw: st.DrawFn) -> Node:
    if not chance(draw, 40):
        return draw(st.integers(0, 3))
    return draw(st.sampled_from(ODD_IDS))


ID_SPELLINGS = ["1", "2", "-1", "0", "-0", "1.0", "2.0", "1e0", "2E+0", "10e-1", "1e400"]
ID_SPELLINGS += ["9007199254740993", "01", "1.", "+1", ".5", "NaN", "Infinity", "-Infinity"]
ODD_IDS: list[Node] = ["1", "2", " 2", "2 ", "", "02", "id\x00", -1, None, True, [], Obj(())]
ODD_IDS += [Raw(spelling) for spelling in ID_SPELLINGS]


def key_variants(key: str) -> st.SearchStrategy[str]:
    """The member name, or one that some reader takes for it (case, long s, a NUL that ends a
    C string) or nearly."""
    options = [key, key.upper(), key.capitalize(), key.swapcase(), key + "\u200b", " " + key]
    options += [key + "\x00", key + "\x00x"]
    if "s" in key:
        options += [key.replace("s", "\u017f"), key.replace("s", "S", 1)]
    if "i" in key:
        options.append(key.replace("i", "\u0131"))
    if "k" in key:
        options.append(key.replace("k", "\u212a"))  # Kelvin sign: folds to k
    return st.sampled_from(options)


JSONRPC_VERSIONS: list[Node] = ["2.0", "1.0", Raw("2.0"), None]
# tools/call, or what some reader takes for it (a C string ends at the NUL), or nearly.
CALL_SPELLINGS = [
    "tools/call\x00",
    "tools/call\x00x",
    "Tools/Call",
    "tools/call ",
    "tools/call\u200b",
]
METHODS = ["tools/call", "tools/list", "ping", *CALL_SPELLINGS]


def replacement(draw: st.DrawFn, key: str) -> Node:
    """A value for a hostile duplicate or extra member called (a variant of) ``key``."""
    key = key.casefold().split("\x00")[0].strip(" \u200b").replace("\u0131", "i")
    if key == "method":
        return draw(st.sampled_from(METHODS))
    if key == "params":
        return Obj((("name", draw(st.sampled_from(DENIED_NAMES))), ("arguments", Obj(()))))
    if key == "id":
        return draw(ids())
    if key == "jsonrpc":
        return draw(st.sampled_from(JSONRPC_VERSIONS))
    if key in ("arguments", "_meta"):
        return Obj((("name", draw(st.sampled_from(DENIED_NAMES))),))
    if key == "tools":
        odd_tools: list[Node] = [[], [tool(n) for n in DENIED_NAMES], "x", Obj(())]
        return draw(st.sampled_from(odd_tools))
    if key == "result":
        return Obj((("tools", [tool(draw(st.sampled_from(DENIED_NAMES)))]),))
    return draw(tool_names())


def mutate(draw: st.DrawFn, members: list[tuple[str, Any]], extra_keys: Sequence[str]) -> None:
    """One hostile edit of an object's members, in place."""
    op = draw(st.sampled_from(["dup", "rename", "drop", "extra"]))
    if op == "extra" or not members:
        key = draw(st.sampled_from(list(extra_keys)))
        position = draw(st.integers(0, len(members)))
        members.insert(position, (draw(key_variants(key)), replacement(draw, key)))
        return
    i = draw(st.integers(0, len(members) - 1))
    key, value = members[i]
    if op == "dup":
        position = draw(st.integers(0, len(members)))
        members.insert(position, (draw(key_variants(key)), replacement(draw, key)))
    elif op == "rename":
        members[i] = (draw(key_variants(key)), value)
    else:
        del members[i]


def finish(draw: st.DrawFn, members: list[tuple[str, Any]], keys: Sequence[str]) -> Obj:
    """The object, each member name sometimes in another case (or a lookalike), a hostile
    edit one time in four (two or three, rarely), members shuffled sometimes."""
    members = [(draw(key_variants(k)) if chance(draw, 5) else k, v) for k, v in members]
    for _ in range(mostly(draw, 0, [1, 1, 1, 1, 2, 2, 3], 25)):
        mutate(draw, members, keys)
    if chance(draw, 30):
        members = draw(st.permutations(members))
    return Obj(tuple(members))


def utf7_shift(text: str) -> str:
    """``text`` as one UTF-7 shifted sequence (RFC 2152): ASCII letters to a UTF-8 reader."""
    return "+" + base64.b64encode(text.encode("utf-16-be")).decode().rstrip("=") + "-"


def utf7_smuggled_params(allowed_name: str, denied_name: str) -> Raw:
    """params naming ``allowed_name`` read as UTF-8 and ``denied_name`` read as UTF-7, with no
    duplicate member in either reading (the shifted sequences restructure the object)."""
    return Raw(
        '{"arguments":{"text":"'
        + utf7_shift(f'"}},"name":"{denied_name}","x":{{"y":{{"q":"')
        + f'"}},"name":"{allowed_name}","_meta":{{"z":"'
        + utf7_shift('"},"w":"')
        + '"}}'
    )


# --------------------------------------------------------------------------------------------
# Requests

ENVELOPE_KEYS = ["jsonrpc", "id", "method", "params", "result", "error", "x"]
PARAMS_KEYS = ["name", "arguments", "_meta", "uri", "x"]


ARGUMENTS: list[Node] = [
    Obj(()),
    Obj((("text", "hi"),)),
    Obj((("text", 'tools/call \u00e9\U0001f600 \\ " /'),)),
    Obj((("name", "delete_everything"),)),
    Obj((("params", Obj((("name", "delete_everything"),))),)),
    Obj((("method", "tools/call"), ("x", [1, Raw("1.5e3"), None]))),
    "delete_everything",
    [],
]
arguments = st.sampled_from(ARGUMENTS)


@dataclass(frozen=True)
class Message:
    kind: str
    method: str | None
    name: Any
    tree: Node


@st.composite
def request_messages(draw: st.DrawFn) -> Message:
    # "hybrid": a call that also carries a result or an error (a response to some readers).
    others = ["call_notification", "list", "response", "hybrid", "hybrid", "ping", "init"]
    kind = mostly(draw, "call", others, 35)
    name = draw(tool_names())
    params: list[tuple[str, Any]] = [("name", name), ("arguments", draw(arguments))]
    if chance(draw, 20):
        params.append(("_meta", Obj((("progressToken", draw(ids())),))))
    envelope: list[tuple[str, Any]] = [("jsonrpc", "2.0")]
    method: str | None = mostly(draw, "tools/call", CALL_SPELLINGS, 8)
    if kind == "call":
        envelope += [("id", draw(ids())), ("method", method)]
    elif kind == "hybrid":
        # Which of request and response it is may depend on the case of its member names.
        answer = draw(st.sampled_from(["result", "error"]))
        value = Obj((("content", []),)) if answer == "result" else Obj((("code", 1),))
        method_key = draw(key_variants("method")) if chance(draw, 50) else "method"
        answer_key = draw(key_variants(answer)) if chance(draw, 30) else answer
        envelope += [("id", draw(ids())), (method_key, method), (answer_key, value)]
    elif kind == "call_notification":
        envelope += [("method", method)]
    elif kind == "list":
        method = "tools/list"
        envelope += [("id", draw(ids())), ("method", method)]
        params = mostly(draw, [], [[("cursor", "c")], params], 50)
    elif kind == "response":
        method = None
        envelope += [("id", draw(ids())), ("result", Obj((("content", []),)))]
        params = []
    elif kind == "ping":
        method = "ping"
        envelope += [("id", draw(ids())), ("method", method)]
        params = []
    else:
        method = "notifications/initialized"
        envelope += [("method", method)]
        params = []
    smuggle = kind == "call" and chance(draw, 6)
    if smuggle:
        name = draw(st.sampled_from(ALLOWED_NAMES))
        params_node: Node = utf7_smuggled_params(name, draw(st.sampled_from(DENIED_NAMES)))
    else:
        params_node = finish(draw, params, PARAMS_KEYS)
    if params or smuggle or chance(draw, 25):
        envelope.append(("params", params_node))
    tree: Node = finish(draw, envelope, ENVELOPE_KEYS)
    if chance(draw, 5):
        tree = [tree]  # a batch
    return Message(kind, method, name, tree)


ENCODINGS = ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-7", "latin-1"]


def encode(text: str, encoding: str) -> bytes:
    if encoding.startswith(("utf-8", "utf-16", "utf-32")):
        return text.encode(encoding, "surrogatepass")
    return text.encode(encoding, "replace")


CONTENT_TYPES: list[str | None] = [
    None,
    "",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    'application/json; charset="utf-8"',
    "Application/JSON",
    "application/json \t; \tcharset=utf-8",
    "application/json; charset=utf-7",
    "application/json; charset=UTF-7",
    'application/json; charset="utf-7"',
    "application/json; CHARSET=utf-7",
    "application/json ; charset = utf-7",
    "application/json; charset=utf-7;",
    "application/json; charset=utf-16",
    "application/json; charset=utf-16le",
    "application/json; charset=utf-16be",
    "application/json; charset=utf-32",
    "application/json; charset=iso-8859-1",
    "application/json; charset=utf8",
    "application/json; charset=utf-8; charset=utf-7",
    "application/json; charset=utf-7; charset=utf-8",
    "application/json; foo=bar",
    "application/json;",
    "application/json, text/plain",
    "text/plain",
    "text/json",
    "application/jsonx",
    "application/json-rpc",
    "application/vnd.api+json",
    "application/x-www-form-urlencoded",
]


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _raw_deflate(data: bytes) -> bytes:
    squeeze = zlib.compressobj(wbits=-15)
    return squeeze.compress(data) + squeeze.flush()


# (Content-Encoding header lines, how the body is coded): honest, lying, ambiguous.
CODINGS: list[tuple[tuple[str, ...], str]] = [
    (("identity",), "none"),
    (("gzip",), "gzip"),
    (("x-gzip",), "gzip"),
    (("GZIP",), "gzip"),
    (("deflate",), "deflate"),
    (("deflate",), "raw-deflate"),
    (("gzip",), "gzip+member"),
    (("gzip",), "gzip+trailing"),
    (("gzip",), "gzip-truncated"),
    (("gzip",), "none"),
    (("identity",), "gzip"),
    (("gzip", "gzip"), "gzip"),
    (("identity", "gzip"), "gzip"),
    (("gzip, identity",), "gzip"),
    (("gzip,gzip",), "gzip-gzip"),
    (("gzip",), "deflate"),
    (("deflate",), "gzip"),
    ((" gzip ",), "gzip"),
    (("br",), "none"),
    (("compress",), "none"),
    (("",), "none"),
]


def code_body(data: bytes, how: str, extra: bytes) -> bytes:
    if how == "gzip":
        return _gzip(data)
    if how == "deflate":
        return zlib.compress(data)
    if how == "raw-deflate":
        return _raw_deflate(data)
    if how == "gzip+member":
        return _gzip(data) + _gzip(extra)
    if how == "gzip+trailing":
        return _gzip(data) + (extra or b"x")
    if how == "gzip-truncated":
        return _gzip(data)[:-4]
    if how == "gzip-gzip":
        return _gzip(_gzip(data))
    return data


@dataclass(frozen=True)
class HostileRequest:
    http_method: str
    body: bytes
    content_types: tuple[str, ...]
    content_encodings: tuple[str, ...]
    chunked: bool
    cuts: tuple[int, ...]
    extra_headers: tuple[tuple[str, str], ...]
    message: Message | None = field(default=None, repr=False)

    def wire(self, token: str) -> list[bytes]:
        lines = [
            f"{self.http_method} {PATH} HTTP/1.1",
            "Host: 127.0.0.1",
            f"Authorization: Bearer {token}",
            "Accept: application/json, text/event-stream",
            "Connection: close",
        ]
        lines += [f"Content-Type: {value}" for value in self.content_types]
        lines += [f"Content-Encoding: {value}" for value in self.content_encodings]
        lines += [f"{name}: {value}" for name, value in self.extra_headers]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            chunks = [c for c in iter_chunks(self.body, self.cuts) if c]
            body = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(self.body)}")
            body = self.body
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return [head, *iter_chunks(body, self.cuts)]


def mcp_name_header(name: object) -> str:
    text = name if isinstance(name, str) else ""
    if text.isascii() and text.isprintable() and text.strip() == text:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    return "=?base64?" + base64.b64encode(raw).decode() + "?="


@st.composite
def hostile_requests(draw: st.DrawFn) -> HostileRequest:
    message = draw(request_messages())
    text = write_json(draw, message.tree, draw(styles()))
    prefix = mostly(draw, "", [" ", "\n", "\ufeff", "\x0c", "\xa0"], 8)
    suffix = mostly(draw, "", ["\n", " x", "\x00", "\xa0", "{}", "\u2028"], 8)
    data = encode(prefix + text + suffix, mostly(draw, "utf-8", ENCODINGS, 10))
    if chance(draw, 5):
        data = BOM + data
    content_type = mostly(draw, "application/json", CONTENT_TYPES, 20)
    content_types: tuple[str, ...] = () if content_type is None else (content_type,)
    if chance(draw, 5):
        content_types += (draw(st.sampled_from(["application/json; charset=utf-7", "text/plain"])),)
    encodings, how = mostly(draw, ((), "none"), CODINGS, 20)
    extra = draw(st.sampled_from([b"", b" ", b"{}", b'{"method":"tools/call"}']))
    body = code_body(data, how, extra)
    extra_headers: tuple[tuple[str, str], ...] = ()
    if chance(draw, 20):
        extra_headers = (("MCP-Protocol-Version", "2026-07-28"),)
        if message.method is not None:
            extra_headers += (("Mcp-Method", mcp_name_header(message.method)),)
        if message.method == "tools/call":
            extra_headers += (("Mcp-Name", mcp_name_header(message.name)),)
    return HostileRequest(
        http_method=mostly(draw, "POST", ["GET", "DELETE"], 6),
        body=body,
        content_types=content_types,
        content_encodings=encodings,
        chunked=draw(st.booleans()),
        cuts=tuple(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=4))),
        extra_headers=extra_headers,
        message=message,
    )


def read_request(
    reader: JsonReader, body: bytes, content_types: Sequence[str], encodings: Sequence[str]
) -> tuple[list[Reading], dict[str, Any]]:
    """Every reading of a request body: Python's json after a lenient inflate, and
    express.json() with the headers as Node's http module hands them over (the first
    Content-Type, Content-Encoding lines joined with ", ")."""
    readings = []
    inflated = lenient_inflate(body, encodings)
    if inflated is not None:
        readings += python_readings(inflated)
    node = reader.read_request(
        body,
        content_types[0] if content_types else None,
        ", ".join(encodings) if encodings else None,
    )
    return readings + node_readings(node), node


def _post(body: bytes) -> HostileRequest:
    return HostileRequest("POST", body, ("application/json",), (), False, (), ())


# Counterexamples hypothesis found (shrunk), pinned so every run tries them first.
# A message with an id and a result (or error) whose method member is spelled in another case
# is a response to proxyd (no tool policy, no audit) and a tools/call to a case-insensitive
# reader: Go's encoding/json (the Go SDK's jsonrpc2.DecodeMessage takes any non-empty Method
# for a request) and cJSON's cJSON_GetObjectItem.
CASE_HYBRID = _post(
    b'{"jsonrpc":"2.0","id":0,"METHOD":"tools/call","result":{"content":[]},'
    b'"params":{"name":"delete_everything","arguments":{}}}'
)
# "tools/call\u0000" is not tools/call to proxyd (no tool policy), and is tools/call to a
# reader of C strings (cJSON: the value ends at the NUL).
NUL_METHOD = _post(
    b'{"jsonrpc":"2.0","id":0,"method":"tools/call\\u0000",'
    b'"params":{"name":"delete_everything","arguments":{}}}'
)


@DIFFERENTIAL
@given(sent=hostile_requests())
@example(sent=CASE_HYBRID)
@example(sent=NUL_METHOD)
def test_a_forwarded_tools_call_names_what_proxyd_audited_and_allowed(
    stack: ProxyStack, reader: JsonReader, token: str, sent: HostileRequest
) -> None:
    MINTED.add(token)  # the autouse log guard checks this token never reaches the logs
    mark = len(stack.upstream.requests)
    stack.upstream.script = Script()
    answer = stack.exchange(sent.wire(token))
    forwarded = stack.upstream.requests[mark:]
    audits = stack.audit_records()
    event(f"status {answer.status}")
    event("forwarded" if forwarded else "not forwarded")
    note(f"client sent {sent!r}")
    note(f"proxyd answered {answer.status}: {answer.body[:400]!r}")
    note(f"audit: {audits!r}")

    # Both ways, first: a denied tool read by any reader from what the client sent never goes up.
    sent_readings, sent_node = read_request(
        reader, sent.body, sent.content_types, sent.content_encodings
    )
    note(f"readings of the sent body: {sent_readings!r}; node: {sent_node!r}")
    denied = [r for r in sent_readings if r.method == "tools/call" and not allowed(r.name)]
    if denied:
        event("a reader reads a denied tools/call")
        assert not forwarded, f"denied tool read by {denied!r} was forwarded"

    calls = [a for a in audits if a.get("mcp_method") == "tools/call"]
    for request in forwarded:
        check_forwarded(reader, sent, request, calls)


def check_forwarded(
    reader: JsonReader, sent: HostileRequest, request: RawRequest, calls: list[dict[str, Any]]
) -> None:
    content_types = request.header("Content-Type")
    encodings = request.header("Content-Encoding")
    readings, node = read_request(reader, request.body, content_types, encodings)
    note(f"forwarded {request.head!r} {request.body!r}")
    note(f"readings of the forwarded body: {readings!r}; node: {node!r}")
    assert request.body == sent.body, "the body was not forwarded byte for byte"
    tool_calls = [r for r in readings if r.method == "tools/call"]
    if not tool_calls:
        return
    event("a tools/call reached the upstream")
    requests = [a for a in calls if a.get("event") == "mcp.session.request"]
    notifications = [a for a in calls if a.get("event") == "mcp.session.notification"]
    assert requests or notifications, f"tools/call read by {tool_calls!r}, never audited"
    for reading in tool_calls:
        assert allowed(reading.name), f"{reading!r}: a denied tool reached the upstream"
        if requests:
            audited = requests[-1]
            assert audited.get("allowed") is True, audited
            assert audited.get("name") == reading.name, (
                f"proxyd audited {audited.get('name')!r}, {reading.reader} reads {reading.name!r}"
            )
        else:
            # A notification is audited without its name: every reader must read one name.
            names = {json.dumps(r.name) for r in tool_calls}
            assert len(names) == 1, f"a forwarded tools/call notification read as {names}"


# --------------------------------------------------------------------------------------------
# Answers


def tool(name: str) -> Obj:
    return Obj((("name", name), ("inputSchema", Obj((("type", "object"),)))))


RESULT_KEYS = ["tools", "nextCursor", "x"]
TOOL_KEYS = ["name", "description", "x"]
ANSWER_KEYS = ["jsonrpc", "id", "result", "error", "method", "x"]
ODD_ANSWER_IDS: list[Node] = ["2", " 2", "02", Raw("2.0"), Raw("2e0"), Raw("20e-1"), 3, None]


@st.composite
def list_answers(draw: st.DrawFn) -> Node:
    names = draw(st.lists(tool_names(), max_size=3))
    names.append(draw(st.sampled_from(DENIED_NAMES + HOSTILE_NAMES[:6])))
    names = draw(st.permutations(names + mostly(draw, ALLOWED_NAMES, [[]], 20)))
    tools: list[Any] = []
    for name in names:
        members = [("name", name), ("inputSchema", Obj((("type", "object"),)))]
        if chance(draw, 20):
            members.append(("description", draw(st.sampled_from(["tools", DENIED_NAMES[0]]))))
        tools.append(finish(draw, members, TOOL_KEYS) if chance(draw, 30) else Obj(tuple(members)))
    result = finish(draw, [("tools", tools)], RESULT_KEYS)
    envelope: list[tuple[str, Any]] = [("jsonrpc", "2.0")]
    if not chance(draw, 5):
        envelope.append(("id", mostly(draw, 2, ODD_ANSWER_IDS, 30)))
    envelope.append(("result", result))
    message: Node = finish(draw, envelope, ANSWER_KEYS)
    if chance(draw, 8):
        notice = Obj((("jsonrpc", "2.0"), ("method", "notifications/message")))
        message = draw(st.permutations([message, notice]))
    return message


ANSWER_TYPES: list[str | None] = [
    "application/json",
    "text/event-stream",
    None,
    "",
    "application/json; charset=utf-8",
    "application/json; charset=UTF-8",
    'application/json; charset="utf-8"',
    "application/json; charset=utf-16",
    "application/json; charset=utf-7",
    "Application/JSON",
    "text/event-stream; charset=utf-8",
    "Text/Event-Stream",
    "TEXT/EVENT-STREAM",
    "text/event-stream;charset=UTF-8",
    "text/plain",
    "text/html",
    "application/octet-stream",
    "application/problem+json",
    "application/json, text/event-stream",
    "text/event-stream, application/json",
    'application/json; x="text/event-stream"',
]
LINE_ENDS = ["\n", "\r\n", "\r"]


@dataclass(frozen=True)
class HostileAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    framing: str
    cuts: tuple[int, ...]

    def script(self) -> Script:
        pieces = [p for p in iter_chunks(self.body, self.cuts) if p]
        return Script(self.status, self.headers, pieces, self.framing, pause=0.001)


@st.composite
def sse_stream(draw: st.DrawFn, texts: list[str]) -> str:
    """``texts`` as events, with every WHATWG framing a parser must handle."""
    mixed = chance(draw, 15)
    end = mostly(draw, "\n", ["\r\n", "\r"], 50)

    def nl() -> str:
        return draw(st.sampled_from(LINE_ENDS)) if mixed else end

    out = [mostly(draw, "", ["\ufeff", "\ufeff", LATIN1_BOM.decode(), "\ufeff\ufeff"], 20)]
    out[0] += mostly(draw, "", [": hello" + end + end, end, "retry: 10" + end], 20)
    for i, text in enumerate(texts):
        lines = []
        if chance(draw, 15):
            lines.append(": comment")
        kind = mostly(draw, None, ["message", "message", "Message", "other", "message "], 40)
        if kind is not None:
            lines.append("event: " + kind)
        if chance(draw, 20):
            lines.append(draw(st.sampled_from(["id: 5", "id:", "retry: 100", "retry: x", "x: y"])))
        cuts = []
        if chance(draw, 20):
            cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=2))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        for piece in pieces:
            field_name = mostly(draw, "data: ", ["data:", "\ufeffdata: ", "data:  ", "data:\t"], 20)
            lines.append(field_name + piece)
        lines = draw(st.permutations(lines)) if chance(draw, 5) else lines
        block = "".join(line + nl() for line in lines)
        last = i == len(texts) - 1
        if not (last and chance(draw, 10)):
            block += nl()  # the blank line that dispatches the event
        out.append(block)
    return "".join(out)


@st.composite
def hostile_answers(draw: st.DrawFn) -> HostileAnswer:
    message = draw(list_answers())
    style = draw(styles())
    form = draw(st.sampled_from(["json", "sse"]))
    if form == "json":
        prefix = mostly(draw, "", ["\ufeff", "\ufeff", LATIN1_BOM.decode(), " ", "\n"], 15)
        text = prefix + write_json(draw, message, style)
    else:
        # Single-line JSON mostly (a raw line break ends the data line), sometimes not.
        if not chance(draw, 20):
            style = Style("compact", style.escapes, style.upper_hex, False, False, None)
        texts = [write_json(draw, message, style)]
        if chance(draw, 15):
            notice = '{"jsonrpc":"2.0","method":"notifications/message","params":{}}'
            texts = draw(st.permutations([notice, *texts]))
        text = draw(sse_stream(texts))
    encoding = mostly(draw, "utf-8", ["utf-16", "utf-16-le", "latin-1"], 6)
    body = encode(text, encoding)
    headers: list[tuple[str, str]] = []
    usual_type = "application/json" if form == "json" else "text/event-stream"
    content_type = mostly(draw, usual_type, ANSWER_TYPES, 40)
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if chance(draw, 5):
        other = "application/json" if form == "sse" else "text/event-stream"
        headers.append(("Content-Type", other))
    codings = ["gzip", "gzip", "identity", "br", "gzip-lie", "identity, gzip", "x-gzip"]
    coding = mostly(draw, None, codings, 10)
    if coding is not None:
        headers.append(("Content-Encoding", "gzip" if coding == "gzip-lie" else coding))
        if "gzip" in coding and coding != "gzip-lie":
            body = _gzip(body)
    cuts = draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=5))
    if chance(draw, 25):
        # Every CR its own cut (a CRLF split across reads), and inside a leading BOM.
        carriage_returns = [i + 1 for i, byte in enumerate(body) if byte == 0x0D]
        cuts += [*carriage_returns[:8], 1, 2, 4]
    return HostileAnswer(
        status=mostly(draw, 200, [201, 202, 203, 206, 400, 404, 500], 35),
        headers=tuple(headers),
        body=body,
        framing=draw(st.sampled_from(["chunked", "length", "close"])),
        cuts=tuple(sorted(set(cuts))),
    )


CLIENT_REQUESTS = {
    "tools/list": b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}',
    "tools/call": b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo"}}',
    "ping": b'{"jsonrpc":"2.0","id":2,"method":"ping"}',
    "notification": b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
    "GET": b"",
}


def client_request(kind: str, token: str) -> bytes:
    body = CLIENT_REQUESTS[kind]
    accept = "text/event-stream" if kind == "GET" else "application/json, text/event-stream"
    lines = [
        f"{'GET' if kind == 'GET' else 'POST'} {PATH} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {token}",
        f"Accept: {accept}",
        "Connection: close",
    ]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def client_reads(reader: JsonReader, answer: HttpAnswer) -> dict[str, set[str]]:
    """Every tool name each reader finds in what the client received."""
    body = answer.body
    encodings = answer.header("Content-Encoding")
    if encodings:
        body = lenient_inflate(body, encodings) or body  # fetch inflates gzip itself
    content_types = answer.header("Content-Type")
    content_type = ", ".join(content_types) if content_types else None
    forms = answer_forms(content_types)
    sdk = reader.read_http_answer(answer.status, content_type, body)
    as_json = reader.read_answer(body)
    as_sse = reader.read_sse(body)
    note(f"TS SDK client reads: {sdk!r}")
    return {
        "ts-sdk": node_answer_tools(sdk),
        "python": python_answer_tools(body, sorted(forms)),
        "node": (node_answer_tools(as_json) if "json" in forms else set())
        | (node_answer_tools(as_sse) if "sse" in forms else set()),
        "blind": python_answer_tools(body) | node_answer_tools(as_json) | node_answer_tools(as_sse),
    }


def denied(names: set[str]) -> list[str]:
    return sorted(name for name in names if not allowed(name))


LISTED = (
    b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"delete_everything",'
    b'"inputSchema":{"type":"object"}},{"name":"echo","inputSchema":{"type":"object"}}]}}'
)


def _answer(body: bytes, content_type: str = "text/event-stream") -> HostileAnswer:
    return HostileAnswer(200, (("Content-Type", content_type),), body, "chunked", ())


# Counterexamples hypothesis found (shrunk), pinned so every run tries them first.
# A BOM at the start of a line after the first: an unknown field to WHATWG parsers (proxyd,
# the TS SDK), a data line to @microsoft/fetch-event-source, which decodes every field name
# with a non-streaming TextDecoder (a leading BOM is dropped on each decode() call).
LINE_BOM = _answer(b"event: message\n\xef\xbb\xbfdata: " + LISTED + b"\n\n")
# Two BOMs before the first field: proxyd and TextDecoderStream drop one; a reader that
# decodes each network chunk on its own (decode() without {stream: true}) drops both.
TWO_BOMS = _answer(b"\xef\xbb\xbf\xef\xbb\xbfdata: " + LISTED + b"\n\n")
# Member names with a NUL: distinct names to proxyd, "name"/"tools" to a reader of C
# strings (cJSON), which also takes the first of two.
NUL_NAME = _answer(
    b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name\\u0000":"delete_everything",'
    b'"name":"get_time","inputSchema":{"type":"object"}}]}}',
    "application/json",
)
NUL_TOOLS = _answer(LISTED.replace(b'"tools"', b'"tools\\u0000"'), "application/json")
# Found in the CI profile: the member is "result" up to its NUL (the filter compared names
# ignoring case only).
NUL_RESULT = _answer(LISTED.replace(b'"result"', b'"result\\u0000"'), "application/json")


@DIFFERENTIAL
@given(
    answer=hostile_answers(),
    kind=st.sampled_from(["tools/list", "tools/list", "tools/call", "ping", "notification", "GET"]),
)
@example(answer=LINE_BOM, kind="tools/list")
@example(answer=TWO_BOMS, kind="tools/list")
@example(answer=NUL_NAME, kind="tools/list")
@example(answer=NUL_TOOLS, kind="tools/call")
@example(answer=NUL_RESULT, kind="tools/call")
def test_no_answer_shows_a_client_a_denied_tool(
    stack: ProxyStack, reader: JsonReader, token: str, answer: HostileAnswer, kind: str
) -> None:
    MINTED.add(token)
    mark = len(stack.upstream.requests)
    stack.upstream.script = answer.script()
    received = stack.exchange([client_request(kind, token)])
    stack.audit_records()
    note(f"upstream answered {answer!r}")
    note(f"client received {received.raw[:2000]!r}")
    assert len(stack.upstream.requests) == mark + 1, "the request did not reach the upstream"
    seen = client_reads(reader, received)
    note(f"tool names read: {seen!r}")
    upstream_listed = python_answer_tools(lenient_inflate(answer.body, ["gzip"]) or answer.body)
    event("upstream listed a denied tool" if any(not allowed(n) for n in upstream_listed) else "-")
    event("client reads allowed tools" if seen["python"] | seen["ts-sdk"] else "no tool")
    # One assertion per reader: hypothesis reports each kind of failure on its own.
    assert not denied(seen["ts-sdk"]), f"the TS SDK client reads denied tools: {seen}"
    assert not denied(seen["python"]), f"a lenient Python client reads denied tools: {seen}"
    assert not denied(seen["node"]), f"Node reads denied tools (any status): {seen}"
    # No client is known to read an answer against its Content-Type (an event stream as one
    # JSON document): counted, not asserted (see the statistics, --hypothesis-show-statistics).
    if denied(seen["blind"]):
        event("a reader blind to Content-Type would read a denied tool")
