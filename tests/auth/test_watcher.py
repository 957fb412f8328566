"""The app auth config watcher (issue 4 §1): the directory merged with the main file's configs,
last good versions, duplicates, atomic swaps, the real watch loop, and sessions following the
config they were created from.

Unit tests drive ``AuthConfigWatcher.rescan()`` on a tmp directory and a real AppAuthStore; the
watch-loop tests run watchfiles for real (polling and inotify) and wait on conditions with a
guard; the session tests run proxyd in-process (make_proxy) and call the app's watcher
``rescan()`` right after changing files, so no timing is involved.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxyd.app import AUTH_STORE, WATCHER
from proxyd.auth.appauth import AppAuthStore
from proxyd.config import AppAuthConfig, parse_app_auth_file, parse_settings
from proxyd.watcher import AuthConfigWatcher
from tests.conftest import FakeClock, LogCapture, ProxyFactory
from tests.kit.echo import Echo, Upstreams
from tests.kit.issuer import TestIssuer
from tests.kit.proxy import RPC, Client, bearer, config, rpc_error
from tests.kit.wait import until

ISSUER = "https://idp.example.com"
JWKS_URL = "https://idp.example.com/.well-known/jwks.json"
WITHIN = 2.0  # issue 4: a file change applies within 2 seconds, without a signal
GUARD = 10.0  # failure guard for awaited conditions, never a timing assumption
CHANGE_EVENTS = ("app_auth_config_added", "app_auth_config_updated", "app_auth_config_removed")


# --------------------------------------------------------------------------------------------
# Helpers


def auth_toml(
    name: str,
    *,
    audience: str = "proxyd",
    labels: str = '{ env = "test" }',
    issuer: str = ISSUER,
    jwks_url: str = JWKS_URL,
    extra: str = "",
) -> str:
    """One file of app_auth.config_dir, as an operator writes it."""
    return (
        f"# {name}{extra}\n"
        f'name = "{name}"\n'
        f"app_labels = {labels}\n"
        "[jwt]\n"
        f'issuer = "{issuer}"\n'
        f'audience = "{audience}"\n'
        f'jwks_url = "{jwks_url}"\n'
    )


def put(path: Path, text: str) -> None:
    """Write as config management does: a temp file (not *.toml) renamed over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main_configs(*specs: tuple[str, str]) -> tuple[AppAuthConfig, ...]:
    """``[[app_auth_configs]]`` of a main file: (name, audience) pairs."""
    doc = {
        "app_auth_configs": [
            {
                "name": name,
                "app_labels": {"env": "test"},
                "jwt": {"issuer": ISSUER, "audience": audience, "jwks_url": JWKS_URL},
            }
            for name, audience in specs
        ]
    }
    return parse_settings(doc).main_app_auth_configs


class Journal:
    """The watcher's log lines since the last look."""

    def __init__(self, logs: LogCapture) -> None:
        self._logs = logs
        self._changes = 0
        self._rejected = 0

    def changes(self) -> list[tuple[str, str, int]]:
        """(added|updated|removed, config, generation) logged since the last call."""
        lines = [line for line in self._logs.lines() if line.get("event") in CHANGE_EVENTS]
        new, self._changes = lines[self._changes :], len(lines)
        return [
            (line["event"].rsplit("_", 1)[1], line["config"], line["generation"]) for line in new
        ]

    def rejected(self) -> list[dict[str, Any]]:
        lines = self._logs.events("app_auth_config_rejected")
        new, self._rejected = lines[self._rejected :], len(lines)
        return new


def audiences(store: AppAuthStore) -> dict[str, str]:
    return {c.name: " ".join(c.jwt.audience) for c in store.snapshot.configs}


@pytest.fixture
def auth_dir(tmp_path: Path) -> Path:
    path = tmp_path / "app_auth.d"
    path.mkdir()
    return path


def make_watcher(
    auth_dir: Path, main: tuple[AppAuthConfig, ...] = (), **kwargs: Any
) -> tuple[AuthConfigWatcher, AppAuthStore]:
    store = AppAuthStore(main)
    return AuthConfigWatcher(store, main, str(auth_dir), **kwargs), store


