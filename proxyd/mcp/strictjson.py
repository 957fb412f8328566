"""One reading of a JSON text: the forms that two reasonable parsers read alike, nothing else.

proxyd decides on what it parses (tool policy, audit, routing) and forwards the original bytes,
so a message is accepted only where every mainstream parser must read it as proxyd does
(DESIGN.md "One reading of every message", issue 10). Refused, with the reason:

- bytes that are not strict UTF-8, or start with a byte order mark (RFC 8259 §8.1: no BOM;
  ``json.loads(bytes)`` guesses UTF-16/32 and skips a BOM, others refuse or keep it);
- an object with two members of the same name (RFC 8259 §4: behaviour is unpredictable;
  Python and ``JSON.parse`` keep the last, others the first), or with two names that a lenient
  reader takes for one proxyd reads (``canonical``: Go's ``encoding/json`` matches struct
  fields case-insensitively, with Unicode folding, so ``"param\\u017f"`` (long s) is
  ``params`` to it; cJSON ends a key at a NUL, so ``"name\\u0000x"`` is ``name``);
- ``NaN``/``Infinity`` (not JSON; Python accepts them, ``JSON.parse`` does not);
- an escaped lone surrogate (RFC 8259 §8.2: implementations differ: kept, replaced by U+FFFD
  or refused);
- nesting deeper than the parser can follow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
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


def canonical(name: str) -> str:
    """A member name as the most lenient reader matches it: case folded (Go's encoding/json,
    with Unicode folding) and cut at a NUL (C readers such as cJSON end a key there)."""
    return name.partition("\x00")[0].casefold()


def _plain(name: str) -> bool:
    return name.isascii() and name.islower() and "\x00" not in name


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise AmbiguousJson(f"duplicate member {_shown(name)}")
            seen.add(name)
    variants = [canonical(name) for name in obj if not _plain(name)]
    for name in variants:
        if name in PROTOCOL_NAMES and (name in obj or variants.count(name) > 1):
            raise AmbiguousJson(f"two members read as {_shown(name)} by a lenient reader")
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


def key_of(obj: Mapping[str, Any], name: str) -> str | None:
    """The key under which ``obj`` holds ``name``, also when spelled so that a lenient reader
    takes it for ``name`` (see ``canonical``); None if absent. Only for objects read by
    ``loads``, which leaves at most one such member for a name in PROTOCOL_NAMES."""
    if name in obj:
        return name
    for key in obj:
        if not _plain(key) and canonical(key) == name:
            return key
    return None


def member(obj: Mapping[str, Any], name: str) -> Any:
    """``obj``'s member ``name`` as ``key_of`` finds it; None if absent."""
    key = key_of(obj, name)
    return None if key is None else obj[key]


def misspelled(obj: Mapping[str, Any]) -> str | None:
    """The first member name that a lenient reader takes for a protocol name it is not
    (``"METHOD"``, ``"param\u017f"``, ``"name\u0000"``), if any."""
    for key in obj:
        if not _plain(key):
            name = canonical(key)
            if name in PROTOCOL_NAMES:
                return key
    return None
