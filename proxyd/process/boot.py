"""The boot message a supervisor sends each worker on its control socket, and a worker's tie
to the supervisor's life (shared by both sides: neither imports the other)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# Far above any real configuration file; the pair's buffer must hold the boot message whole.
MAX_BOOT_MESSAGE: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Boot:
    text: str
    mcp_key: bytes | None
    boot_text: str | None = None  # the supervisor's start text: its restart-only values hold


def read_boot(channel: socket.socket) -> Boot:
    """The supervisor's first message, sent before the worker was started."""
    raw = channel.recv(MAX_BOOT_MESSAGE)
    data: Mapping[str, Any] = json.loads(raw)
    key = data.get("mcp_key")
    started = data.get("boot_config")
    return Boot(
        text=str(data["config"]),
        mcp_key=bytes.fromhex(key) if key else None,
        boot_text=str(started) if started is not None else None,
    )


def die_with_supervisor(supervisor_pid: int) -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux prctl PR_SET_PDEATHSIG);
    False when it is already gone (the check after the prctl closes that race)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == supervisor_pid