# --------------------------------------------------------------------------------------------
# The directory, one rescan at a time


def test_initial_load_merges_the_directory_with_the_main_file(
    auth_dir: Path, logs: LogCapture
) -> None:
    put(auth_dir / "b.toml", auth_toml("b-idp"))
    put(auth_dir / "a.toml", auth_toml("a-idp"))
    (auth_dir / "notes.txt").write_text("not a config")
    (auth_dir / "sub.toml").mkdir()  # a directory named like a config is no config
    watcher, store = make_watcher(auth_dir, main_configs(("main-idp", "proxyd")))
    journal = Journal(logs)
    assert [c.name for c in store.snapshot.configs] == ["main-idp"]

    watcher.rescan()

    snapshot = store.snapshot
    assert [c.name for c in snapshot.configs] == ["a-idp", "b-idp", "main-idp"]
    assert {c.name: c.source for c in snapshot.configs} == {
        "a-idp": str(auth_dir / "a.toml"),
        "b-idp": str(auth_dir / "b.toml"),
        "main-idp": "main",
    }
    assert snapshot.generation == 2
    assert journal.changes() == [("added", "a-idp", 2), ("added", "b-idp", 2)]
    assert journal.rejected() == []


def test_add_update_delete_log_one_line_each_with_a_growing_generation(
    auth_dir: Path, logs: LogCapture
) -> None:
    watcher, store = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    assert journal.changes() == []
    generation = store.snapshot.generation
    path = auth_dir / "corp.toml"

    put(path, auth_toml("corp", audience="one"))
    watcher.rescan()
    assert journal.changes() == [("added", "corp", generation + 1)]
    assert store.snapshot.versions == {"corp": generation + 1}

    put(path, auth_toml("corp", audience="two"))
    watcher.rescan()
    assert journal.changes() == [("updated", "corp", generation + 2)]
    assert audiences(store) == {"corp": "two"}
    assert store.snapshot.versions == {"corp": generation + 2}

    path.unlink()
    watcher.rescan()
    assert journal.changes() == [("removed", "corp", generation + 3)]
    assert store.snapshot.configs == ()
    assert store.snapshot.generation == generation + 3

    line = logs.events("app_auth_config_removed")[0]
    assert line["source"] == str(path)
    assert line["level"] == "info"


def test_unchanged_files_are_not_parsed_again(
    auth_dir: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str] = []

    def spy(path: Path, text: str) -> AppAuthConfig:
        parsed.append(path.name)
        return parse_app_auth_file(path, text)

    monkeypatch.setattr("proxyd.watcher.parse_app_auth_file", spy)
    put(auth_dir / "a.toml", auth_toml("a"))
    put(auth_dir / "b.toml", auth_toml("b"))
    watcher, store = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    assert sorted(parsed) == ["a.toml", "b.toml"]
    journal.changes()
    snapshot = store.snapshot

    # Rewritten with the same bytes (a new mtime, a new inode): nothing to read or swap.
    put(auth_dir / "a.toml", auth_toml("a"))
    os.utime(auth_dir / "b.toml", (1, 1))
    watcher.rescan()
    watcher.rescan()
    assert sorted(parsed) == ["a.toml", "b.toml"]
    assert journal.changes() == []
    assert store.snapshot is snapshot

    # New bytes, same config (a comment): read again, but no change and no new version.
    put(auth_dir / "b.toml", auth_toml("b", extra=" (reviewed)"))
    watcher.rescan()
    assert sorted(parsed) == ["a.toml", "b.toml", "b.toml"]
    assert journal.changes() == []
    assert store.snapshot.versions == snapshot.versions
    assert store.snapshot.generation == snapshot.generation


