"""nginx as the peer proxy: found on PATH or installed from Debian, configured in the bench's
temp dir, run in the foreground as one master and ONE worker (proxyd is one process).

nginx does no JWT check; it is the reference for the relay itself: a keep-alive upstream pool,
no buffering of streams or request bodies, and the X-Forwarded-* headers a real deployment
sets.
"""

from __future__ import annotations

import getpass
import grp
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from procs import HOST, BenchError, log

PACKAGES = ("nginx-light", "nginx")  # Debian: nginx-light is the small build (a metapackage
# over `nginx` since bookworm); either gives /usr/sbin/nginx
SBIN = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in SBIN if os.access(p, os.X_OK)), None)  # sbin off a user's PATH


def _apt(argv: list[str]) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(argv))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=600)


def ensure() -> str:
    """The nginx binary; installed with apt-get when missing. Fails loudly if it cannot be."""
    return ensure_debian(
        "nginx",
        PACKAGES,
        find,
        "the peer proxy of the benchmark",
        "or run with --no-nginx to skip the peer",
    )


def ensure_debian(
    what: str, packages: Sequence[str], locate: Callable[[], str | None], why: str, otherwise: str
) -> str:
    """``what`` from Debian's packages (the first of ``packages`` that installs) when
    ``locate`` does not find it; BenchError saying what to do when that fails."""
    found = locate()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError(
            f"{what} is not installed and there is no apt-get: install {what} ({otherwise})"
        )
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if prefix and shutil.which("sudo") is None:
        raise BenchError(
            f"{what} is not installed and we are not root: "
            f"sudo apt-get install -y {packages[0]} ({otherwise})"
        )
    log(f"{what} not found: installing it from Debian ({why})")
    update = _apt([*prefix, apt, "update"])
    if update.returncode != 0:
        log(
            f"apt-get update failed ({update.returncode}); trying the install anyway:\n"
            + _tail(update)
        )
    failures = []
    for package in packages:
        done = _apt([*prefix, apt, "install", "-y", "--no-install-recommends", package])
        found = locate()
        if done.returncode == 0 and found:
            log(f"installed {package}: {found}")
            return found
        failures.append(f"apt-get install {package}: exit {done.returncode}\n{_tail(done)}")
    raise BenchError(f"could not install {what}:\n" + "\n".join(failures))


def _tail(done: subprocess.CompletedProcess[str], lines: int = 8) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


def version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False, timeout=10)
    text = (done.stderr or done.stdout).strip()  # "nginx version: nginx/1.22.1"
    return text.rsplit(" ", 1)[-1] if text else "?"


@dataclass(frozen=True, slots=True)
class NginxPlan:
    port: int
    routes: Mapping[str, str]  # exact request path → upstream pool name + path ("bench/mcp")
    pools: Mapping[str, Sequence[str]]  # pool name → "host:port" servers
    max_connections: int  # client + upstream connections the one worker must hold
    access_log: bool
    nofile_limit: int | None = None  # the hard RLIMIT_NOFILE nginx inherits (None: unknown)
    # A second listener terminating TLS (same routes, same worker): (port, cert, key).
    tls: tuple[int, Path, Path] | None = None


def config(workdir: Path, plan: NginxPlan) -> str:
    tmp = workdir / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    # Root starts the master; without `user` the workers would switch to nobody, who cannot
    # enter the 0700 temp dir. Run them as ourselves (nginx ignores `user` for non-root).
    user = ""
    if os.geteuid() == 0:
        user = f"user {getpass.getuser()} {grp.getgrgid(os.getegid()).gr_name};"
    access = f"access_log {tmp / 'access.log'};" if plan.access_log else "access_log off;"
    pools = "\n".join(
        f"""    upstream {name} {{
{chr(10).join(f"        server {s};" for s in servers)}
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}"""
        for name, servers in plan.pools.items()
    )
    routes = "\n".join(
        f"        location = {path} {{ proxy_pass http://{to}; }}"
        for path, to in plan.routes.items()
    )
    connections = plan.max_connections + 512
    tls = ""
    if plan.tls is not None:
        tls_port, cert, key = plan.tls
        tls = (
            f"\n        listen {HOST}:{tls_port} ssl backlog=4096;"
            f"\n        ssl_certificate {cert};"
            f"\n        ssl_certificate_key {key};"
            "\n        ssl_session_cache shared:bench:1m;"
        )
    nofile = connections + 512
    if plan.nofile_limit is not None:
        nofile = min(nofile, plan.nofile_limit)  # nginx cannot go past the hard limit
    return f"""# generated by bench/run.py: nginx as the peer proxy (one worker, no buffering)
{user}
worker_processes 1;
master_process on;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} warn;
worker_rlimit_nofile {nofile};

events {{
    worker_connections {connections};
}}

http {{
    default_type application/octet-stream;
    {access}
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;  # as proxyd: never close a busy client connection
    server_tokens off;

{pools}

    server {{
        listen {HOST}:{plan.port} backlog=4096;{tls}
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_buffering off;           # SSE and large bodies stream through
        proxy_request_buffering off;
        proxy_read_timeout 1h;         # idle SSE streams stay open
        proxy_send_timeout 1h;
        client_max_body_size 4m;       # proxyd's max_request_body
{routes}
    }}
}}
"""
