"""Keeps the app auth configs current in memory: the main file's plus one per ``*.toml`` file in
``app_auth.config_dir``, merged by name (Teleport's app auth config watcher, on files).

Changes apply without a signal: watchfiles (inotify on Linux, polling elsewhere or when
forced) wakes a rescan within a fraction of a second; create, modify, delete, rename and the
atomic replace-by-rename of editors and config management all show as directory events. A
file that fails to parse keeps its last good version in force and is reported with its key
paths; a duplicate name is an error for the later source. Each rescan installs one new
snapshot atomically and logs one line per change with the generation.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from proxyd.auth.appauth import AppAuthStore
from proxyd.config import (
    AppAuthConfig,
    ConfigError,
    merge_app_auth_configs,
    parse_app_auth_file,
)
from proxyd.log import get_logger

log = get_logger("proxyd.watcher")


@dataclass(slots=True)
class _File:
    digest: str
    good: AppAuthConfig | None  # the last version that parsed, if any
    # Order of first appearance. A duplicate name is an error for the file that came later:
    # merging in name order let a newly dropped file (say 00-x.toml) take over a config in
    # force and reject the file that had defined it all along.
    seen: int = 0


def _is_config(_: watchfiles.Change, path: str) -> bool:
    return path.endswith(".toml")


class AuthConfigWatcher:
    def __init__(
        self,
        store: AppAuthStore,
        main: tuple[AppAuthConfig, ...],
        directory: str | None,
        *,
        force_polling: bool | None = None,
    ) -> None:
        self._store = store
        self._main = main
        self._dir = Path(directory) if directory else None
        self._files: dict[Path, _File] = {}
        self._arrivals = itertools.count()
        self._force_polling = force_polling
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._duplicates: set[str] = set()  # merge problems already reported
        self.rescans = 0

    def rescan(self) -> None:
        """Read what changed in the directory, merge with the main configs, swap if different."""
        self.rescans += 1
        if self._dir is not None:
            self._read_dir(self._dir)
        ordered = sorted(self._files.items(), key=lambda item: (item[1].seen, item[0]))
        files = [f.good for _, f in ordered if f.good is not None]
        merged, problems = merge_app_auth_configs(self._main, files)
        for problem in problems:
            # Once per problem, not on every rescan while it lasts (one line per change).
            if problem not in self._duplicates:
                log.error("app_auth_config_rejected", problem=problem, kept="first definition")
        self._duplicates = set(problems)
        changes = self._store.swap(merged)
        generation = self._store.snapshot.generation
        for change in changes:
            log.info(
                f"app_auth_config_{change.kind}",
                config=change.name,
                source=change.source,
                generation=generation,
            )

    def set_main(self, main: tuple[AppAuthConfig, ...]) -> None:
        """The main file was reloaded (SIGHUP): merge its configs with the directory's."""
        self._main = main
        self.rescan()

    def _read_dir(self, directory: Path) -> None:
        try:
            # os.scandir, not Path.glob: glob swallows PermissionError and answers a missing
            # or non-directory path with nothing, which removed every file's config.
            with os.scandir(directory) as entries:
                present = {
                    directory / e.name for e in entries if e.name.endswith(".toml") and e.is_file()
                }
        except OSError as exc:
            log.error("app_auth_dir_unreadable", directory=str(directory), error=str(exc))
            return  # keep everything we had: an unreadable directory is no reason to drop
        for gone in set(self._files) - present:
            del self._files[gone]
        for path in sorted(present):
            try:
                raw = path.read_bytes()
            except OSError as exc:
                # Vanished between listing and reading (a rename in flight): next event.
                log.warning("app_auth_file_unreadable", file=str(path), error=str(exc))
                continue
            digest = hashlib.sha256(raw).hexdigest()
            known = self._files.get(path)
            if known is not None and known.digest == digest:
                continue
            previous = known.good if known is not None else None
            seen = known.seen if known is not None else next(self._arrivals)
            try:
                config = parse_app_auth_file(path, raw.decode("utf-8"))
            except UnicodeDecodeError:
                self._reject(path, [f"{path}: not UTF-8 text"], previous)
                self._files[path] = _File(digest, previous, seen)
                continue
            except ConfigError as exc:
                self._reject(path, exc.problems, previous)
                self._files[path] = _File(digest, previous, seen)
                continue
            self._files[path] = _File(digest, config, seen)

    @staticmethod
    def _reject(path: Path, problems: list[str], kept: AppAuthConfig | None) -> None:
        log.error(
            "app_auth_config_rejected",
            file=str(path),
            problems=problems,
            kept="last good version" if kept is not None else "nothing (never loaded)",
        )

    def start(self) -> None:
        if self._dir is not None:
            self._task = asyncio.create_task(self._watch(self._dir), name="app-auth-watcher")

    async def _watch(self, directory: Path) -> None:
        # Every quiet half second (a timeout: an empty set) rescans too; unchanged files cost a
        # hash. Events alone miss a file written between the initial rescan and the moment the
        # watch is in place, and the poller compares mtimes to the second, so a second change
        # within the same second (an editor's fix right after a save) made no event at all.
        async for _ in watchfiles.awatch(
            directory,
            watch_filter=_is_config,
            debounce=200,
            step=50,
            stop_event=self._stop,
            recursive=False,
            force_polling=self._force_polling,
            poll_delay_ms=200,
            rust_timeout=500,
            yield_on_timeout=True,
        ):
            self.rescan()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await self._task
            finally:
                self._task = None
