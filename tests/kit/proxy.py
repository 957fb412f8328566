"""Talking to an in-process proxyd: its config, tokens, and what its answers and logs must be."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.conftest import LogCapture, base_config
from tests.kit.issuer import TestIssuer
from tests.kit.wait import GUARD

__all__ = [
    "GUARD",
    "IDENTITY",
    "PUBLIC_URL",
    "RPC",
    "Client",
    "access_lines",
    "bearer",
    "config",
    "decode_assertion",
    "padded_rpc",
    "proxy_keys",
    "resource_metadata_header",
    "rpc_error",
]

Client = TestClient[web.Request, web.Application]

PUBLIC_URL = "https://mcp.example.com"
IDENTITY = "X-Proxyd-Identity"
RPC = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


def config(
    issuer: TestIssuer, apps: Mapping[str, str | list[str]], tmp_path: Path, **sections: Any
) -> dict[str, Any]:
    servers = {name: [url] if isinstance(url, str) else url for name, url in apps.items()}
    server = {"public_url": PUBLIC_URL, **sections.pop("server", {})}
    return base_config(issuer, servers, tmp_path, server=server, **sections)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def padded_rpc(size: int, seed: int = 1) -> bytes:
    """One valid JSON-RPC request of exactly ``size`` bytes, padded with seeded random text.

    Written the way no JSON serializer would (odd spacing, a unicode escape), so any
    re-encoding on the way shows up as a byte difference.
    """
    head = b'{ "jsonrpc" : "2.0", "id" : 7 , "method": "tools/call",\n "params": '
    head += b'{"name": "\\u0065cho", "arguments": {"text": "'
    tail = b'"} } }'
    fill = size - len(head) - len(tail)
    assert fill >= 0, f"{size} bytes is too small for a padded message"
    text = base64.b64encode(random.Random(seed).randbytes(fill))[:fill]  # no quote, no escape
    body = head + text + tail
    assert len(body) == size and json.loads(body)["params"]["name"] == "echo"
    return body


async def rpc_error(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """The answer is ``status`` with a JSON-RPC error object carrying a message."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", text
    body: dict[str, Any] = await resp.json()
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert isinstance(body["error"]["code"], int)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"].strip()
    return body


def access_lines(logs: LogCapture) -> list[dict[str, Any]]:
    return logs.events("request")


async def proxy_keys(client: Client) -> KeySet:
    resp = await client.get("/.well-known/jwks.json")
    assert resp.status == 200
    return KeySet.import_key_set(await resp.json())


def decode_assertion(value: str, keys: KeySet) -> dict[str, Any]:
    token = jwt.decode(value, keys, algorithms=["ES256"])
    assert token.header["alg"] == "ES256"
    return dict(token.claims)


def resource_metadata_header(app: str) -> str:
    return f'resource_metadata="{PUBLIC_URL}/.well-known/oauth-protected-resource/mcp/apps/{app}"'