def test_a_broken_file_keeps_its_last_good_version_until_fixed(
    auth_dir: Path, logs: LogCapture
) -> None:
    path = auth_dir / "corp.toml"
    put(path, auth_toml("corp", audience="good"))
    watcher, store = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    journal.changes()
    generation = store.snapshot.generation

    # Valid TOML, invalid config: every problem with the file and its key path.
    put(
        path,
        'name = "corp"\napp_labels = 5\n[jwt]\nissuer = "https://idp.example.com"\n'
        "resource_audience = false\n",
    )
    watcher.rescan()
    assert audiences(store) == {"corp": "good"}
    assert store.snapshot.generation == generation
    assert journal.changes() == []
    [rejected] = journal.rejected()
    assert rejected["level"] == "error"
    assert rejected["file"] == str(path)
    assert rejected["kept"] == "last good version"
    problems = rejected["problems"]
    assert (
        f"{path}: jwt: accepts no audience: set audience, or leave resource_audience = true"
        in problems
    )
    assert any(p.startswith(f"{path}: app_labels: ") for p in problems), problems
    assert any("exactly one of jwks_url or static_jwks" in p for p in problems), problems

    # Reported once: an unchanged broken file is not read (nor reported) again.
    watcher.rescan()
    assert journal.rejected() == []

    # Not even TOML, then not UTF-8: still the last good version.
    put(path, 'name = "corp"\n[jwt\n')
    watcher.rescan()
    [rejected] = journal.rejected()
    assert rejected["problems"][0].startswith(f"{path}: ")
    path.write_bytes(b'name = "\xff\xfe"\n')
    watcher.rescan()
    [rejected] = journal.rejected()
    assert rejected["problems"] == [f"{path}: not UTF-8 text"]
    assert audiences(store) == {"corp": "good"}
    assert journal.changes() == []

    # Fixed: the new version applies.
    put(path, auth_toml("corp", audience="fixed"))
    watcher.rescan()
    assert audiences(store) == {"corp": "fixed"}
    assert journal.changes() == [("updated", "corp", generation + 1)]
    assert journal.rejected() == []


def test_a_file_that_never_parsed_adds_nothing(auth_dir: Path, logs: LogCapture) -> None:
    put(auth_dir / "good.toml", auth_toml("good"))
    path = auth_dir / "new.toml"
    put(path, auth_toml("new").replace("audience", "audiense"))
    watcher, store = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    assert [c.name for c in store.snapshot.configs] == ["good"]
    assert journal.changes() == [("added", "good", 2)]
    [rejected] = journal.rejected()
    assert rejected["file"] == str(path)
    assert rejected["kept"] == "nothing (never loaded)"
    assert f"{path}: jwt.audiense: unknown key" in rejected["problems"]

    put(path, auth_toml("new"))
    watcher.rescan()
    assert [c.name for c in store.snapshot.configs] == ["good", "new"]
    assert journal.changes() == [("added", "new", 3)]


def test_a_duplicate_name_is_an_error_for_the_later_file(auth_dir: Path, logs: LogCapture) -> None:
    first, second = auth_dir / "10-corp.toml", auth_dir / "20-corp-copy.toml"
    put(first, auth_toml("corp", audience="first"))
    put(second, auth_toml("corp", audience="second"))
    watcher, store = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    assert audiences(store) == {"corp": "first"}
    assert store.snapshot.config("corp") is not None
    assert journal.changes() == [("added", "corp", 2)]
    [rejected] = journal.rejected()
    assert rejected["level"] == "error"
    assert rejected["problem"].startswith(f"{second}: app auth config 'corp' is already defined")
    assert str(first) in rejected["problem"]

    # A third copy, later still: never a silent override of the config in force.
    put(auth_dir / "30-corp.toml", auth_toml("corp", audience="third"))
    watcher.rescan()
    assert audiences(store) == {"corp": "first"}
    assert journal.changes() == []
    assert [r["problem"].split(":")[0] for r in journal.rejected()] == [
        str(auth_dir / "30-corp.toml")
    ]

    # A newcomer whose name sorts first takes nothing over: it is the later definition.
    newcomer = auth_dir / "00-corp.toml"
    put(newcomer, auth_toml("corp", audience="newcomer"))
    watcher.rescan()
    assert audiences(store) == {"corp": "first"}
    assert journal.changes() == []
    assert [r["problem"].split(":")[0] for r in journal.rejected()] == [str(newcomer)]
    newcomer.unlink()
    watcher.rescan()

    # The first definition goes: the next file in name order is the one in force.
    first.unlink()
    watcher.rescan()
    assert audiences(store) == {"corp": "second"}
    assert store.snapshot.config("corp") is not None
    assert journal.changes() == [("updated", "corp", 3)]


