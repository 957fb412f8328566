"""The worker's side of a supervised ``proxyd run`` (``server.workers`` > 1): the boot message
on its control socket, dying with the supervisor, and serving (proxyd.process.single) as one
of the workers sharing the port."""

from __future__ import annotations

import socket

from proxyd.config import ConfigError, in_force, settings_from_text
from proxyd.log import configure, get_logger, set_context
from proxyd.process.boot import die_with_supervisor, read_boot
from proxyd.process.loop import exit_code, run_loop
from proxyd.process.notify import Notifier
from proxyd.process.single import WorkerRole, serve

log = get_logger("proxyd")


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
