"""TOML text for config documents, as the tests write them to files."""

from __future__ import annotations

import json
from typing import Any


def to_toml(doc: dict[str, Any]) -> str:
    """A config document as TOML: top-level keys with inline tables (valid TOML 1.0)."""

    def value(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    return "".join(f"{json.dumps(key)} = {value(v)}\n" for key, v in doc.items())


def toml_tables(doc: dict[str, object]) -> str:
    """Just enough TOML writing for these documents (tables, arrays of tables, scalars)."""
    out: list[str] = []

    def value(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    def table(prefix: str, t: dict[str, object]) -> None:
        scalars = {k: v for k, v in t.items() if not isinstance(v, dict | list) or k == "labels"}
        nested = {k: v for k, v in t.items() if k not in scalars}
        for k, v in scalars.items():
            out.append(f"{k} = {value(v)}")
        for k, v in nested.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                out.append(f"[{name}]")
                table(name, v)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for item in v:
                    out.append(f"[[{name}]]")
                    table(name, item)
            else:
                out.append(f"{k} = {value(v)}")

    table("", doc)
    return "\n".join(out) + "\n"
