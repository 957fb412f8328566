"""The benchmark's Python load generator, run as its own process by bench/run.py.

    python bench/loadgen.py        # then one JSON job per line on stdin, one JSON result per line

It speaks HTTP/1.1 over raw asyncio streams (keep-alive, Content-Length and chunked bodies) so
that the client costs far less per request than the servers it measures; uvloop is used when
it is installed. Jobs:

- ``once``: one request; status, body (first 2 KiB) and latency;
- ``post``: ``concurrency`` connections sending the same request in a loop for ``duration``
  seconds; requests, per-status counts, elapsed time, latency percentiles (µs);
- ``sse``: ``repeat`` times ``streams`` parallel GET streams on fresh connections; each
  stream's time to first event,
  and each event's receive time (CLOCK_MONOTONIC) minus the upstream's stamp ``t`` (µs lists);
- ``big``: ``repeat`` GETs of a large body on one connection; bytes and elapsed time;
- ``idle_open``: ``count`` SSE GET streams held open (one bare ``asyncio.Protocol`` per socket,
  no reader objects, so 10,000 cost a few tens of MiB), at most ``concurrency`` being opened at
  once; a stream counts as open once its 200 head and first event arrived. Optional
  ``sources`` (local addresses used in turn, bound with IP_BIND_ADDRESS_NO_PORT so each gets
  the whole ephemeral port range) and ``variants`` (header sets used in turn, e.g. one per MCP
  session). The streams stay open after the job answers; ``idle_status`` reports how many are
  still open and how many the server closed; ``idle_close`` closes them all.

A job with ``"tls": true`` speaks https (certificate not verified); the ``idle_*`` jobs do not.

Every result carries ``statuses`` so the caller can insist on 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import resource
import socket
import ssl
import sys
import time
from collections import Counter
from typing import Any, cast

Job = dict[str, Any]
Result = dict[str, Any]

_READ_SIZE = 1 << 20
_BODY_KEEP = 2048


class HttpError(Exception):
    pass


class StatusError(HttpError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"status {status}: {body}")
        self.status = status


def build_request(job: Job, method: str) -> bytes:
    body: bytes = str(job.get("body", "")).encode()
    lines = [f"{method} {job['path']} HTTP/1.1", f"Host: {job['host']}:{job['port']}"]
    lines += [f"{name}: {value}" for name, value in dict(job.get("headers", {})).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Response:
    __slots__ = ("chunked", "headers", "length", "status", "will_close")

    def __init__(self, head: bytes) -> None:
        try:
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"malformed response head: {head[:200]!r}") from None
        self.length: int | None = None
        self.chunked = False
        self.will_close = False
        self.headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            if key:
                self.headers[key] = value.strip()
            if key == "content-length":
                self.length = int(value.strip())
            elif key == "transfer-encoding":
                self.chunked = "chunked" in value.lower()
            elif key == "connection":
                self.will_close = "close" in value.lower()


async def read_head(reader: asyncio.StreamReader) -> Response:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise HttpError("connection closed before a response") from exc
    return Response(head)


async def iter_body(reader: asyncio.StreamReader, response: Response) -> Any:
    """Yield the body as it arrives (chunk framing removed)."""
    if response.chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from our servers
                return
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, _READ_SIZE))
                if not data:
                    raise HttpError("connection closed inside a chunk")
                remaining -= len(data)
                yield data
            await reader.readexactly(2)
    elif response.length is not None:
        remaining = response.length
        while remaining:
            data = await reader.read(min(remaining, _READ_SIZE))
            if not data:
                raise HttpError("connection closed inside a body")
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(_READ_SIZE):
            yield data


async def read_body(reader: asyncio.StreamReader, response: Response) -> bytes:
    if response.length is not None and not response.chunked:
        return await reader.readexactly(response.length)
    parts = [part async for part in iter_body(reader, response)]
    return b"".join(parts)


def _client_tls(job: Job) -> ssl.SSLContext | None:
    """TLS for ``"tls": true`` jobs: the bench's throwaway self-signed certificate is not
    verified (it exists to make the proxy terminate TLS, not to prove an identity)."""
    if not job.get("tls"):
        return None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Connection:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, limit=_READ_SIZE, ssl=self.tls
            )
        return self.reader, self.writer

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def roundtrip(self, raw: bytes) -> tuple[int, bytes]:
        response, body = await self.exchange(raw)
        return response.status, body

    async def exchange(self, raw: bytes) -> tuple[Response, bytes]:
        reader, writer = await self.open()
        writer.write(raw)
        response = await read_head(reader)
        body = await read_body(reader, response)
        if response.will_close:
            await self.close()
        return response, body


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "max": float(ordered[-1]),
    }


async def job_once(job: Job) -> Result:
    conn = Connection(job["host"], job["port"], _client_tls(job))
    try:
        started = time.perf_counter_ns()
        response, body = await conn.exchange(build_request(job, job.get("method", "POST")))
        elapsed = time.perf_counter_ns() - started
    finally:
        await conn.close()
    return {
        "statuses": {str(response.status): 1},
        "headers": response.headers,
        "body": body[:_BODY_KEEP].decode("utf-8", "replace"),
        "latency_us": elapsed / 1000,
    }


async def job_post(job: Job) -> Result:
    raw = build_request(job, "POST")
    duration = float(job["duration"])
    statuses: Counter[int] = Counter()
    latencies: list[int] = []
    bad_body: list[str] = []

    async def worker(deadline: float) -> None:
        conn = Connection(job["host"], job["port"], _client_tls(job))
        clock = time.perf_counter_ns
        try:
            while clock() < deadline:
                started = clock()
                status, body = await conn.roundtrip(raw)
                latencies.append(clock() - started)
                statuses[status] += 1
                if status != 200 and not bad_body:
                    bad_body.append(body[:_BODY_KEEP].decode("utf-8", "replace"))
        finally:
            await conn.close()

    started = time.perf_counter_ns()
    deadline = started + int(duration * 1e9)
    await asyncio.gather(*(worker(deadline) for _ in range(int(job["concurrency"]))))
    elapsed = (time.perf_counter_ns() - started) / 1e9
    return {
        "requests": len(latencies),
        "elapsed": elapsed,
        "statuses": {str(k): v for k, v in statuses.items()},
        "latency_us": percentiles([ns // 1000 for ns in latencies]),
        "body": bad_body[0] if bad_body else "",
    }


async def one_stream(job: Job) -> tuple[int, float | None, list[int], str]:
    """One SSE stream on a fresh connection: status, first event (µs), per-event delays (µs)."""
    conn = Connection(job["host"], job["port"], _client_tls(job))
    delays: list[int] = []
    first: float | None = None
    try:
        started = time.monotonic_ns()
        reader, writer = await conn.open()
        writer.write(build_request(job, "GET"))
        response = await read_head(reader)
        if response.status != 200:
            body = await read_body(reader, response)
            return response.status, None, [], body[:_BODY_KEEP].decode("utf-8", "replace")
        buffer = b""
        async for data in iter_body(reader, response):
            received = time.monotonic_ns()
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        stamp = int(json.loads(line[5:])["t"])
                        delays.append(received - stamp)
                        if first is None:
                            first = (received - started) / 1000
    finally:
        await conn.close()
    return response.status, first, [d // 1000 for d in delays], ""


async def job_sse(job: Job) -> Result:
    results: list[tuple[int, float | None, list[int], str]] = []
    for _ in range(int(job.get("repeat", 1))):
        streams = int(job.get("streams", 1))
        results += await asyncio.gather(*(one_stream(job) for _ in range(streams)))
    statuses: Counter[int] = Counter(status for status, _, _, _ in results)
    firsts = [int(first) for _, first, _, _ in results if first is not None]
    delays = [d for _, _, ds, _ in results for d in ds]
    return {
        "statuses": {str(k): v for k, v in statuses.items()},
        "first_event_us": firsts,
        "delay_us": delays,
        "body": next((body for _, _, _, body in results if body), ""),
    }


async def job_big(job: Job) -> Result:
    raw = build_request(job, "GET")
    conn = Connection(job["host"], job["port"], _client_tls(job))
    statuses: Counter[int] = Counter()
    total = 0
    elapsed_ns = 0
    body_text = ""
    try:
        for _ in range(int(job["repeat"])):
            reader, writer = await conn.open()
            started = time.perf_counter_ns()
            writer.write(raw)
            response = await read_head(reader)
            size = 0
            async for data in iter_body(reader, response):
                size += len(data)
                if response.status != 200 and len(body_text) < _BODY_KEEP:
                    body_text += data.decode("utf-8", "replace")
            elapsed_ns += time.perf_counter_ns() - started
            statuses[response.status] += 1
            total += size
            if response.will_close:
                await conn.close()
    finally:
        await conn.close()
    return {
        "statuses": {str(k): v for k, v in statuses.items()},
        "bytes": total,
        "elapsed": elapsed_ns / 1e9,
        "body": body_text[:_BODY_KEEP],
    }


# Linux's IP_BIND_ADDRESS_NO_PORT (socket module constant from Python 3.12 on): bind() picks
# the source address only; the port is chosen at connect() per 4-tuple, so each source address
# gets the whole ephemeral range instead of reserving a port per bind.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class IdleHolder:
    """The idle streams of one ``idle_open`` job, kept between jobs."""

    def __init__(self) -> None:
        self.streams: list[IdleStream] = []
        self.open = 0
        self.dropped = 0  # closed by the server while we held them
        self.bytes_after_open = 0
        self.closing = False


class IdleStream(asyncio.Protocol):
    """One held SSE GET: waits for the 200 head and the first event, then only counts bytes."""

    __slots__ = ("buffer", "established", "holder", "ready", "request", "transport")

    def __init__(self, request: bytes, holder: IdleHolder) -> None:
        self.request = request
        self.holder = holder
        self.buffer = b""
        self.established = False
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.established:
            self.holder.bytes_after_open += len(data)
            return
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        try:
            response = Response(self.buffer[: head_end + 4])
        except HttpError as exc:
            self._fail(exc)
            return
        if response.status != 200:
            body = self.buffer[head_end + 4 :][:200].decode("utf-8", "replace")
            self._fail(StatusError(response.status, body))
            return
        if b"\n\n" in self.buffer[head_end + 4 :]:  # the first event (chunk framing aside)
            self.established = True
            self.buffer = b""
            self.holder.open += 1
            if not self.ready.done():
                self.ready.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.established:
            self.holder.open -= 1
            if not self.holder.closing:
                self.holder.dropped += 1
        elif not self.ready.done():
            self.ready.set_exception(HttpError(f"closed before the first event ({exc})"))


_IDLE = IdleHolder()


async def job_idle_open(job: Job) -> Result:
    global _IDLE
    if _IDLE.streams:
        await job_idle_close({})
    holder = _IDLE = IdleHolder()
    loop = asyncio.get_running_loop()
    count = int(job["count"])
    sources: list[str] = list(job.get("sources", []))
    variants: list[dict[str, str]] = list(job.get("variants", [])) or [{}]
    requests = [
        build_request({**job, "headers": {**dict(job.get("headers", {})), **v}}, "GET")
        for v in variants
    ]
    timeout = float(job.get("timeout", 30.0))
    gate = asyncio.Semaphore(int(job.get("concurrency", 64)))
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[int] = []
    target = (str(job["host"]), int(job["port"]))

    deadline = time.monotonic() + float(job.get("deadline", 180.0))

    async def open_one(index: int) -> None:
        async with gate:
            if time.monotonic() > deadline:  # the server is stuck: do not wait on every stream
                errors["not tried: the job's deadline passed"] += 1
                statuses["error"] += 1
                return
            started = time.perf_counter_ns()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            stream: IdleStream | None = None
            try:
                if sources:
                    sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((sources[index % len(sources)], 0))
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, target)
                    request = requests[index % len(requests)]
                    _, stream = await loop.create_connection(
                        lambda: IdleStream(request, holder), sock=sock
                    )
                    holder.streams.append(stream)
                    await stream.ready
            except (OSError, HttpError, TimeoutError) as exc:
                if stream is None:
                    sock.close()
                elif stream.transport is not None:
                    stream.transport.close()
                text = str(exc) or type(exc).__name__
                errors[f"{type(exc).__name__}: {text[:120]}"] += 1
                statuses[str(exc.status) if isinstance(exc, StatusError) else "error"] += 1
                return
            statuses["200"] += 1
            latencies.append((time.perf_counter_ns() - started) // 1000)

    started = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in range(count)))
    return {
        "statuses": dict(statuses),
        "opened": holder.open,
        "elapsed": time.perf_counter() - started,
        "open_latency_us": percentiles(latencies),
        "errors": dict(errors.most_common(5)),
    }


async def job_idle_status(_: Job) -> Result:
    return {
        "statuses": {},
        "open": _IDLE.open,
        "dropped": _IDLE.dropped,
        "bytes_after_open": _IDLE.bytes_after_open,
    }


async def job_idle_close(_: Job) -> Result:
    holder = _IDLE
    holder.closing = True
    for stream in holder.streams:
        if stream.transport is not None:
            stream.transport.close()
    await asyncio.sleep(0)  # let connection_lost run
    for _attempt in range(100):
        if holder.open <= 0:
            break
        await asyncio.sleep(0.01)
    result = await job_idle_status({})
    holder.streams.clear()
    return result


JOBS = {
    "once": job_once,
    "post": job_post,
    "sse": job_sse,
    "big": job_big,
    "idle_open": job_idle_open,
    "idle_status": job_idle_status,
    "idle_close": job_idle_close,
}


async def serve(loop_name: str) -> None:
    for line in sys.stdin:  # one job at a time: the measured run is the only thing running
        if not line.strip():
            continue
        job: Job = json.loads(line)
        try:
            result = await JOBS[job["kind"]](job)
        except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "statuses": {}}
        result["loop"] = loop_name
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def main() -> int:
    # Up to the hard limit: the idle job holds one descriptor per stream.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop: Any = importlib.import_module("uvloop")  # optional: a cheaper client
    except ImportError:
        asyncio.run(serve("asyncio"))
    else:
        uvloop.run(serve("uvloop"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