def test_a_rejected_duplicate_is_reported_once_not_on_every_rescan(
    auth_dir: Path, logs: LogCapture
) -> None:
    put(auth_dir / "a.toml", auth_toml("corp", audience="first"))
    put(auth_dir / "b.toml", auth_toml("corp", audience="second"))
    watcher, _ = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    assert len(journal.rejected()) == 1
    # Other files come and go; the duplicate is no new problem and no change.
    put(auth_dir / "other.toml", auth_toml("other"))
    watcher.rescan()
    watcher.rescan()
    assert journal.rejected() == []
    # It goes away and comes back: reported again.
    (auth_dir / "b.toml").unlink()
    watcher.rescan()
    put(auth_dir / "b.toml", auth_toml("corp", audience="second"))
    watcher.rescan()
    assert len(journal.rejected()) == 1


def test_a_file_duplicating_a_main_config_is_rejected(auth_dir: Path, logs: LogCapture) -> None:
    path = auth_dir / "corp.toml"
    put(path, auth_toml("corp", audience="from-file"))
    watcher, store = make_watcher(auth_dir, main_configs(("corp", "from-main")))
    journal = Journal(logs)
    watcher.rescan()
    assert audiences(store) == {"corp": "from-main"}
    corp = store.snapshot.config("corp")
    assert corp is not None and corp.source == "main"
    assert journal.changes() == []
    [rejected] = journal.rejected()
    assert rejected["problem"] == f"{path}: app auth config 'corp' is already defined in main"


def test_atomic_replace_and_rename(auth_dir: Path, logs: LogCapture) -> None:
    path = auth_dir / "corp.toml"
    path.write_text(auth_toml("corp", audience="one"))
    watcher, store = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    journal.changes()

    # An editor's or config management's replace: write a temp file, rename it over the target.
    tmp = auth_dir / "corp.toml.new"
    tmp.write_text(auth_toml("corp", audience="two"))
    os.replace(tmp, path)
    watcher.rescan()
    assert audiences(store) == {"corp": "two"}
    assert journal.changes() == [("updated", "corp", 3)]

    # Renamed to another *.toml: the same config, now from another file; no change.
    renamed = auth_dir / "corp-idp.toml"
    os.rename(path, renamed)
    watcher.rescan()
    assert journal.changes() == []
    corp = store.snapshot.config("corp")
    assert corp is not None and corp.source == str(renamed)
    # Its later removal names the file it came from last.
    renamed.unlink()
    watcher.rescan()
    assert journal.changes() == [("removed", "corp", 4)]
    assert logs.events("app_auth_config_removed")[-1]["source"] == str(renamed)

    # Renamed away from *.toml (disabled): removed.
    put(path, auth_toml("corp"))
    watcher.rescan()
    os.rename(path, auth_dir / "corp.toml.disabled")
    watcher.rescan()
    assert [kind for kind, _, _ in journal.changes()] == ["added", "removed"]


UNREADABLE = ["missing", "not_a_directory", "symlink_loop"]
if os.geteuid() != 0:  # root reads a mode-000 directory anyway
    UNREADABLE.append("no_permission")


