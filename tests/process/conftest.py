"""Fixtures of the process tests: a REAL `proxyd run` as a child process (tests/kit/daemon.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.kit.daemon import Launch, launching


@pytest.fixture
async def launch(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Launch]:
    """Start `proxyd run -c FILE` and wait for `proxyd_started`; killed at teardown.

    tests/process/test_workers.py overrides it: a supervised run is ready at `supervisor_started`.
    """
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # never tell a real service manager
    async with launching() as start:
        yield start
