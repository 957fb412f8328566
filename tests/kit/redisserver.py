"""A real ``redis-server`` on a free 127.0.0.1 port (and a unix socket) in a temp directory.

No persistence (``--save ''``, ``--appendonly no``); started and stopped by the tests, which
may also kill it mid-run and start it again on the same port. Readiness is a PING answered,
polled; never a fixed sleep. Without ``redis-server`` the tests that need it are skipped
locally and fail when ``CI`` is set (CI installs the Debian package, see .ci/run).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.kit.net import free_port

READY_GUARD = 10.0  # seconds for redis-server to answer PING; a failure guard only


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)),
        None,
    )
    if found is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return found


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One RESP command over a plain socket; the raw reply (first read)."""
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return s.recv(65536)


class RedisServer:
    def __init__(self, directory: Path, extra: Sequence[str] = ()) -> None:
        self.binary = redis_server_binary()
        self.directory = directory
        self.port = free_port()
        self.socket_path = directory / "redis.sock"
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        assert self.process is None
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            "--daemonize",
            "no",
            *self.extra,
        ]
        # argv: the installed redis-server and paths/ports this fixture chose, no outside input.
        self.process = subprocess.Popen(  # noqa: S603
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + READY_GUARD
        while not self.answers():
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else b""
                log = self.directory / "redis.log"
                detail = log.read_text(errors="replace") if log.exists() else ""
                raise RuntimeError(f"redis-server exited: {err!r} {detail[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.01)  # polling a condition: redis-server signals nothing

    def answers(self) -> bool:
        try:
            reply = command(self.port, "PING", timeout=0.5)
        except OSError:
            return False
        # With requirepass, an unauthenticated PING is refused: still an answer.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(timeout=READY_GUARD)
        if process.stderr is not None:
            process.stderr.close()

    def kill(self) -> None:
        """Gone at once, as a crashed or unplugged Redis."""
        self.stop(signal.SIGKILL)

    def command(self, *args: str) -> bytes:
        return command(self.port, *args)
