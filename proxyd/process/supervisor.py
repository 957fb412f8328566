"""``server.workers > 1``: a supervisor process and N workers sharing the MCP port (issue 6).

The supervisor binds no MCP socket and serves no MCP request. It validates the file, makes the
state every worker must share (the identity key on disk, an MCP session key when the file names
none), starts the workers, and is the service to systemd: READY=1 once every worker is serving,
RELOADING=1 … READY=1 around a reload that it forwards to every worker, STOPPING=1 when it
forwards SIGTERM. A worker that dies is started again (with a back-off when it keeps dying) on
the configuration the others run — the text the supervisor last accepted, not a file edited
since and never reloaded. The admin listener is the supervisor's: /healthz, /readyz and a
/metrics that merges every worker's metrics with a ``worker`` label.

Each worker gets one end of a SOCK_SEQPACKET socket pair: the supervisor sends the boot message
(configuration text, MCP key) on it, the worker answers with sd_notify(3) fields. A pair, not a
named socket: nobody else can speak on it, the sender is known by the socket, and its end of
file says the worker is gone. Workers ask the kernel for SIGTERM when the supervisor dies
(PR_SET_PDEATHSIG), so no worker outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from proxyd.auth.assertion import load_or_create_key
from proxyd.config import ConfigError, Settings, read_config, settings_from_text
from proxyd.listener import Listener, ListenerSite
from proxyd.log import get_logger
from proxyd.process.activation import WORKER_VAR, describe, inherited_sockets
from proxyd.process.admin import admin_app, merged_metrics
from proxyd.process.boot import MAX_BOOT_MESSAGE
from proxyd.process.loop import run_loop
from proxyd.process.notify import Notifier
from proxyd.process.reloader import Reloader
from proxyd.process.single import listener_tls
from proxyd.tls import ServerTLS, TLSError

log = get_logger("proxyd.supervisor")

# A worker that takes longer than this to apply a forwarded SIGHUP is reported, not waited for.
RELOAD_TIMEOUT: Final = 60.0
# After the workers' own grace, how long they may take to exit before SIGKILL.
EXIT_SLACK: Final = 10.0


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How long to wait before starting a worker again.

    A worker that ran ``stable_after`` seconds or more is restarted at once (after
    ``initial``): it was a crash, not a crash loop. One that died sooner waits twice as long
    as the last time, up to ``maximum`` — a broken host (no memory, no file descriptors)
    must not spin the supervisor.
    """

    initial: float = 0.1
    maximum: float = 30.0
    stable_after: float = 10.0

    def next_delay(self, previous: float, lived: float) -> float:
        if lived >= self.stable_after or previous <= 0:
            return self.initial
        return min(previous * 2, self.maximum)


