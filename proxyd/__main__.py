"""proxyd command line: run, check-config, dev, version."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from proxyd import __version__
from proxyd.auth.assertion import KeyFileError
from proxyd.config import ConfigError, Settings, load_settings, read_config, settings_from_text
from proxyd.log import configure, get_logger, set_context

log = get_logger("proxyd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyd", description="Identity-aware proxy for remote MCP servers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True, help="TOML configuration file")
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("-c", "--config", required=True, help="TOML configuration file")
    dev = sub.add_parser("dev", help="run with an embedded demo app and token issuer")
    dev.add_argument("--listen", default="127.0.0.1:8443", help="host:port (default %(default)s)")
    sub.add_parser("version", help="print the version")
    # Internal: one process of a supervised `run` (server.workers > 1), started by it.
    worker = sub.add_parser("worker", help="(internal) a worker started by `proxyd run`")
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--control-fd", type=int, required=True)
    worker.add_argument("--admin-socket", required=True)
    worker.add_argument("--supervisor-pid", type=int, required=True)
    return parser


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (libuv's loop: a cheaper event loop for the byte relay, issue 6),
    the standard loop otherwise; PROXYD_LOOP=asyncio forces the standard one."""
    if os.environ.get("PROXYD_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _check(path: str) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(
        f"{path}: ok ({len(settings.apps)} apps, {len(settings.app_auth_configs)} app auth configs)"
    )
    return 0


def _run(path: str) -> int:
    from proxyd.server import serve

    try:
        text = read_config(path)
        settings = settings_from_text(text, path)
    except ConfigError as exc:
        configure()
        log.error("config_invalid", path=path, problems=exc.problems)
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 2
    configure(settings.log.level, settings.log.format)
    try:
        if settings.server.workers > 1:
            return _supervise(settings, path, text)
        run_loop(serve(settings))
    except KeyFileError as exc:
        log.error("identity_key_unusable", error=str(exc))
        return 1
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        return 1
    return 0


def _supervise(settings: Settings, path: str, text: str) -> int:
    from proxyd.supervisor import Supervisor

    codes: list[int] = []

    async def main() -> None:
        codes.append(await Supervisor(settings, path, text).run())

    run_loop(main())
    return codes[0] if codes else 1


def _worker(args: argparse.Namespace) -> int:
    from proxyd.notify import Notifier
    from proxyd.server import WorkerRole, serve
    from proxyd.supervisor import die_with_supervisor, read_boot

    if not die_with_supervisor(args.supervisor_pid):
        return 1  # orphaned before it started: nobody would supervise it
    channel = socket.socket(fileno=args.control_fd)
    boot = read_boot(channel)
    try:
        if boot.boot_text is None or boot.boot_text == boot.text:
            settings = settings_from_text(boot.text, args.config)
        else:
            from proxyd.reload import in_force

            # Started after a reload: the reloaded settings, with the restart-only values the
            # service started on (its siblings kept them: same port, Redis, key and audit file),
            # as a worker that started then and applied the reload would have. The directory
            # is left to the watcher's first scan, as on a reload.
            settings = in_force(
                settings_from_text(boot.text, args.config, load_dir=False),
                settings_from_text(boot.boot_text, args.config, load_dir=False),
            )
    except ConfigError as exc:
        configure()
        log.error("config_invalid", path=args.config, problems=exc.problems)
        return 2
    configure(settings.log.level, settings.log.format)
    set_context(worker=args.index)
    role = WorkerRole(args.index, args.admin_socket, Notifier(channel=channel), boot.mcp_key)
    try:
        run_loop(serve(settings, role=role))
    except KeyFileError as exc:
        log.error("identity_key_unusable", error=str(exc))
        return 1
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        return 1
    return 0


def _dev(listen: str) -> int:
    from proxyd.devmain import run_dev

    configure("info", "auto")
    try:
        run_loop(run_dev(listen))
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"proxyd {__version__}")
        return 0
    if args.command == "check-config":
        return _check(args.config)
    if args.command == "run":
        return _run(args.config)
    if args.command == "worker":
        return _worker(args)
    return _dev(args.listen)


if __name__ == "__main__":
    sys.exit(main())
