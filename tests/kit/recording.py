"""A recording upstream: stores every request byte for byte, answers what the test says.

Proves what reached the app server (never a parsed or re-encoded view of it): proxyd always
sends a request body whole with a Content-Length, so a head and that many bytes are one request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

Answer = Callable[["RawRequest"], list[bytes]]


@dataclass(frozen=True)
class RawRequest:
    head: bytes
    body: bytes

    @property
    def method(self) -> str:
        return self.head.split(b" ", 1)[0].decode()

    def header(self, name: str) -> list[str]:
        wanted = name.lower().encode()
        lines = self.head.split(b"\r\n")[1:]
        return [
            value.strip().decode("latin-1")
            for key, _, value in (line.partition(b":") for line in lines)
            if key.strip().lower() == wanted
        ]


def json_answer(
    body: bytes, status: str = "200 OK", content_type: str = "application/json"
) -> Answer:
    def answer(_: RawRequest) -> list[bytes]:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        return [head + body]

    return answer


def chunked_answer(
    chunks: list[bytes], status: str = "200 OK", content_type: str = "text/event-stream"
) -> Answer:
    """Each chunk written on its own (proxyd sees the stream cut exactly there)."""

    def answer(_: RawRequest) -> list[bytes]:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        parts = [head.encode() + b"Transfer-Encoding: chunked\r\n\r\n"]
        parts += [b"%x\r\n%b\r\n" % (len(c), c) for c in chunks if c]
        parts.append(b"0\r\n\r\n")
        return parts

    return answer


@dataclass
class RecordingUpstream:
    url: str
    answer: Answer
    requests: list[RawRequest] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request = RawRequest(head, b"")
                lengths = request.header("Content-Length")
                body = await reader.readexactly(int(lengths[0])) if lengths else b""
                request = RawRequest(head, body)
                self.requests.append(request)
                for part in self.answer(request):
                    writer.write(part)
                    await writer.drain()
        finally:
            self.writers.discard(writer)
            writer.close()


@asynccontextmanager
async def recording_upstream(answer: Answer) -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream("", answer)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream.url = f"http://127.0.0.1:{port}/mcp"
    try:
        yield upstream
    finally:
        server.close()
        for writer in list(upstream.writers):
            writer.close()  # proxyd's pooled keep-alive connections
        await server.wait_closed()