def describe_exit(code: int) -> str:
    """asyncio reports death by signal N as -N."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def parse_fields(message: bytes) -> dict[str, str]:
    """sd_notify fields, one KEY=VALUE per line; anything else is ignored."""
    fields: dict[str, str] = {}
    for line in message.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


@dataclass(eq=False)
class Worker:
    index: int
    admin_socket: str
    process: asyncio.subprocess.Process | None = None
    channel: socket.socket | None = None
    state: str = "stopped"  # starting | ready | reloading | stopping | stopped
    status: str = ""
    started_at: float = 0.0
    readies: int = 0  # READY=1 messages so far: a reload is applied when this moves
    restarts: int = 0
    delay: float = 0.0
    generation: int = 0  # of the configuration text it was started with or told to reload

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Supervisor:
    settings: Settings
    path: str
    text: str  # the configuration every (re)started worker gets
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    notifier: Notifier = field(default_factory=Notifier)
    workers: list[Worker] = field(default_factory=list)
    mcp_key: bytes | None = None
    stopping: bool = False
    failed: bool = False  # a worker died before the service was ready
    booted: bool = False
    reload_failures: int = 0
    generation: int = 0  # bumped by every configuration the supervisor accepts
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _reloader: Reloader = field(init=False)
    # The text the service started on: its restart-only values (listen, state, key file,
    # audit file, ...) stay in force after a reload, so a replacement worker must get them
    # too, not the reloaded ones (it bound a reloaded port alone, split from its siblings).
    boot_text: str = field(init=False, default="")
    # Sockets systemd handed over (proxyd/process/activation.py): the MCP one goes to every
    # worker, the admin one is the supervisor's.
    inherited: dict[str, socket.socket] = field(default_factory=dict)
    admin_tls: ServerTLS | None = None

    def __post_init__(self) -> None:
        self.boot_text = self.text
        self._reloader = Reloader(self._reload, self._why_not_reload, log)

    # ------------------------------------------------------------------------------------
    # The service's life

    async def run(self) -> int:
        """0 after a clean stop, 1 when the workers could not be started."""
        loop = asyncio.get_running_loop()
        s = self.settings
        self.inherited = inherited_sockets()
        self.admin_tls = listener_tls("admin", s.admin.tls)
        # Before any worker runs: one creates the identity key, the others would race it.
        load_or_create_key(s.identity.key_file, s.server.state_dir)
        if not s.sessions.mcp_keys:
            log.warning(
                "mcp_session_key_ephemeral",
                detail="no sessions.mcp_keys configured: MCP sessions will not survive a "
                "restart or work across proxyd instances (the workers share one key)",
            )
            self.mcp_key = os.urandom(32)
        if s.state.backend == "memory":
            log.warning(
                "state_per_worker",
                workers=s.server.workers,
                detail="each worker keeps its own rate-limit buckets and verified sessions: "
                "the workers together allow up to workers x the configured limits; "
                '[state] backend = "redis" makes them one',
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reloader.on_hup)
        admin: web.AppRunner | None = None
        with tempfile.TemporaryDirectory(prefix="proxyd-workers-") as private:
            # Mode 0700 (mkdtemp): the workers' admin sockets are nobody else's to read.
            self.workers = [
                Worker(i, str(Path(private) / f"admin-{i}.sock")) for i in range(s.server.workers)
            ]
            keepers = [
                asyncio.create_task(self._keep(w), name=f"worker-{w.index}") for w in self.workers
            ]
            try:
                await self._until(lambda: self.failed or self._stop.is_set() or self._all_ready())
                if not self.failed and not self._stop.is_set():
                    self.booted = True
                    admin = await self._start_admin()
                    log.info(
                        "supervisor_started",
                        workers=len(self.workers),
                        pids=[w.pid for w in self.workers],
                        listen=describe(self.inherited["mcp"])
                        if "mcp" in self.inherited
                        else f"{s.server.listen_host}:{s.server.listen_port}",
                        tls=s.server.tls is not None,
                    )
                    self.notifier.ready(self._status())
                    await self._stop.wait()
            finally:
                await self._shutdown(keepers)
                if admin is not None:
                    await admin.cleanup()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        log.info("supervisor_stopped")
        return 1 if self.failed else 0

    async def _shutdown(self, keepers: list[asyncio.Task[None]]) -> None:
        self.stopping = True
        self._stop.set()  # wakes a slot waiting out a restart back-off, whatever ended run()
        self._changed()
        self.notifier.stopping()
        log.info("supervisor_stopping", grace_seconds=self.settings.server.shutdown_grace)
        await self._reloader.close()
        for worker in self.workers:
            self._signal(worker, signal.SIGTERM)
        deadline = self.settings.server.shutdown_grace + EXIT_SLACK
        _, late = await asyncio.wait(keepers, timeout=deadline)
        if late:
            for worker in self.workers:
                if worker.alive:
                    log.error(
                        "worker_killed",
                        worker=worker.index,
                        pid=worker.pid,
                        reason="did not exit after the shutdown grace",
                    )
                    self._signal(worker, signal.SIGKILL)
        for outcome in await asyncio.gather(*keepers, return_exceptions=True):
            if isinstance(outcome, Exception):
                # A slot's own failure: said here, since nothing else awaits it.
                log.error("worker_slot_failed", error=f"{type(outcome).__name__}: {outcome}")

    async def _keep(self, worker: Worker) -> None:
        """One worker slot for the supervisor's whole life: start, watch, start again."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                await self._spawn(worker)
            except OSError as exc:
                log.error("worker_start_failed", worker=worker.index, error=str(exc))
                code = None
            else:
                assert worker.process is not None
                if self.stopping:
                    # Stopped while this spawn was awaited: _shutdown's SIGTERM missed it, and
                    # it would serve until the SIGKILL past the grace.
                    self._signal(worker, signal.SIGTERM)
                code = await worker.process.wait()
            self._closed(worker)
            if self.stopping:
                return
            lived = loop.time() - worker.started_at
            log.error(
                "worker_exited",
                worker=worker.index,
                pid=worker.pid,
                status=describe_exit(code) if code is not None else "not started",
                lived_seconds=round(lived, 3),
            )
            if not self.booted:
                # A worker that cannot start once will not start N times: the configuration,
                # the port or the host is wrong, and the service must say so, not loop.
                self.failed = True
                self._stop.set()
                return
            worker.delay = self.policy.next_delay(worker.delay, lived)
            worker.restarts += 1
            self.notifier.send(f"STATUS={self._status()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), worker.delay)

    async def _spawn(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with contextlib.suppress(OSError):
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_BOOT_MESSAGE)
            # The generation of the text sent now: a reload while the spawn is awaited sends
            # this worker nothing (not alive yet) and must reach it once it serves.
            generation = self.generation
            boot = {
                "config": self.text,
                "boot_config": self.boot_text,
                "mcp_key": self.mcp_key.hex() if self.mcp_key else None,
            }
            ours.send(json.dumps(boot).encode())
            ours.setblocking(False)
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            passed = [theirs.fileno()]
            if "mcp" in self.inherited:
                # One socket accepted on by every worker (not SO_REUSEPORT: it is not ours
                # to bind again).
                mcp_fd = self.inherited["mcp"].fileno()
                passed.append(mcp_fd)
                env[WORKER_VAR] = f"mcp={mcp_fd}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(worker.admin_socket)  # a dead worker's socket file
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxyd",
                "worker",
                "-c",
                self.path,
                "--index",
                str(worker.index),
                "--control-fd",
                str(theirs.fileno()),
                "--admin-socket",
                worker.admin_socket,
                "--supervisor-pid",
                str(os.getpid()),
                pass_fds=tuple(passed),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.channel = ours
        worker.generation = generation
        worker.state = "starting"
        worker.started_at = loop.time()
        loop.add_reader(ours.fileno(), self._on_message, worker)
        log.info("worker_spawned", worker=worker.index, pid=worker.pid)

    def _closed(self, worker: Worker) -> None:
        if worker.channel is not None:
            asyncio.get_running_loop().remove_reader(worker.channel.fileno())
            worker.channel.close()
            worker.channel = None
        worker.state = "stopped"
        self._changed()

    def _on_message(self, worker: Worker) -> None:
        channel = worker.channel
        assert channel is not None
        while True:
            try:
                message = channel.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:
                # The worker is gone; its exit status arrives through process.wait().
                asyncio.get_running_loop().remove_reader(channel.fileno())
                return
            fields = parse_fields(message)
            if "STATUS" in fields:
                worker.status = fields["STATUS"]
            if fields.get("RELOADING") == "1":
                worker.state = "reloading"
            if fields.get("READY") == "1":
                first = worker.state == "starting"
                worker.state = "ready"
                worker.readies += 1
                if first and worker.generation < self.generation:
                    # Started on the text before a reload it was too young to be sent (a
                    # SIGHUP before its handler exists would kill it): it catches up now.
                    worker.generation = self.generation
                    self._signal(worker, signal.SIGHUP)
                    log.info("reload_forwarded", workers=[worker.index], reason="late_start")
                if first and self.booted:
                    log.info(
                        "worker_replaced",
                        worker=worker.index,
                        pid=worker.pid,
                        restarts=worker.restarts,
                    )
                    self.notifier.send(f"STATUS={self._status()}")
            if fields.get("STOPPING") == "1":
                worker.state = "stopping"
            self._changed()

    # ------------------------------------------------------------------------------------
    # Signals

    def _why_not_reload(self) -> str | None:
        if self.stopping or not self.booted:
            return "stopping" if self.stopping else "starting"
        return None

    async def _reload(self) -> None:
        self.notifier.reloading()
        try:
            text = read_config(self.path)
            new = settings_from_text(text, self.path, load_dir=False)
        except ConfigError as exc:
            # The workers would refuse it just the same: they are not bothered.
            self.reload_failures += 1
            log.error(
                "config_reload_failed",
                path=self.path,
                problems=exc.problems,
                kept="the configuration in force",
            )
            self.notifier.ready("reload failed: previous configuration in force")
            return
        if self.admin_tls is not None:
            try:
                self.admin_tls.reload()  # a bad pair keeps the one in force (and the reload
            except TLSError as exc:  # goes on for the workers: their listeners are theirs)
                self.reload_failures += 1
                log.error("tls_reload_failed", listener="admin", error=str(exc))
        for key, message in new.warnings:  # logged here once, not by each worker
            log.warning("config_warning", key=key, message=message, path=self.path)
        self.text = text
        self.generation += 1
        if new.server.workers != self.settings.server.workers:
            log.warning(
                "config_change_needs_restart",
                keys=["server.workers"],
                detail="these settings keep their old values until proxyd restarts",
            )
        targets = [w for w in self.workers if w.alive and w.state != "starting"]
        marks = {w.index: w.readies for w in targets}
        for worker in targets:
            worker.generation = self.generation
            self._signal(worker, signal.SIGHUP)
        log.info("reload_forwarded", workers=[w.index for w in targets])

        def applied() -> bool:
            return all(w.readies > marks[w.index] or not w.alive for w in targets)

        try:
            await asyncio.wait_for(self._until(applied), RELOAD_TIMEOUT)
        except TimeoutError:
            log.error(
                "reload_incomplete",
                workers=[w.index for w in targets if w.readies <= marks[w.index]],
                waited_seconds=RELOAD_TIMEOUT,
            )
        self.notifier.ready(self._status())

    def _signal(self, worker: Worker, sig: signal.Signals) -> None:
        if worker.alive:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)

    # ------------------------------------------------------------------------------------
    # State

    def _changed(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def _until(self, condition: Any) -> None:
        while not condition():
            await self._wake.wait()

    def _all_ready(self) -> bool:
        return all(w.state == "ready" for w in self.workers)

    def ready_count(self) -> int:
        return sum(w.state in ("ready", "reloading") for w in self.workers)

    def _status(self) -> str:
        s = self.settings.server
        return (
            f"{self.ready_count()}/{len(self.workers)} workers serving on "
            f"{s.listen_host}:{s.listen_port}"
        )

    # ------------------------------------------------------------------------------------
    # Admin listener

    async def _start_admin(self) -> web.AppRunner | None:
        admin = self.settings.admin
        if not admin.enabled:
            return None
        runner = web.AppRunner(self.admin_app(), access_log=None)
        await runner.setup()
        listener = Listener(lambda: self.settings.server, capped=False)
        context = self.admin_tls.context if self.admin_tls is not None else None
        if "admin" in self.inherited:
            site = ListenerSite(runner, listener, sock=self.inherited["admin"], ssl_context=context)
        else:
            site = ListenerSite(
                runner,
                listener,
                host=admin.listen_host,
                port=admin.listen_port,
                ssl_context=context,
            )
        await site.start()
        return runner

    def admin_app(self) -> web.Application:
        # Serving while any worker accepts: the kernel only hands connections to bound
        # sockets, so a worker being replaced costs capacity, not answers.
        return admin_app(
            ready=lambda: not self.stopping and self.ready_count() > 0,
            metrics=self.scrape,
            details=lambda: {"workers": self._worker_view()},
        )

    def _worker_view(self) -> dict[str, Any]:
        return {
            "total": len(self.workers),
            "ready": self.ready_count(),
            "states": {str(w.index): w.state for w in self.workers},
        }

    async def scrape(self) -> bytes:
        """Every worker's metrics with a ``worker`` label, and the supervisor's own."""
        return await merged_metrics(self.workers)


def supervise(settings: Settings, path: str, text: str) -> int:
    """``proxyd run`` with ``server.workers`` > 1: the supervisor's exit code."""
    codes: list[int] = []

    async def main() -> None:
        codes.append(await Supervisor(settings, path, text).run())

    run_loop(main())
    return codes[0] if codes else 1
