"""The event loop proxyd runs on, and how a serving process's failure becomes its exit code."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from proxyd.auth.assertion import KeyFileError

# The cyclic garbage collector's generation thresholds for a serving process (CPython's are
# 700, 10, 10). Issue 15: at 700 allocations a young collection ran every few requests, and
# with 10,000 idle streams open (~880k tracked objects) full collections took 1.2-1.5 s of a
# 5.6 s burst of new streams. Requests free nearly everything by reference counting, so
# collecting less often costs little memory: measured on `make bench`, idle streams opened
# ~23 % faster, POST c=64 p99 49 -> 37 ms and CPU per request ~7 % lower, RSS per idle
# stream unchanged.
GC_THRESHOLDS = (10_000, 20, 100)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (libuv's loop: a cheaper event loop for the byte relay, issue 6),
    the standard loop otherwise; PROXYD_LOOP=asyncio forces the standard one. The collector
    runs with GC_THRESHOLDS."""
    gc.set_threshold(*GC_THRESHOLDS)
    if os.environ.get("PROXYD_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


@dataclass
class ExitCode:
    value: int = 0


@contextmanager
def exit_code(log: Any) -> Iterator[ExitCode]:
    """0 when the block ends; 1, logged, when the identity key or a listener cannot be had
    (systemd then sees a failed start, not a crash trace)."""
    code = ExitCode()
    try:
        yield code
    except KeyFileError as exc:
        log.error("identity_key_unusable", error=str(exc))
        code.value = 1
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        code.value = 1
