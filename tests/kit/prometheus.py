"""promtool and a REAL Prometheus server (Debian's ``prometheus`` package) for the tests of the
shipped dashboard and alert rules (tests/test_observability.py).

``PrometheusServer`` scrapes the given targets every second as job ``proxyd``, evaluates the
given rule files every second, listens on a free 127.0.0.1 port and keeps its TSDB in a temp
directory; readiness is ``/-/ready`` answered, polled (never a fixed sleep). It is stopped by
the test that started it: no Prometheus is left running. Without the binaries the tests that
need them are skipped locally and fail when ``CI`` is set (CI installs the package, .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kit.net import free_port
from tests.kit.wait import GUARD, until


def prometheus_binary(name: str) -> str:
    """``promtool`` or ``prometheus``: its path, or a skip (a failure under CI)."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )
    if found is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return found


def promtool(*args: str, cwd: Path | None = None) -> str:
    """Run promtool; its output (stdout and stderr), asserting it succeeded."""
    # argv: the installed promtool and the test's own arguments, no outside input.
    done = subprocess.run(  # noqa: S603
        [prometheus_binary("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


class PrometheusServer:
    def __init__(self, directory: Path, targets: Sequence[str], rule_files: Sequence[Path]) -> None:
        self.binary = prometheus_binary("prometheus")
        self.directory = directory
        self.port = free_port()
        self.config = directory / "prometheus.yml"
        # JSON is YAML: the config written without a YAML library.
        doc = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": "proxyd", "static_configs": [{"targets": list(targets)}]}
            ],
        }
        self.config.write_text(json.dumps(doc, indent=2))
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "prometheus.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Start it and wait until it says it is ready."""
        self._spawn()

        async def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-3000:]}")
            try:
                async with http.get(f"{self.base}/-/ready") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await until(ready, "prometheus ready", GUARD * 3)

    def _spawn(self) -> None:
        assert self.process is None
        argv = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("wb") as log:
            # argv: the installed prometheus and paths/ports chosen here, no outside input.
            self.process = subprocess.Popen(  # noqa: S603
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=GUARD)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """The ``data`` of a /api/v1 answer (asserting status success)."""
        async with http.get(f"{self.base}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector), at the server's now."""
        data = await self.api(http, "query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result