@pytest.mark.parametrize("how", UNREADABLE)
def test_an_unreadable_directory_keeps_everything(
    how: str, auth_dir: Path, tmp_path: Path, logs: LogCapture
) -> None:
    put(auth_dir / "a.toml", auth_toml("a"))
    put(auth_dir / "b.toml", auth_toml("b"))
    watcher, store = make_watcher(auth_dir, main_configs(("main-idp", "proxyd")))
    journal = Journal(logs)
    watcher.rescan()
    journal.changes()
    snapshot = store.snapshot
    aside = tmp_path / "aside"
    if how == "missing":
        auth_dir.rename(aside)
    elif how == "not_a_directory":
        auth_dir.rename(aside)
        auth_dir.write_text("")
    elif how == "symlink_loop":
        auth_dir.rename(aside)
        auth_dir.symlink_to(auth_dir)
    else:
        auth_dir.chmod(0)

    watcher.rescan()

    assert store.snapshot is snapshot
    assert [c.name for c in store.snapshot.configs] == ["a", "b", "main-idp"]
    assert journal.changes() == []
    [unreadable] = logs.events("app_auth_dir_unreadable")
    assert unreadable["directory"] == str(auth_dir)
    assert unreadable["level"] == "error"

    # The directory is back: nothing changed, nothing to report.
    if how == "no_permission":
        auth_dir.chmod(0o755)
    else:
        auth_dir.unlink(missing_ok=True)
        aside.rename(auth_dir)
    watcher.rescan()
    assert store.snapshot is snapshot
    assert journal.changes() == []


def test_an_emptied_directory_removes_its_configs(auth_dir: Path, logs: LogCapture) -> None:
    # The proof the previous test can fail: a readable, empty directory does remove them.
    put(auth_dir / "a.toml", auth_toml("a"))
    watcher, store = make_watcher(auth_dir)
    journal = Journal(logs)
    watcher.rescan()
    journal.changes()
    (auth_dir / "a.toml").unlink()
    watcher.rescan()
    assert store.snapshot.configs == ()
    assert journal.changes() == [("removed", "a", 3)]
    assert logs.events("app_auth_dir_unreadable") == []


def test_set_main_merges_the_new_main_configs(auth_dir: Path, logs: LogCapture) -> None:
    put(auth_dir / "file.toml", auth_toml("file-idp"))
    watcher, store = make_watcher(auth_dir, main_configs(("m1", "one")))
    journal = Journal(logs)
    watcher.rescan()
    assert journal.changes() == [("added", "file-idp", 2)]
    file_version = store.snapshot.versions["file-idp"]

    watcher.set_main(main_configs(("m1", "changed"), ("m2", "new")))
    assert audiences(store) == {"file-idp": "proxyd", "m1": "changed", "m2": "new"}
    assert journal.changes() == [("updated", "m1", 3), ("added", "m2", 3)]
    assert store.snapshot.versions["file-idp"] == file_version

    # The main file now claims the directory's name: the main file wins, the file is rejected.
    watcher.set_main(main_configs(("file-idp", "main-wins")))
    assert audiences(store) == {"file-idp": "main-wins"}
    assert journal.changes() == [
        ("removed", "m1", 4),
        ("removed", "m2", 4),
        ("updated", "file-idp", 4),
    ]
    [rejected] = journal.rejected()
    assert rejected["problem"].startswith(str(auth_dir / "file.toml"))

    # And gives it back.
    watcher.set_main(())
    assert audiences(store) == {"file-idp": "proxyd"}
    assert journal.changes() == [("updated", "file-idp", 5)]


def test_readers_never_see_a_partial_set(auth_dir: Path) -> None:
    """Every file changes in every round; a reader (another thread, the GIL switching as often
    as it can) must only ever see all configs from one round, consistent with the versions."""
    names = [f"c{i:02d}" for i in range(12)]

    def write_round(n: int) -> None:
        for name in names:
            (auth_dir / f"{name}.toml").write_text(auth_toml(name, audience=f"round-{n}"))

    write_round(0)
    watcher, store = make_watcher(auth_dir)
    watcher.rescan()
    rounds = 40
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for n in range(1, rounds + 1):
                write_round(n)
                watcher.rescan()
        except BaseException as exc:  # reported by the reader
            errors.append(exc)
        finally:
            done.set()

    seen: dict[int, frozenset[str]] = {}

    def check() -> None:
        snapshot = store.snapshot
        assert [c.name for c in snapshot.configs] == names
        assert set(snapshot.versions) == set(names)
        rounds_seen = frozenset(" ".join(c.jwt.audience) for c in snapshot.configs)
        assert len(rounds_seen) == 1, f"a mix of rounds: {sorted(rounds_seen)}"
        # Every config changed in the snapshot's own generation, and a generation never
        # changes content once published.
        assert set(snapshot.versions.values()) == {snapshot.generation}
        assert seen.setdefault(snapshot.generation, rounds_seen) == rounds_seen

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=writer, name="rescans")
    try:
        check()
        thread.start()
        while not done.is_set():
            check()
        thread.join(GUARD)
        check()
    finally:
        sys.setswitchinterval(interval)
    assert not thread.is_alive()
    assert errors == []
    assert seen[min(seen)] == {"round-0"} and seen[max(seen)] == {f"round-{rounds}"}
    assert max(seen) == min(seen) + rounds


