"""One reading of a JSON text: the forms that two reasonable parsers read alike, nothing else.

proxyd decides on what it parses (tool policy, audit, routing) and forwards the original bytes,
so a message is accepted only where every mainstream parser must read it as proxyd does
(DESIGN.md "One reading of every message", issue 10). Refused, with the reason:

- bytes that are not strict UTF-8, or start with a byte order mark (RFC 8259 §8.1: no BOM;
  ``json.loads(bytes)`` guesses UTF-16/32 and skips a BOM, others refuse or keep it);
- an object with two members of the same name (RFC 8259 §4: behaviour is unpredictable;
  Python and ``JSON.parse`` keep the last, others the first), or whose names differ only in
  case where the name is one proxyd reads (Go's ``encoding/json`` matches struct fields
  case-insensitively, with Unicode folding: ``"param\\u017f"`` (long s) is ``params`` to it);
- ``NaN``/``Infinity`` (not JSON; Python accepts them, ``JSON.parse`` does not);
- an escaped lone surrogate (RFC 8259 §8.2: implementations differ: kept, replaced by U+FFFD
  or refused);
- nesting deeper than the parser can follow.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

BOM: Final = b"\xef\xbb\xbf"
# Member names proxyd reads somewhere (JSON-RPC envelope, MCP params, tools/list answers):
# names equal to one of these under case folding are one name to a case-insensitive reader.
PROTOCOL_NAMES: Final = frozenset(
    {
        "jsonrpc",
        "id",
        "method",
        "params",
        "name",
        "uri",
        "arguments",
        "_meta",
        "result",
        "error",
        "tools",
    }
)
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_NAME_SHOWN: Final = 40


class AmbiguousJson(ValueError):
    """Not JSON, or JSON that another parser could read differently."""


def _refuse_constant(name: str) -> Any:
    raise AmbiguousJson(f"{name} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise AmbiguousJson(f"duplicate member {_shown(name)}")
            seen.add(name)
    folded = [name.casefold() for name in obj if not name.isascii() or not name.islower()]
    if folded:
        lower = {name for name in obj if name.isascii() and name.islower()}
        for name in folded:
            if name in PROTOCOL_NAMES and (name in lower or folded.count(name) > 1):
                raise AmbiguousJson(f"members named {_shown(name)} differing only in case")
    return obj


def _shown(name: str) -> str:
    return repr(name[:_NAME_SHOWN])


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_refuse_constant)


def loads(data: bytes) -> Any:
    """The one reading of ``data``, or AmbiguousJson saying why there is none."""
    if data.startswith(BOM):
        raise AmbiguousJson("a byte order mark is not allowed (RFC 8259 §8.1)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousJson("not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise AmbiguousJson("nested too deeply") from None
    except AmbiguousJson:
        raise
    except ValueError:
        raise AmbiguousJson("not valid JSON") from None
    if _SURROGATE_ESCAPE.search(data) is not None:
        # Paired escapes are decoded into one code point; only lone ones survive as
        # surrogates, which cannot be encoded.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise AmbiguousJson("an escaped lone surrogate (RFC 8259 §8.2)") from None
    return value


def member(obj: dict[str, Any], name: str) -> Any:
    """``obj[name]``, also when spelled in another case (see PROTOCOL_NAMES); None if absent.

    Only for objects read by ``loads``, which leaves at most one such member."""
    value = obj.get(name)
    if value is not None or name in obj:
        return value
    for key, value in obj.items():
        if key.casefold() == name:
            return value
    return None
