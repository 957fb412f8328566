"""Fixtures of the MCP tests: the sealed-session rig (tests/kit/sessions.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import FakeClock, ProxyFactory
from tests.kit.issuer import TestIssuer
from tests.kit.sessions import Rig, sdk_servers


@pytest.fixture
async def rig(
    issuer: TestIssuer, clock: FakeClock, make_proxy: ProxyFactory, tmp_path: Path
) -> AsyncIterator[Rig]:
    """Two official-SDK upstreams, a real IdP, proxyd instances built from one config."""
    async with sdk_servers() as ups:
        yield Rig(ups, issuer, clock, make_proxy, tmp_path)
