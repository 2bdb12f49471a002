"""HTTP responses: the one place that maps error kinds to HTTP, and the writer of a run's
result (gateway/run.py) to a client. Nothing here runs a query or owns a segment.

Result bytes go from shared-memory segments to the socket as memoryview slices of the
gateway's read-only mapping: no copy in Python, no decoding (a cached segment goes by
sendfile). While a piece is being sent the transport's write-buffer limit is zero, so each
drain waits until the kernel holds the bytes: once the next piece is asked for, nothing refers
to the last one and the pool may lend it again. A streamed result's chunk framing is written
around each slice straight to the transport: aiohttp's chunked writer would join them into a
copy on Python before 3.12.9.

A result whose length is known before its first byte (one segment, or a cached entry) is
sent with Content-Length and every X- header. A larger one streams as it is produced (chunked
transfer encoding): the first bytes leave once one segment is full, whatever the size, and
X-Row-Count / X-Execution-Time-Ms are not known in time for the headers (JSON carries both in
its body). If such a result fails midway, or a client takes no bytes for send_timeout_s, or
reads slower than results.min_send_kbps on average once its first send_timeout_s are over
(`SendClock`), the connection is aborted without the final chunk, so the client sees a
truncated transfer, never a silently short result; the access log says why (`aborted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time

import msgspec
from aiohttp import web

from engine import log as log_mod
from engine.errors import Kind, QueryError
from engine.formats import MEDIA_TYPES
from gateway.access import RequestFacts
from gateway.run import Piece, Result
from gateway.sendfile import sendfile

log = log_mod.get()

SMALL = 256 * 1024  # results up to this size are copied into one response body

STATUS = {
    Kind.BAD_REQUEST: 400,
    Kind.SQL_ERROR: 400,
    Kind.FILE_MISSING: 400,
    Kind.OUT_OF_MEMORY: 400,
    Kind.QUARANTINED: 400,
    Kind.UNAUTHORIZED: 401,
    Kind.FORBIDDEN: 403,
    Kind.NOT_FOUND: 404,
    Kind.CANCELLED: 409,
    Kind.REQUEST_TIMEOUT: 408,
    Kind.TOO_LARGE: 413,
    Kind.RATE_LIMITED: 429,
    Kind.OVERLOADED: 503,
    Kind.WORKER_LOST: 503,
    Kind.TIMEOUT: 504,
    Kind.INTERNAL: 500,
}
RETRY_AFTER_S = "1"


MIN_SEND_BYTES = web.AppKey("min_send_bytes", int)  # results.min_send_kbps x 1000


class SendClock:
    """How long a response's next bytes may take: send_timeout_s for any one write, and no
    later than an average of min_send_bytes a second allows once the first send_timeout_s are
    over. Time spent waiting for the worker is not the client's: it is excused."""

    def __init__(self, request: web.Request, send_timeout: float):
        self.idle = send_timeout
        self.rate = request.app.get(MIN_SEND_BYTES, 0)
        self.started = time.monotonic()
        self.sent = 0

    def limit(self, nbytes: int) -> float:
        """How long the next nbytes may take."""
        if not self.rate:
            return self.idle
        deadline = self.started + self.idle + (self.sent + nbytes) / self.rate
        return max(0.0, min(self.idle, deadline - time.monotonic()))

    def add(self, nbytes: int) -> None:
        self.sent += nbytes

    def excuse(self, since: float) -> None:
        self.started += time.monotonic() - since


def error_body(kind: Kind, message: str) -> bytes:
    return msgspec.json.encode({"success": False, "error": message, "error_type": str(kind)})


