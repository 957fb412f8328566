"""The real processes: `proxyd dev` (what `make run` starts) and `proxyd run`, with signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxyd.process.loop import GC_THRESHOLDS
from tests.conftest import base_config
from tests.kit.daemon import spawn_proxyd
from tests.kit.issuer import TestIssuer
from tests.kit.net import free_port
from tests.kit.tomltext import toml_tables

GUARD = 30.0  # failure guard for waits on process output


async def _read_until(stream: asyncio.StreamReader, pattern: str) -> list[str]:
    lines: list[str] = []
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"stream ended before {pattern!r}; got {lines}")
        lines.append(raw.decode())
        if re.search(pattern, lines[-1]):
            return lines


async def _stop(proc: asyncio.subprocess.Process, sig: int) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), GUARD)


@pytest.fixture
async def dev_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    port = free_port()
    proc = await spawn_proxyd("dev", "--listen", f"127.0.0.1:{port}")
    try:
        assert proc.stderr is not None
        lines = await asyncio.wait_for(_read_until(proc.stderr, r"^\s+curl -N"), GUARD)
        token = lines[lines.index("Token:\n") + 1].strip()
        yield proc, f"http://127.0.0.1:{port}", token
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_dev_prints_a_working_token_and_streams(
    dev_process: tuple[asyncio.subprocess.Process, str, str],
) -> None:
    proc, base, token = dev_process
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "countdown", "arguments": {"steps": 3, "interval": 0}},
    }
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/mcp/apps/demo", json=body, headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = await resp.text()
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    assert [e["params"]["progress"] for e in events[:-1]] == [1, 2, 3]
    assert events[-1] == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"content": [{"type": "text", "text": "liftoff"}], "isError": False},
    }
    # The dev token is for the demo only: a tampered one is refused.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/mcp/apps/demo", json=body, headers={"Authorization": f"Bearer {token}x"}
        ) as bad,
    ):
        assert bad.status == 401
    assert await _stop(proc, signal.SIGINT) == 0


async def test_run_serves_and_exits_cleanly_on_sigterm(issuer: TestIssuer, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    doc = base_config(
        issuer,
        {"a": ["http://127.0.0.1:9/mcp"]},
        tmp_path,
        server={"listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "state")},
        admin={"listen": f"127.0.0.1:{admin}"},
        log={"format": "json"},
    )
    config = tmp_path / "proxyd.toml"
    config.write_text(toml_tables(doc))
    proc = await spawn_proxyd("run", "-c", str(config))
    try:
        assert proc.stdout is not None
        started = await asyncio.wait_for(_read_until(proc.stdout, "proxyd_started"), GUARD)
        assert json.loads(started[-1])["listen"] == f"127.0.0.1:{port}"
        assert json.loads(started[-1])["loop"] == "uvloop"  # installed with proxyd on Linux
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{admin}/readyz") as ready:
                assert ready.status == 200
            async with http.post(f"http://127.0.0.1:{port}/mcp/apps/a", json={}) as resp:
                assert resp.status == 401
        # The identity key was created on first start, private to the service.
        key = tmp_path / "state" / "identity-key.pem"
        assert key.stat().st_mode & 0o077 == 0
        assert await _stop(proc, signal.SIGTERM) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_run_raises_its_descriptor_limit_to_the_hard_one(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    """Started by hand with a soft limit of 256 (about 120 streams), proxyd takes what the hard
    limit allows: 10,000 SSE streams need 20,000 descriptors (issue 6)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.fail(f"this machine's hard descriptor limit ({hard}) leaves nothing to raise")
    port = free_port()
    doc = base_config(
        issuer,
        {"a": ["http://127.0.0.1:9/mcp"]},
        tmp_path,
        server={"listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "state")},
        admin={"enabled": False},
        log={"format": "json"},
    )
    config = tmp_path / "proxyd.toml"
    config.write_text(toml_tables(doc))

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "run",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=low_soft_limit,
    )
    try:
        assert proc.stdout is not None
        started = await asyncio.wait_for(_read_until(proc.stdout, "proxyd_started"), GUARD)
        limit = json.loads(started[-1])["fd_limit"]
        assert limit == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        soft_now, _ = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        assert soft_now == limit
        assert await _stop(proc, signal.SIGTERM) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_standard_event_loop_on_request(issuer: TestIssuer, tmp_path: Path) -> None:
    """PROXYD_LOOP=asyncio runs the standard loop (a way out if uvloop ever misbehaves)."""
    port = free_port()
    doc = base_config(
        issuer,
        {"a": ["http://127.0.0.1:9/mcp"]},
        tmp_path,
        server={"listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "state")},
        admin={"enabled": False},
        log={"format": "json"},
    )
    config = tmp_path / "proxyd.toml"
    config.write_text(toml_tables(doc))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "run",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PROXYD_LOOP": "asyncio"},
    )
    try:
        assert proc.stdout is not None
        started = await asyncio.wait_for(_read_until(proc.stdout, "proxyd_started"), GUARD)
        assert json.loads(started[-1])["loop"] == "asyncio"
        # Issue 15: the collector's thresholds for a serving process, on either loop.
        assert json.loads(started[-1])["gc_thresholds"] == list(GC_THRESHOLDS)
        assert await _stop(proc, signal.SIGTERM) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_version() -> None:
    proc = await spawn_proxyd("version")
    out, _ = await asyncio.wait_for(proc.communicate(), GUARD)
    assert proc.returncode == 0
    assert re.fullmatch(r"proxyd \d+\.\d+\.\d+\n", out.decode())
