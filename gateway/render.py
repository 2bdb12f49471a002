"""Responses: the one place that maps error kinds to HTTP, and the sender of result bytes.

Result bytes go from shared-memory segments to the socket as memoryview slices of the
gateway's read-only mapping: no copy in Python, no decoding. While a segment is being sent
the transport's write-buffer limit is zero, so each drain waits until the kernel holds the
bytes: once a segment's send returns, nothing refers to it and the pool may lend it again.

A result that fits one segment is sent with Content-Length and every X- header. A larger one
streams as it is produced (chunked transfer encoding): the first bytes leave once one segment
is full, whatever the size, and X-Row-Count / X-Execution-Time-Ms are not known in time for
the headers (JSON carries both in its body). If such a result fails midway, or a client takes
no bytes for send_timeout_s, or reads slower than results.min_send_kbps on average once its
first send_timeout_s are over (`SendClock`), the connection is aborted without the final chunk,
so the client sees a truncated transfer, never a silently short result.

Pieces a slow client left behind wait in a spill file (gateway/spill.py) and are read back a
slice at a time as the client takes them. A client may be sent at most max_streams_per_client
streamed results at once (gateway/streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time

import msgspec
from aiohttp import web

from engine import log as log_mod
from engine.encode import MEDIA_TYPES
from engine.errors import Kind, QueryError
from engine.shm import Segment
from gateway.cache import Entry, Keeper
from gateway.fleet import Job
from gateway.sendfile import sendfile
from gateway.spill import Piece
from gateway.streams import STREAMS

log = log_mod.get()

SLICE = 4 * 1024 * 1024
SMALL = 256 * 1024  # results up to this size are copied into one response body

STATUS = {
    Kind.BAD_REQUEST: 400,
    Kind.SQL_ERROR: 400,
    Kind.FILE_MISSING: 400,
    Kind.OUT_OF_MEMORY: 400,
    Kind.QUARANTINED: 400,
    Kind.UNAUTHORIZED: 401,
    Kind.FORBIDDEN: 403,
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


def error_response(kind: Kind, message: str, status: int | None = None) -> web.Response:
    status = status or STATUS[kind]
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return web.Response(status=status, body=error_body(kind, message),
                        content_type="application/json", headers=headers)


def json_tail(execution_ms: float, wait_ms: float) -> bytes:
    """The end of Arc's JSON shape; the worker wrote everything up to row_count."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return (f',"execution_time_ms":{execution_ms:.3f},"wait_time_ms":{wait_ms:.3f},'
            f'"timestamp":"{stamp}","error":null}}').encode()


async def send_result(request: web.Request, job: Job, fmt: str, send_timeout: float,
                      keeper: Keeper | None = None, cache_state: str | None = None) -> web.StreamResponse:
    """Send a job's result; with a keeper, also keep it for the cache (X-Cache: miss)."""
    segment, length, result = await job.next()
    started = time.perf_counter()
    try:
        if keeper is not None and result is not None:
            entry = _keep_whole(job, keeper, segment, length, result)
            if entry is not None:
                try:
                    return await send_entry(request, entry, fmt, "miss", send_timeout, job.wait_ms)
                finally:
                    entry.unpin()
        return await _send(request, job, fmt, send_timeout, segment, length, result, keeper,
                           cache_state)
    finally:
        job.send_ms = (time.perf_counter() - started) * 1000


def _keep_whole(job: Job, keeper: Keeper, segment: Segment, length: int, result) -> Entry | None:
    """A one-segment result for the cache: a small one is copied and its segment returned."""
    if length <= SMALL:
        body = bytes(segment.view[:length])
        job.sent(segment)
        return keeper.finish(result.rows, result.execution_ms, body)
    if not keeper.keep(segment, length):
        return None
    job.sent(segment, kept=True)
    return keeper.finish(result.rows, result.execution_ms)


async def send_entry(request: web.Request, entry: Entry, fmt: str, cache_state: str,
                     send_timeout: float, wait_ms: float = 0.0) -> web.StreamResponse:
    """Send a cached result, which the caller has pinned: bytes, or sendfile from its segments."""
    headers = {"Content-Type": MEDIA_TYPES[fmt], "X-Row-Count": str(entry.rows),
               "X-Execution-Time-Ms": f"{entry.execution_ms:.3f}",
               "X-Wait-Time-Ms": f"{wait_ms:.3f}", "X-Cache": cache_state,
               "Age": str(int(time.monotonic() - entry.created))}
    tail = json_tail(entry.execution_ms, wait_ms) if fmt == "json" else b""
    if entry.body is not None:
        return web.Response(body=entry.body + tail if tail else entry.body, headers=headers)
    response = web.StreamResponse(headers=headers)
    response.content_length = entry.length + len(tail)
    writer = await response.prepare(request)
    clock = SendClock(request, send_timeout)
    try:
        with _unbuffered(request) as transport:
            async with asyncio.timeout(clock.limit(0)):
                await writer.drain()  # the headers: sendfile writes behind the transport's back
            for segment, length in entry.segments:
                # The thread's own poll times out (no cancellation: that would close the
                # connection under aiohttp, which then cancels the handler instead).
                await sendfile(transport, segment.fd, 0, length, max(clock.limit(length), 0.001))
                writer.output_size += length
                clock.add(length)
    except TimeoutError:
        return _abort(request, response, _too_slow(clock))
    if tail:
        await response.write(tail)
    await response.write_eof()
    return response


