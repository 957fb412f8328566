"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections to the app servers.

aiohttp's ClientSession was a third of the CPU of a small proxied POST (a request object, a
writer task, a StreamReader, timers and a CIMultiDict per exchange). This client does what a
reverse proxy needs and nothing else: the request head is serialised by hand and goes out with
a small body in one write; the answer is parsed by llhttp (``httptools``) in the protocol's
``data_received``, and the handler waits on one future, never on a second task.

Why httptools and not aiohttp's own C parser: aiohttp's parser is private API (its signature
changed between minor releases) and comes with its own StreamReader, flow control and header
multidict per message; httptools is llhttp with plain callbacks, a public and stable API from
the uvloop authors, so the buffering and flow control below stay ours and cost one list.

Behaviour a proxy relies on (RFC 9112 = HTTP/1.1 messages, RFC 9110 = semantics):

- bytes untouched: no auto headers beyond Host and the body framing, no decompression;
- a connection is reused only after a complete answer without ``Connection: close`` (§9.3)
  and with the whole request body sent; a stale pooled connection (the upstream closed it
  while idle) is noticed before anything is written and never used, so nothing is replayed:
  a request that may have reached the upstream is never sent twice (RFC 9112 §9.3.1 allows
  automatic retries of idempotent requests only; POSTs are tool calls);
- 1xx interim answers are skipped (RFC 9110 §15.2); 101 is an error (proxyd never asks for an
  upgrade: Upgrade is hop-by-hop and stripped);
- a body without Content-Length or chunked framing ends when the upstream closes (RFC 9112
  §6.3 item 8); any other close before the end is a truncation. Over TLS, RFC 9112 §9.8 wants
  such a body refused without a close_notify alert; asyncio's SSL layer reports a bare TCP
  close the same way as the alert, so that case passes as a clean end (as with aiohttp);
- trailers are dropped (RFC 9112 §7.1.2: a recipient that removes the chunked coding may
  discard them);
- idle connections are closed after ``keepalive_timeout`` (shorter than common upstream
  keep-alive timeouts, so the upstream rarely closes one under a request), at most
  ``max_idle`` are kept per upstream; active connections are never capped (open SSE streams
  must not queue behind each other).

HEAD is never sent (the MCP endpoint allows POST, GET and DELETE only): llhttp cannot be told
that an answer to HEAD has no body, so ``request_head`` refuses it.

The parts, split by lifetime as uvicorn and httpcore split theirs: ``wire`` (what goes out),
``connection`` (one connection and its ``State``), ``answer`` (one response being read, made
fresh per exchange), ``flow`` (read/write pause), ``deadlines`` (the idle timeouts on shared
loop timers) and ``pool`` (``UpstreamClient``).
"""

from proxyd.upstream.answer import MAX_HEAD
from proxyd.upstream.connection import Connection, State
from proxyd.upstream.flow import HIGH_WATER, FlowControl
from proxyd.upstream.pool import UpstreamClient
from proxyd.upstream.wire import Origin, request_head

__all__ = [
    "HIGH_WATER",
    "MAX_HEAD",
    "Connection",
    "FlowControl",
    "Origin",
    "State",
    "UpstreamClient",
    "request_head",
]
