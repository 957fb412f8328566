"""What create_app opens is closed, also when starting fails half way (issue 11)."""

from __future__ import annotations

import asyncio
import gc
import warnings
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxyd.app import RUNTIME, create_app
from proxyd.auth.assertion import KeyFileError
from proxyd.config import parse_settings


def app_with_key(tmp_path: Path, key: bytes | None) -> web.Application:
    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "state_dir": str(tmp_path)},
        "apps": [{"name": "a", "servers": ["http://127.0.0.1:1/mcp"]}],
    }
    if key is not None:
        key_file = tmp_path / "my-key.pem"
        key_file.write_bytes(key)
        key_file.chmod(0o600)
        doc["identity"] = {"key_file": str(key_file)}
    return create_app(parse_settings(doc))


async def test_a_start_that_fails_half_way_leaves_nothing_open(tmp_path: Path) -> None:
    """A bad identity.key_file fails the start after the upstream pool, the aiohttp client,
    the JWKS cache, the session store and the auditor exist: each is closed (it used to leave
    the ClientSession unclosed: ResourceWarning), and no task is left behind."""
    app = app_with_key(tmp_path, b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    runner = web.AppRunner(app)
    before = asyncio.all_tasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyFileError):
            await runner.setup()
        await runner.cleanup()
        del runner, app
        gc.collect()
        await asyncio.sleep(0)  # let any close scheduled by a finalizer run
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
    assert asyncio.all_tasks() - before == set()


async def test_a_started_app_closes_every_resource_in_reverse(tmp_path: Path) -> None:
    app = app_with_key(tmp_path, None)
    runner = web.AppRunner(app)
    await runner.setup()
    runtime = app[RUNTIME]
    resources = runtime.resources
    assert runtime.ready and runtime.handler.settings is runtime.settings
    await runner.cleanup()
    assert not runtime.ready
    assert resources.http.closed
    assert [
        t for t in asyncio.all_tasks() if not t.done() and t is not asyncio.current_task()
    ] == []