async def _send(request, job: Job, fmt: str, send_timeout: float, segment: Segment, length: int,
                result, keeper: Keeper | None, cache_state: str | None) -> web.StreamResponse:
    headers = {"Content-Type": MEDIA_TYPES[fmt], "X-Wait-Time-Ms": f"{job.wait_ms:.3f}"}
    if cache_state:
        headers["X-Cache"] = cache_state
    clock = SendClock(request, send_timeout)
    if result is not None:
        return await _send_whole(request, job, fmt, segment, length, result, headers, clock)
    slots = request.app.get(STREAMS)
    try:
        hold = slots.hold(request) if slots is not None else contextlib.nullcontext()
        hold.__enter__()
    except QueryError:
        job.sent(segment)
        raise
    try:
        return await _stream(request, job, fmt, segment, length, keeper, headers, clock)
    finally:
        hold.__exit__(None, None, None)


async def _stream(request, job: Job, fmt: str, segment: Segment, length: int,
                  keeper: Keeper | None, headers: dict, clock: SendClock) -> web.StreamResponse:
    """A result of more than one segment, sent as its pieces come (chunked)."""
    response = web.StreamResponse(headers=headers)
    response.enable_chunked_encoding()
    writer = await response.prepare(request)
    result = None
    try:
        while True:
            try:
                if isinstance(segment, Piece):
                    await _send_piece(request, response, writer, segment, clock)
                else:
                    await _send_view(request, response, writer, segment.view[:length], clock)
            finally:
                kept = False
                if keeper is not None:
                    if isinstance(segment, Piece):
                        keeper.give_up()  # spilled: too large for the cache anyway
                    else:
                        kept = keeper.keep(segment, length)
                job.sent(segment, kept=kept)
            if result is not None:
                break
            waiting = time.monotonic()
            segment, length, result = await job.next()
            clock.excuse(waiting)
        if fmt == "json":
            await response.write(json_tail(result.execution_ms, job.wait_ms))
        await response.write_eof()
        if keeper is not None and (entry := keeper.finish(result.rows, result.execution_ms)):
            entry.unpin()  # stored for the next requests; this one has it all
    except (QueryError, TimeoutError) as exc:
        log.warning("stream_aborted", query_id=job.id, error=str(exc) or _too_slow(clock))
        if request.transport is not None:
            request.transport.abort()
    return response


def _too_slow(clock: SendClock) -> str:
    rate = f" or below {clock.rate / 1000:g} KB/s (results.min_send_kbps)" if clock.rate else ""
    return (f"the client took no bytes for {clock.idle:g} s (results.send_timeout_s){rate} "
            f"after {clock.sent} bytes")


async def _send_whole(request, job: Job, fmt: str, segment: Segment, length: int,
                      result, headers: dict, clock: SendClock) -> web.StreamResponse:
    headers.update({"X-Row-Count": str(result.rows),
                    "X-Execution-Time-Ms": f"{result.execution_ms:.3f}"})
    tail = json_tail(result.execution_ms, job.wait_ms) if fmt == "json" else b""
    try:
        if length <= SMALL:
            return web.Response(body=bytes(segment.view[:length]) + tail, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.content_length = length + len(tail)
        writer = await response.prepare(request)
        try:
            await _send_view(request, response, writer, segment.view[:length], clock)
        except TimeoutError:
            return _abort(request, response, _too_slow(clock), query_id=job.id)
    finally:
        job.sent(segment)
    if tail:
        await response.write(tail)
    await response.write_eof()
    return response


async def _send_view(request: web.Request, response: web.StreamResponse, writer,
                     view: memoryview, clock: SendClock) -> None:
    """Write view and wait until the kernel has all of it (see the module docstring)."""
    with _unbuffered(request):
        for offset in range(0, len(view), SLICE):
            piece = view[offset:offset + SLICE]
            async with asyncio.timeout(clock.limit(len(piece))):
                await response.write(piece)
            clock.add(len(piece))
        async with asyncio.timeout(clock.limit(0)):
            await writer.drain()  # with the limit at zero: until the kernel has every byte


def _abort(request: web.Request, response: web.StreamResponse, reason: str, **fields):
    """A client too slow after the headers (Content-Length) were sent: drop the connection;
    an error response now would land inside the body."""
    log.warning("send_aborted", error=reason, **fields)
    if request.transport is not None:
        request.transport.abort()
    return response


async def _send_piece(request: web.Request, response: web.StreamResponse, writer, piece: Piece,
                      clock: SendClock) -> None:
    """A spilled piece, read back a slice at a time (in a spill thread) as the client takes it:
    a slow client holds one slice of memory and no thread."""
    try:
        await asyncio.shield(piece.copied)  # cancelling must not free its segment mid-copy
        with _unbuffered(request):
            for offset in range(0, piece.length, SLICE):
                data = await piece.read(offset, min(SLICE, piece.length - offset))
                async with asyncio.timeout(clock.limit(len(data))):
                    await response.write(data)
                clock.add(len(data))
            async with asyncio.timeout(clock.limit(0)):
                await writer.drain()
    except (TimeoutError, ConnectionError):
        raise  # the client's doing: the caller aborts the stream
    except OSError as exc:  # the disk's
        raise QueryError(Kind.INTERNAL, f"the spilled result could not be written or read back: "
                                        f"{exc}") from None


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
