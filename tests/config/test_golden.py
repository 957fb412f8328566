"""`proxyd check-config` output compared whole against golden files: the safety net for a
config refactor (every problem at once, each with its key path, messages byte for byte).

Each ``golden/NAME.toml`` is checked by the real command (``python -m proxyd check-config -c
NAME.toml``, run inside ``golden/`` so the file name in the output is stable). Its expected
stderr is ``NAME.problems`` and its expected stdout ``NAME.out`` (an absent file: nothing);
problems mean exit 2, none exit 0. After an intended change of a message, rewrite them with
``PROXYD_GOLDEN_UPDATE=1 make test PYTEST_ARGS=tests/config/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
ROOT = GOLDEN.parents[2]  # the checkout whose proxyd is checked
CASES = sorted(path.stem for path in GOLDEN.glob("*.toml"))
UPDATE = os.environ.get("PROXYD_GOLDEN_UPDATE") == "1"


async def check_config(name: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "check-config",
        "-c",
        f"{name}.toml",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=GOLDEN,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    # A failure guard only: check-config exits on its own at once.
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def expected(path: Path, actual: str) -> str:
    if UPDATE:
        if actual:
            path.write_text(actual)
        else:
            path.unlink(missing_ok=True)
    return path.read_text() if path.exists() else ""


def test_the_golden_files_cover_every_section() -> None:
    text = "\n".join((GOLDEN / f"{name}.problems").read_text() for name in CASES if name != "valid")
    for section in (
        "server.",
        "admin.",
        "log.",
        "limits.unauthenticated.",
        "limits.per_user.",
        "sessions.",
        "upstream.",
        "identity.",
        "jwks.",
        "apps[0].",
        "apps[0].health_check.",
        "apps[0].upstream_auth.",
        "app_auth_configs[0].",
        "app_auth_configs[1].jwt.",
        "app_auth.",
        "roles[1].",
        "audit.",
        "state.",
        "tracing.",
    ):
        assert f"  {section}" in text, section
    assert (GOLDEN / "valid.out").exists() and not (GOLDEN / "valid.problems").exists()


@pytest.mark.parametrize("name", CASES)
async def test_check_config_output_matches_the_golden_file(name: str) -> None:
    code, out, err = await check_config(name)
    want_err = expected(GOLDEN / f"{name}.problems", err)
    want_out = expected(GOLDEN / f"{name}.out", out)
    assert err == want_err
    assert out == want_out
    assert code == (2 if want_err else 0), (code, err)
