"""The two MCP protocol eras on one endpoint, and the 2026-07-28 routing-header check.

2025-era requests carry no ``MCP-Protocol-Version`` (initialize) or a handshake version; any
other declared version is the stateless era (the SDK routes the same way). In that era every
POST mirrors its JSON-RPC method in ``Mcp-Method`` and, for tools/call, prompts/get and
resources/read, the name in ``Mcp-Name`` (SEP-2243); a middlebox that routes or authorizes on
headers must check them against the body, or a client could say one thing and do another.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Mapping
from typing import Any, Final

from multidict import CIMultiDictProxy

from proxyd.errors import BadRequest, McpHeaderMismatch, PayloadTooLarge, UnsupportedMediaType
from proxyd.mcp import strictjson

HANDSHAKE_VERSIONS: Final = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
NAME_BEARING: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
PROTOCOL_VERSION_META: Final = "io.modelcontextprotocol/protocolVersion"
_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")
# JSON-RPC method names of MCP: printable ASCII without spaces ("tools/call",
# "notifications/progress"); a NUL or a control character is another name to some reader.
_METHOD = re.compile(r"[\x21-\x7e]{1,256}")
_SINGLE = ("MCP-Protocol-Version", "Mcp-Method", "Mcp-Name", "Mcp-Session-Id", "Last-Event-ID")
# RFC 9110 §8.3.1 media type with an optional charset parameter (OWS ";" OWS name=value).
# Only UTF-8 (RFC 8259 §8.1): body-parser honours any charset it knows (UTF-7 included), so a
# body read as UTF-8 here could name another tool there.
_JSON_MEDIA_TYPE = re.compile(r'application/json(?:[ \t]*;[ \t]*charset=(?:utf-8|"utf-8"))?', re.I)


def is_modern(headers: Mapping[str, str]) -> bool:
    version = headers.get("MCP-Protocol-Version")
    return version is not None and version not in HANDSHAKE_VERSIONS


def decode_header_value(value: str | None) -> str | None:
    """The ``=?base64?…?=`` form decoded (standard alphabet, UTF-8); None when malformed."""
    if value is None:
        return None
    match = _SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode() != payload:
            return None  # non-canonical: could never equal what an honest client encoded
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def check_content_type(headers: CIMultiDictProxy[str]) -> None:
    """A POST body is read as UTF-8 JSON only when its one Content-Type says exactly that."""
    values = headers.getall("Content-Type", ())
    if len(values) != 1 or _JSON_MEDIA_TYPE.fullmatch(values[0].strip(" \t")) is None:
        raise UnsupportedMediaType(
            "request Content-Type must be application/json (charset, if any, utf-8)"
        )


def inflated(body: bytes, encodings: list[str], limit: int) -> bytes:
    """The body as proxyd must read it; what goes upstream stays the original bytes.

    One coding at most, and a compressed body must end exactly where its stream ends: a second
    gzip member or trailing bytes are read by some inflaters (Node's zlib reads every member)
    and ignored by others, so they are refused rather than guessed at.
    """
    if len(encodings) > 1:
        raise BadRequest(
            "request Content-Encoding appears more than once", reason="unsupported_encoding"
        )
    coding = (encodings[0] if encodings else "identity").strip(" \t").lower()
    if coding == "identity":
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise BadRequest(
            f"request Content-Encoding {coding!r} is not supported", reason="unsupported_encoding"
        )
    # Bounded inflation: a small compressed body must not expand past the body limit.
    wbits = 31 if "gzip" in coding else 15
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequest("request body is not valid " + coding, reason="invalid_encoding") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes once inflated")
    if not inflater.eof or inflater.unused_data:
        raise BadRequest(
            f"request body is not exactly one {coding} stream", reason="invalid_encoding"
        )
    return out


def parse_message(body: bytes) -> dict[str, Any]:
    try:
        message = strictjson.loads(body)
    except strictjson.AmbiguousJson as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", reason="invalid_json") from None
    if not isinstance(message, dict):
        raise BadRequest(
            "request body must be one JSON-RPC message (batches are not part of MCP 2026-07-28)",
            reason="invalid_jsonrpc",
        )
    check_envelope(message)
    return message


def check_envelope(message: Mapping[str, Any]) -> None:
    """The members proxyd reads are spelled exactly, and the method is a plain name.

    proxyd reads ``method`` and ``params.name`` as spelled; a reader that matches names
    ignoring case or stops at a NUL reads ``"METHOD"`` or ``"name\u0000"`` as those members. A
    message with ``"METHOD":"tools/call"`` and a ``result`` was a response to proxyd (no policy,
    no audit) and a tools/call to Go's SDK; ``"tools/call\u0000"`` another method to proxyd
    and tools/call to a C reader (issue 10, found by the differential tests).
    """
    params = message.get("params")
    for obj in (message, params) if isinstance(params, dict) else (message,):
        wrong = strictjson.misspelled(obj)
        if wrong is not None:
            right = strictjson.canonical(wrong)
            raise BadRequest(
                f"JSON-RPC member {wrong[:40]!r} must be spelled {right!r}",
                reason="invalid_jsonrpc",
            )
    method = message.get("method")
    if isinstance(method, str) and _METHOD.fullmatch(method) is None:
        raise BadRequest(
            "JSON-RPC method must be 1-256 printable ASCII characters", reason="invalid_jsonrpc"
        )


def message_kind(message: Mapping[str, Any]) -> str:
    """request | notification | response (a client's answer to a server request)."""
    if message.get("jsonrpc") != "2.0":
        raise BadRequest("request body is not JSON-RPC 2.0", reason="invalid_jsonrpc")
    if isinstance(message.get("method"), str):
        return "request" if "id" in message else "notification"
    if "id" in message and ("result" in message or "error" in message):
        return "response"
    raise BadRequest(
        "request body is not a JSON-RPC request, notification or response",
        reason="invalid_jsonrpc",
    )


def check_framing(method: str, headers: CIMultiDictProxy[str], has_body: bool) -> None:
    """What can be refused before a body is read: repeated MCP fields, a GET or DELETE with a
    body (MCP gives them none: one would reach the upstream uninspected, a tools/call in a GET
    body included), a POST whose body would not be read as UTF-8 JSON."""
    check_single_headers(headers)
    if method != "POST":
        if has_body:
            raise BadRequest(f"a {method} request must not have a body")
    else:
        check_content_type(headers)


def check_single_headers(headers: CIMultiDictProxy[str]) -> None:
    """The MCP fields proxyd routes and decides on appear at most once, in either era.

    proxyd reads the first of two; Node joins them with ", " and others take the last: a
    second ``MCP-Protocol-Version`` could switch eras behind proxyd's back (issue 10).
    """
    for name in _SINGLE:
        if len(headers.getall(name, ())) > 1:
            raise McpHeaderMismatch(f"{name} header appears more than once")


def check_routing_headers(headers: CIMultiDictProxy[str], message: Mapping[str, Any]) -> None:
    """Raise McpHeaderMismatch (400, -32020) unless the routing headers mirror the body."""
    method = message.get("method")
    if not isinstance(method, str):
        raise BadRequest(
            "request body is not a JSON-RPC request or notification", reason="invalid_jsonrpc"
        )
    header_method = headers.get("Mcp-Method")
    if header_method is None:
        raise McpHeaderMismatch("Mcp-Method header is required")
    if header_method != method:
        raise McpHeaderMismatch("Mcp-Method header does not match the request body's method")
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    declared = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
    if declared is not None and declared != headers.get("MCP-Protocol-Version"):
        raise McpHeaderMismatch(
            "MCP-Protocol-Version header does not match the request's protocol version"
        )
    key = NAME_BEARING.get(method)
    if key is None:
        return
    body_value = params.get(key) if isinstance(params, dict) else None
    header_value = headers.get("Mcp-Name")
    if header_value is None:
        raise McpHeaderMismatch(f"Mcp-Name header is required for {method}")
    if body_value is None or decode_header_value(header_value) != body_value:
        raise McpHeaderMismatch(f"Mcp-Name header does not match the request body's {key!r}")
