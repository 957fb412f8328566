"""One response being read: made fresh by ``Connection.send()``, written by llhttp's callbacks.

Everything that belongs to one exchange lives here, so none of it can outlive its exchange:
a new ``_Answer`` per send replaced a ``_reset()`` that had to clear 18 attributes by hand (an
attribute it forgot carried over into the next exchange on the same connection). uvicorn's
``RequestResponseCycle`` is the same idea on the server side.
"""

from __future__ import annotations

from typing import Final

from httptools import HttpResponseParser

from proxyd.errors import UpstreamError

# The whole answer head (status line and fields) must fit; nginx calls this "upstream sent
# too big header" (502). llhttp itself has no limit.
MAX_HEAD: Final = 64 * 1024


class _Answer:
    """The final answer to one request: its head, body chunks not yet read, and framing."""

    __slots__ = (
        "buffered",
        "chunks",
        "complete",
        "error",
        "fields_size",
        "gap",
        "head_done",
        "head_size",
        "headers",
        "interim",
        "keep_alive",
        "last_read",
        "raw_reason",
        "reason",
        "status",
        "timeout",
        "until_eof",
    )

    def __init__(self, timeout: float, now: float) -> None:
        self.status = 0  # 0 until the final answer's head is in
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.keep_alive = False  # llhttp's verdict, and RFC 9112 §6.1 (below)
        self.until_eof = False  # the body ends when the upstream closes (RFC 9112 §6.3)
        self.head_done = False
        self.complete = False  # the whole final answer was read
        self.interim = False  # a 1xx is being parsed: its end is not the answer's
        self.error: UpstreamError | None = None
        self.chunks: list[bytes] = []  # body bytes not yet taken by read()
        self.buffered = 0  # their size, for read-side flow control
        self.raw_reason = b""  # the status line's reason as it arrives
        self.head_size = 0  # bytes received before the head was complete
        self.fields_size = 0  # the fields' size, for a head that arrived whole in one read
        self.gap = 0  # bytes since the last body byte: chunk lines and trailers
        self.timeout = timeout  # the idle timeout: the most time allowed between reads
        self.last_read = now

    def head_in(self, status: int, parser: HttpResponseParser) -> None:
        """The final answer's head is complete: status, reason and the body's framing."""
        self.status = status
        self.reason = self.raw_reason.decode("latin-1").strip()
        keep_alive = parser.should_keep_alive()
        # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (a 1.0 hop
        # may have passed chunked on unknowingly): close after it. llhttp keeps it alive.
        if (
            keep_alive
            and parser.get_http_version() == "1.0"
            and any(name.lower() == "transfer-encoding" for name, _ in self.headers)
        ):
            keep_alive = False
        self.keep_alive = keep_alive
        self.head_done = True
        self.until_eof = self._ends_at_eof(status)

    def _ends_at_eof(self, status: int) -> bool:
        # RFC 9112 §6.3: no body for 204/304; Content-Length or a final chunked coding frame
        # it; anything else reads until the close (item 8).
        if status in (204, 304):
            return False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                return False
            if lower == "transfer-encoding" and value.rsplit(",", 1)[-1].strip().lower() == (
                "chunked"
            ):
                return False
        return True
