"""SIGHUP: re-read and validate the main file; on success swap the configuration in force.

Apps, servers, health checks, limits, upstream timeouts, MCP session keys, the identity
assertion's lifetime, the main file's app auth configs and the log level change at once (one
Runtime reference, see app.py); requests and streams in flight finish on the configuration
they started with. The listeners read their header and keep-alive timeouts and connection cap
from that reference for each new connection and request head (proxyd/listener.py). A file
with any problem changes nothing: every problem is logged. What a running process cannot
change (listen addresses, directories, keys on disk, the state backend) is named in the log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxyd.app import CHECKER, RUNTIME, WATCHER
from proxyd.config import ConfigError, Settings, load_settings
from proxyd.log import get_logger, set_level
from proxyd.notify import Notifier

log = get_logger("proxyd.reload")

RESTART_ONLY: dict[str, Callable[[Settings], Any]] = {
    "server.listen": lambda s: (s.server.listen_host, s.server.listen_port),
    "server.state_dir": lambda s: s.server.state_dir,
    "server.max_header_size": lambda s: s.server.max_header_size,
    "server.workers": lambda s: s.server.workers,
    "admin": lambda s: s.admin,
    "log.format": lambda s: s.log.format,
    "identity.key_file": lambda s: s.identity.key_file,
    "jwks": lambda s: s.jwks,
    "app_auth.config_dir": lambda s: s.app_auth_config_dir,
    "audit.file": lambda s: s.audit.file,
    # The Redis connection, its fallbacks and key names are built once, at start.
    "state": lambda s: s.state,
}


def in_force(new: Settings, boot: Settings) -> Settings:
    """The new settings with the restart-only values of the running process, so nothing is
    half applied (e.g. a 431 limit above what aiohttp's parser was built with)."""
    server = dataclasses.replace(
        new.server,
        listen_host=boot.server.listen_host,
        listen_port=boot.server.listen_port,
        state_dir=boot.server.state_dir,
        max_header_size=boot.server.max_header_size,
        workers=boot.server.workers,
    )
    return dataclasses.replace(
        new,
        server=server,
        admin=boot.admin,
        log=dataclasses.replace(new.log, format=boot.log.format),
        identity=dataclasses.replace(new.identity, key_file=boot.identity.key_file),
        jwks=boot.jwks,
        app_auth_config_dir=boot.app_auth_config_dir,
        audit=dataclasses.replace(new.audit, file=boot.audit.file),
        state=boot.state,
    )


async def reload(app: web.Application, path: str, notifier: Notifier) -> bool:
    runtime = app[RUNTIME]
    metrics = runtime.shared.metrics
    notifier.reloading()
    try:
        new = load_settings(path, load_dir=False)
    except ConfigError as exc:
        log.error(
            "config_reload_failed",
            path=path,
            problems=exc.problems,
            kept="the configuration in force",
        )
        metrics.reloads.labels("sighup", "failed").inc()
        notifier.ready("reload failed: previous configuration in force")
        return False
    # Compared with what the process started with: that is what is in force for these keys.
    boot = runtime.boot_settings
    later = [key for key, value in RESTART_ONLY.items() if value(boot) != value(new)]
    if later:
        log.warning(
            "config_change_needs_restart",
            keys=later,
            detail="these settings keep their old values until proxyd restarts",
        )
    set_level(new.log.level)
    runtime.install(in_force(new, boot))
    app[WATCHER].set_main(new.main_app_auth_configs)
    checker = app[CHECKER]
    await checker.stop()
    checker.start()
    metrics.reloads.labels("sighup", "applied").inc()
    log.info(
        "config_reloaded",
        path=path,
        apps=[a.name for a in new.apps],
        generation=runtime.shared.store.snapshot.generation,
    )
    notifier.ready("serving (configuration reloaded)")
    return True
