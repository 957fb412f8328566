"""Processes the benchmark starts and what it reads about them from /proc.

CPU time is utime + stime from ``/proc/<pid>/stat`` (every thread of the process, in clock
ticks); memory is ``VmRSS`` from ``/proc/<pid>/status``. A proxy made of several processes
(nginx: master + worker) is charged the sum over its process tree.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_DEADLINE = 20.0  # seconds for a child to accept connections


class BenchError(Exception):
    """The benchmark cannot produce honest numbers; the message says why."""


def log(message: str, stream: TextIO = sys.stderr) -> None:
    print(f"[bench] {message}", file=stream, flush=True)


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        # After "pid (comm)" (comm may hold spaces and parentheses): field 3 is index 0.
        return fh.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = _stat_fields(pid)
    # proc(5): utime is field 14, stime 15, so index 11 and 12 after "pid (comm)".
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        with suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(pid)
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of VmRSS over the processes (resident memory, shared pages counted per process)."""
    total = 0
    for pid in pids:
        with (
            suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/status", encoding="ascii") as fh,
        ):
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def descendants(pid: int) -> list[int]:
    """The process and every descendant (nginx: master then its workers), by scanning /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            parents.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    found, queue = [pid], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy (user, nice, system, irq, softirq), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    for pid in pids:
        with suppress(FileNotFoundError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with suppress(ProcessLookupError):
                    os.sched_setaffinity(int(tid), cpus)


def ephemeral_ports() -> tuple[int, int]:
    """net.ipv4.ip_local_port_range: the source ports connect() picks from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            low, high = (int(v) for v in fh.read().split())
    except (OSError, ValueError):
        return 32768, 60999  # the kernel's default
    return low, high


def raise_nofile(need: int) -> tuple[int, int]:
    """RLIMIT_NOFILE of this process (children inherit it) raised to at least ``need`` when
    possible: the soft limit up to the hard one, the hard one too when we may (root, up to
    fs.nr_open). Returns the resulting (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as fh:
                ceiling = int(fh.read())
        except (OSError, ValueError):
            ceiling = need
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, ceiling), min(need, ceiling)))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft, hard


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")


class Children:
    """Every process the benchmark starts; ``stop_all`` terminates and waits for each."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[Child] = []

    def start(self, name: str, argv: list[str], *, pipes: bool = False) -> Child:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=out,
                cwd=self.workdir,
            )
        child = Child(name, proc, log_path)
        self.items.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.items):
            proc = child.proc
            if proc.stdin is not None:
                with suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                proc.terminate()
        for child in reversed(self.items):
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdout is not None:
                child.proc.stdout.close()


def wait_accepting(child: Child, port: int, deadline: float, host: str = HOST) -> None:
    """Poll until ``port`` accepts a TCP connection, the child dies, or the deadline passes."""
    while True:
        if child.proc.poll() is not None:
            raise BenchError(
                f"{child.name} exited with {child.proc.returncode} before accepting "
                f"connections:\n{child.tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name} did not accept on {host}:{port}:\n{child.tail()}")
        time.sleep(0.05)
