"""proxyd command line: run, check-config, dev, version. Parses and dispatches, nothing else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxyd import __version__
from proxyd.config import ConfigError, load_settings


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


def _check(path: str) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    for key, message in settings.warnings:
        print(f"warning: {key}: {message}", file=sys.stderr)
    print(
        f"{path}: ok ({len(settings.apps)} apps, {len(settings.app_auth_configs)} app auth configs)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported per command: `version` and `check-config` load no server code.
    if args.command == "version":
        print(f"proxyd {__version__}")
        return 0
    if args.command == "check-config":
        return _check(args.config)
    if args.command == "run":
        from proxyd.process.single import run

        return run(args.config)
    if args.command == "worker":
        from proxyd.process.worker import run_worker

        return run_worker(
            args.config, args.index, args.control_fd, args.admin_socket, args.supervisor_pid
        )
    from proxyd.dev.main import main as dev

    return dev(args.listen)


if __name__ == "__main__":
    sys.exit(main())
