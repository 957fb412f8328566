"""Every proxyd module imports on its own, first, in a fresh interpreter.

An import cycle shows only when a module outside the usual order is imported first:
``proxyd.upstream.pool`` before ``proxyd.config`` failed (bench/lean.py, issue 15), while every
test and the daemon import the config first.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import proxyd


def _modules() -> list[str]:
    found = pkgutil.walk_packages(proxyd.__path__, "proxyd.")
    return sorted(m.name for m in found if m.name != "proxyd.__main__")


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    modules = _modules()
    assert "proxyd.upstream.pool" in modules and len(modules) > 40
    # An interpreter per module would take ~40 s: one child imports them one by one instead,
    # forgetting every proxyd module between two imports, so each is imported first.
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'proxyd' or m.startswith('proxyd.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run(  # noqa: S603 (our own script, our own interpreter)
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
