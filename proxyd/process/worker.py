"""The worker's side of a supervised ``proxyd run`` (``server.workers`` > 1): the boot message
on its control socket, dying with the supervisor, and serving (proxyd.process.single) as one
of the workers sharing the port."""

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

from proxyd.config import ConfigError, in_force, settings_from_text
from proxyd.log import configure, get_logger, set_context
from proxyd.process.loop import exit_code, run_loop
from proxyd.process.notify import Notifier
from proxyd.process.single import WorkerRole, serve

log = get_logger("proxyd")

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


def run_worker(
    config: str, index: int, control_fd: int, admin_socket: str, supervisor_pid: int
) -> int:
    """``proxyd worker``: started by the supervisor, never by hand. The exit code."""
    if not die_with_supervisor(supervisor_pid):
        return 1  # orphaned before it started: nobody would supervise it
    channel = socket.socket(fileno=control_fd)
    boot = read_boot(channel)
    try:
        if boot.boot_text is None or boot.boot_text == boot.text:
            settings = settings_from_text(boot.text, config)
        else:
            # Started after a reload: the reloaded settings, with the restart-only values the
            # service started on (its siblings kept them: same port, Redis, key and audit file),
            # as a worker that started then and applied the reload would have. The directory
            # is left to the watcher's first scan, as on a reload.
            settings = in_force(
                settings_from_text(boot.text, config, load_dir=False),
                settings_from_text(boot.boot_text, config, load_dir=False),
            )
    except ConfigError as exc:
        configure()
        log.error("config_invalid", path=config, problems=exc.problems)
        return 2
    configure(settings.log.level, settings.log.format)
    set_context(worker=index)
    role = WorkerRole(index, admin_socket, Notifier(channel=channel), boot.mcp_key)
    with exit_code(log) as code:
        run_loop(serve(settings, role=role))
    return code.value
