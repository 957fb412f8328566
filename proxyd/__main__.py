"""proxyd command line: run, check-config, dev, version."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from proxyd import __version__
from proxyd.auth.assertion import KeyFileError
from proxyd.config import ConfigError, load_settings
from proxyd.log import configure, get_logger

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
        settings = load_settings(path)
    except ConfigError as exc:
        configure()
        log.error("config_invalid", path=path, problems=exc.problems)
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 2
    configure(settings.log.level, settings.log.format)
    try:
        run_loop(serve(settings))
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
    return _dev(args.listen)


if __name__ == "__main__":
    sys.exit(main())
