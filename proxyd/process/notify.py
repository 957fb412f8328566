"""systemd's sd_notify protocol (sd_notify(3)): one datagram per state change to $NOTIFY_SOCKET.

READY=1 once the configuration and app auth configs are loaded and the listeners bound;
RELOADING=1 … READY=1 around a SIGHUP reload (with MONOTONIC_USEC, which Type=notify-reload
requires and plain notify accepts); STOPPING=1 when draining starts. Without $NOTIFY_SOCKET
(not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time

from proxyd.log import get_logger

log = get_logger("proxyd.notify")


class Notifier:
    def __init__(self, address: str | None = None, channel: socket.socket | None = None) -> None:
        """``channel``: a connected socket to a proxyd supervisor, which speaks the same
        protocol for its workers (proxyd.process.supervisor); else $NOTIFY_SOCKET or ``address``."""
        self._channel = channel
        self._address = address if address is not None else os.environ.get("NOTIFY_SOCKET")

    @property
    def enabled(self) -> bool:
        return self._channel is not None or bool(self._address)

    def send(self, *fields: str) -> None:
        if self._channel is not None:
            try:
                self._channel.send("\n".join(fields).encode())
            except OSError as exc:
                log.warning("supervisor_notify_failed", error=str(exc))
            return
        if not self._address:
            return
        # A leading "@" names a socket in the abstract namespace (a NUL byte on the wire).
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")
