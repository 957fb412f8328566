"""Listening sockets handed over instead of bound: systemd socket activation (issue 13 §1).

systemd (``systemd/proxyd.socket``) binds the ports — 443 included, which the hardened unit
could not bind: it has no capabilities — and passes them from descriptor 3 on, with
``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for which process) and ``LISTEN_FDNAMES`` (the
socket units' ``FileDescriptorName=``, ``:``-separated): ``mcp`` and ``admin``; a single socket
with any other name is the MCP listener. An inherited socket takes precedence over ``listen``.
The sockets outlive the service, so a ``systemctl restart proxyd`` refuses no connection: they
wait in the kernel's accept queue for the next process.

A supervisor hands its MCP socket on to its workers (the same socket, accepted on by all) with
``PROXYD_LISTEN_FDS=mcp=<fd>``: LISTEN_PID cannot name a process not yet started.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from proxyd.log import get_logger

log = get_logger("proxyd")

SD_LISTEN_FDS_START = 3
WORKER_VAR = "PROXYD_LISTEN_FDS"
NAMES = ("mcp", "admin")


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, socket.socket]:
    """The inherited listening sockets by name (``mcp``, ``admin``); the variables are removed
    from the environment, so no child process takes them for its own."""
    env = os.environ if environ is None else environ
    fds: dict[str, int] = {}
    passed = env.pop(WORKER_VAR, None)
    if passed:
        for item in passed.split(","):
            key, _, number = item.partition("=")
            fds[key] = int(number)
    count = env.pop("LISTEN_FDS", None)
    pid = env.pop("LISTEN_PID", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if count and pid and pid.isdigit() and int(pid) == os.getpid():
        n = int(count) if count.isdigit() else 0
        names = names_text.split(":") if names_text else []
        names += [""] * (n - len(names))
        for index in range(n):
            fd = SD_LISTEN_FDS_START + index
            name = names[index]
            if name not in NAMES:
                if n == 1:
                    name = "mcp"
                else:
                    log.warning(
                        "inherited_socket_ignored",
                        fd=fd,
                        name=name,
                        detail='FileDescriptorName= must be "mcp" or "admin"',
                    )
                    continue
            fds.setdefault(name, fd)
    sockets: dict[str, socket.socket] = {}
    for key, descriptor in fds.items():
        sock = socket.socket(fileno=descriptor)
        sock.set_inheritable(False)
        sock.setblocking(False)
        sockets[key] = sock
    return sockets


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