# --------------------------------------------------------------------------------------------
# The real watch loop


@pytest.mark.parametrize("force_polling", [True, None], ids=["polling", "inotify"])
async def test_the_watch_loop_applies_changes_within_2_seconds(
    force_polling: bool | None, auth_dir: Path, logs: LogCapture
) -> None:
    watcher, store = make_watcher(auth_dir, force_polling=force_polling)
    watcher.rescan()
    watcher.start()
    try:
        # Right after start(), before the watch is in place: it must not be missed.
        put(auth_dir / "early.toml", auth_toml("early"))
        await until(
            lambda: store.snapshot.config("early") is not None, "early.toml added", within=WITHIN
        )

        path = auth_dir / "corp.toml"
        path.write_text(auth_toml("corp", audience="one"))  # created in place
        await until(
            lambda: audiences(store).get("corp") == "one", "corp.toml created", within=WITHIN
        )
        put(path, auth_toml("corp", audience="two"))  # atomic replace
        await until(
            lambda: audiences(store).get("corp") == "two", "corp.toml replaced", within=WITHIN
        )
        with path.open("a") as f:  # modified in place
            f.write('username_claim = "sub"\n')
        await until(
            lambda: (
                (c := store.snapshot.config("corp")) is not None
                and c.jwt.username_claim == ("sub",)
            ),
            "corp.toml modified",
            within=WITHIN,
        )
        # Changed again with the very same mtime (a poller comparing mtimes sees nothing).
        before = path.stat()
        put(path, auth_toml("corp", audience="six"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        await until(
            lambda: audiences(store).get("corp") == "six", "corp.toml, same mtime", within=WITHIN
        )
        os.rename(path, auth_dir / "corp.toml.off")  # renamed away
        await until(
            lambda: store.snapshot.config("corp") is None, "corp.toml renamed away", within=WITHIN
        )
        (auth_dir / "early.toml").unlink()  # deleted
        await until(lambda: store.snapshot.configs == (), "early.toml deleted", within=WITHIN)
    finally:
        await asyncio.wait_for(watcher.stop(), GUARD)
    kinds = [
        (line["event"], line["config"])
        for line in logs.lines()
        if line.get("event") in CHANGE_EVENTS
    ]
    assert kinds == [
        ("app_auth_config_added", "early"),
        ("app_auth_config_added", "corp"),
        ("app_auth_config_updated", "corp"),
        ("app_auth_config_updated", "corp"),
        ("app_auth_config_updated", "corp"),
        ("app_auth_config_removed", "corp"),
        ("app_auth_config_removed", "early"),
    ]
    generations = [
        line["generation"] for line in logs.lines() if line.get("event") in CHANGE_EVENTS
    ]
    assert generations == sorted(set(generations))


@pytest.mark.parametrize("force_polling", [True, None], ids=["polling", "inotify"])
async def test_stop_ends_the_watch_task(
    force_polling: bool | None, auth_dir: Path, logs: LogCapture
) -> None:
    watcher, store = make_watcher(auth_dir, force_polling=force_polling)
    watcher.rescan()
    watcher.start()
    task = watcher._task
    assert task is not None and not task.done()
    put(auth_dir / "a.toml", auth_toml("a"))
    await until(lambda: store.snapshot.config("a") is not None, "a.toml added", within=WITHIN)

    await asyncio.wait_for(watcher.stop(), GUARD)

    assert task.done() and not task.cancelled() and task.exception() is None
    assert watcher._task is None


async def test_stop_right_after_start_and_without_a_directory(auth_dir: Path) -> None:
    watcher, _ = make_watcher(auth_dir)
    watcher.start()
    task = watcher._task
    assert task is not None
    await asyncio.wait_for(watcher.stop(), GUARD)
    assert task.done() and task.exception() is None

    no_dir = AuthConfigWatcher(AppAuthStore(()), (), None)
    no_dir.start()
    assert no_dir._task is None
    await asyncio.wait_for(no_dir.stop(), GUARD)


# --------------------------------------------------------------------------------------------
# Sessions follow their config (proxyd in-process; the app's watcher rescans on demand)


def idp_toml(
    issuer: TestIssuer,
    name: str,
    *,
    labels: str = '{ env = "test" }',
    audience: str | None = None,
    extra: str = "",
) -> str:
    """A config file for the test IdP (its issuer, JWKS URL and, by default, audience)."""
    return auth_toml(
        name,
        issuer=issuer.issuer,
        jwks_url=issuer.url,
        labels=labels,
        audience=audience or issuer.audience,
        extra=extra,
    )


async def dir_proxy(
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    issuer: TestIssuer,
    files: dict[str, str],
    apps: tuple[str, ...] = ("a",),
    **sections: Any,
) -> tuple[Client, Echo, Path]:
    """proxyd whose only app auth configs are files of config_dir."""
    directory = tmp_path / "app_auth.d"
    directory.mkdir()
    for name, text in files.items():
        put(directory / name, text)
    echo = Echo()
    url = await upstreams.start(echo.app())
    doc = config(
        issuer,
        {name: url for name in apps},
        tmp_path,
        app_auth={"config_dir": str(directory)},
        app_auth_configs=[],
        **sections,
    )
    client = await make_proxy(doc)
    return client, echo, directory


async def post(client: Client, token: str, app: str = "a") -> aiohttp.ClientResponse:
    resp = await client.post(f"/mcp/apps/{app}", json=RPC, headers=bearer(token))
    await resp.read()
    return resp


def sessions_created(logs: LogCapture, app: str = "a") -> int:
    return len([e for e in logs.events("session_created") if e["app"] == app])


async def test_a_removed_config_ends_its_sessions(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, echo, directory = await dir_proxy(
        make_proxy, upstreams, tmp_path, issuer, {"idp.toml": idp_toml(issuer, "dir-idp")}
    )
    token = issuer.token(clock.wall())
    assert (await post(client, token)).status == 200
    assert logs.events("session_created")[0]["config"] == "dir-idp"

    (directory / "idp.toml").unlink()
    client.app[WATCHER].rescan()
    assert [e["config"] for e in logs.events("app_auth_config_removed")] == ["dir-idp"]

    resp = await post(client, token)
    body = await rpc_error(resp, 401)
    assert body["error"]["data"]["reason"] == "config_removed"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert len(echo.seen) == 1
    [ended] = logs.events("session_ended")
    assert (ended["config"], ended["reason"]) == ("dir-idp", "config_removed")
    assert logs.events("request")[-1]["reason"] == "config_removed"
    # The session is gone for good: the token is now simply not accepted.
    body = await rpc_error(await post(client, token), 401)
    assert body["error"]["data"]["reason"] == "no_matching_config"
    assert len(echo.seen) == 1


async def test_a_changed_config_verifies_the_token_again_and_the_session_carries_on(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    # One unauthenticated token per hour: the first verification spends it, so a second
    # charge (the re-verification) would be a 429.
    client, echo, directory = await dir_proxy(
        make_proxy,
        upstreams,
        tmp_path,
        issuer,
        {"idp.toml": idp_toml(issuer, "dir-idp")},
        limits={"unauthenticated": {"average": 1, "period": "1h", "burst": 1}},
    )
    token = issuer.token(clock.wall())
    assert (await post(client, token)).status == 200
    assert sessions_created(logs) == 1

    put(directory / "idp.toml", idp_toml(issuer, "dir-idp", labels='{ env = ["test", "prod"] }'))
    client.app[WATCHER].rescan()
    assert [e["config"] for e in logs.events("app_auth_config_updated")] == ["dir-idp"]

    resp = await post(client, token)
    assert resp.status == 200, await resp.text()
    assert sessions_created(logs) == 2
    assert (await post(client, token)).status == 200  # cached again
    assert sessions_created(logs) == 2
    assert len(echo.seen) == 3
    assert [line["session"] for line in logs.events("request")] == ["new", "new", "cached"]
    # The proof a charge would have shown: the address has no token left for a new one.
    spare = issuer.token(clock.wall(), email="bob@example.com")
    await rpc_error(await post(client, spare), 429)


async def test_a_changed_config_the_token_fails_ends_the_session(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, echo, directory = await dir_proxy(
        make_proxy, upstreams, tmp_path, issuer, {"idp.toml": idp_toml(issuer, "dir-idp")}
    )
    token = issuer.token(clock.wall())
    assert (await post(client, token)).status == 200

    put(directory / "idp.toml", idp_toml(issuer, "dir-idp", audience="another-audience"))
    client.app[WATCHER].rescan()

    body = await rpc_error(await post(client, token), 401)
    assert body["error"]["data"]["reason"] == "wrong_audience"
    assert len(echo.seen) == 1
    assert sessions_created(logs) == 1
    # The new version is what accepts tokens now.
    fresh = issuer.token(clock.wall(), aud="another-audience")
    assert (await post(client, fresh)).status == 200
    assert len(echo.seen) == 2


async def test_sessions_of_unchanged_configs_are_untouched(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    client, echo, directory = await dir_proxy(
        make_proxy,
        upstreams,
        tmp_path,
        issuer,
        {
            "idp-a.toml": idp_toml(issuer, "idp-a", labels='{ app = "a" }'),
            "idp-b.toml": idp_toml(issuer, "idp-b", labels='{ app = "b" }'),
        },
        apps=("a", "b"),
    )
    watcher = client.app[WATCHER]
    token = issuer.token(clock.wall())
    assert (await post(client, token, "a")).status == 200
    assert (await post(client, token, "b")).status == 200
    version_a = client.app[AUTH_STORE].snapshot.versions["idp-a"]

    # idp-b changes; idp-a is rewritten with a comment, renamed, then broken: still in force.
    put(directory / "idp-b.toml", idp_toml(issuer, "idp-b", labels='{ app = ["b", "c"] }'))
    watcher.rescan()
    put(directory / "idp-a.toml", idp_toml(issuer, "idp-a", labels='{ app = "a" }', extra="!"))
    watcher.rescan()
    os.rename(directory / "idp-a.toml", directory / "00-idp-a.toml")
    watcher.rescan()
    put(directory / "00-idp-a.toml", "name = ")
    watcher.rescan()
    assert client.app[AUTH_STORE].snapshot.versions["idp-a"] == version_a

    for _ in range(2):
        assert (await post(client, token, "a")).status == 200
        assert (await post(client, token, "b")).status == 200
    assert sessions_created(logs, "a") == 1
    assert sessions_created(logs, "b") == 2
    sessions = [(line["app"], line["session"]) for line in logs.events("request")]
    assert sessions[2:] == [("a", "cached"), ("b", "new"), ("a", "cached"), ("b", "cached")]
    assert len(echo.seen) == 6
    # Changed and kept configs end no session.
    assert logs.events("session_ended") == []


async def test_a_file_added_after_start_accepts_tokens(
    issuer: TestIssuer,
    make_proxy: ProxyFactory,
    upstreams: Upstreams,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    client, echo, directory = await dir_proxy(make_proxy, upstreams, tmp_path, issuer, {})
    token = issuer.token(clock.wall())
    body = await rpc_error(await post(client, token), 401)
    assert body["error"]["data"]["reason"] == "no_matching_config"
    put(directory / "idp.toml", idp_toml(issuer, "dir-idp"))
    client.app[WATCHER].rescan()
    assert (await post(client, token)).status == 200
    assert len(echo.seen) == 1