def error_response(kind: Kind, message: str, status: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    status = status or STATUS[kind]
    headers = {**({"Retry-After": RETRY_AFTER_S} if status in (429, 503) else {}),
               **(headers or {})}
    return web.Response(status=status, body=error_body(kind, message),
                        content_type="application/json", headers=headers)


def json_tail(execution_ms: float, wait_ms: float) -> bytes:
    """The end of Arc's JSON shape; the worker wrote everything up to row_count."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return (f',"execution_time_ms":{execution_ms:.3f},"wait_time_ms":{wait_ms:.3f},'
            f'"timestamp":"{stamp}","error":null}}').encode()


async def send_result(request: web.Request, result: Result, fmt: str, send_timeout: float,
                      facts: RequestFacts) -> web.StreamResponse:
    """Write a run's result as the response; what happened goes into facts (access log)."""
    headers = {"Content-Type": MEDIA_TYPES[fmt], "X-Wait-Time-Ms": f"{result.wait_ms:.3f}",
               "X-Files-Scanned": str(result.files_scanned),  # known from the plan, before any row
               "X-Files-Pruned": str(result.files_pruned)}
    if result.cache:
        headers["X-Cache"] = result.cache
    known = result.length is not None
    if known:
        headers.update({"X-Row-Count": str(result.rows),
                        "X-Execution-Time-Ms": f"{result.execution_ms:.3f}"})
        if result.cache in ("hit", "coalesced"):
            headers["Age"] = str(result.age_s)
    started = time.perf_counter()
    try:
        if known and result.length <= SMALL:
            body = b"".join([bytes(buf) async for piece in result async for buf in piece.buffers()])
            if fmt == "json":
                body += json_tail(result.execution_ms, result.wait_ms)
            return web.Response(body=body, headers=headers)
        return await _send(request, result, fmt, headers, SendClock(request, send_timeout), facts)
    finally:
        facts.send_ms = (time.perf_counter() - started) * 1000
        facts.note(result)


async def _send(request: web.Request, result: Result, fmt: str, headers: dict,
                clock: SendClock, facts: RequestFacts) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    chunked = result.length is None
    tail = json_tail(result.execution_ms, result.wait_ms) if fmt == "json" and not chunked else b""
    if chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = result.length + len(tail)
    writer = await response.prepare(request)
    facts.status_sent = response.status
    try:
        while True:
            waiting = time.monotonic()
            try:
                piece = await anext(result)
            except StopAsyncIteration:
                break
            clock.excuse(waiting)  # time spent waiting for the worker is not the client's
            with _unbuffered(request) as transport:
                if piece.fd is not None:
                    await _sendfile(transport, writer, piece, clock)
                else:
                    await _write(transport, writer, piece, clock, chunked)
        if fmt == "json":
            tail = tail or json_tail(result.execution_ms, result.wait_ms)
            await response.write(tail)
            clock.add(len(tail))
        await response.write_eof()
    except (QueryError, TimeoutError, ConnectionError) as exc:
        facts.aborted, reason = (
            (str(exc.kind), exc.message) if isinstance(exc, QueryError) else
            ("too_slow", _too_slow(clock)) if isinstance(exc, TimeoutError) else
            ("client_gone", "the client went away"))
        log.warning("stream_aborted", request_id=facts.request_id, aborted=facts.aborted,
                    error=reason, sent_bytes=clock.sent)
        if request.transport is not None:
            request.transport.abort()
    finally:
        facts.body_sent = clock.sent
    return response


async def _write(transport, writer, piece: Piece, clock: SendClock, chunked: bool) -> None:
    """Write piece and wait until the kernel has all of it (see the module docstring)."""
    async for buf in piece.buffers():
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        if chunked:
            transport.write(f"{len(buf):x}\r\n".encode())
        transport.write(buf)
        if chunked:
            transport.write(b"\r\n")
        writer.output_size += len(buf)
        async with asyncio.timeout(clock.limit(len(buf))):
            await writer.drain()
        clock.add(len(buf))


async def _sendfile(transport, writer, piece: Piece, clock: SendClock) -> None:
    """A cached segment, by sendfile(2) in a thread. Its own poll times out (no cancellation:
    that would close the connection under aiohttp, which then cancels the handler instead)."""
    await sendfile(transport, piece.fd, 0, piece.length, max(clock.limit(piece.length), 0.001))
    writer.output_size += piece.length
    clock.add(piece.length)


def _too_slow(clock: SendClock) -> str:
    rate = f" or below {clock.rate / 1000:g} KB/s (results.min_send_kbps)" if clock.rate else ""
    return (f"the client took no bytes for {clock.idle:g} s (results.send_timeout_s){rate} "
            f"after {clock.sent} bytes")


@contextlib.contextmanager
def _unbuffered(request: web.Request):
    """The transport with its write-buffer limit at zero, so a drain waits until the kernel
    holds every byte written; the default limits come back afterwards."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    transport.set_write_buffer_limits(high=0)
    try:
        yield transport
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits()
