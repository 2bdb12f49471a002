"""Responses: the one place that maps error kinds to HTTP, and the sender of result bytes.

Result bytes go from shared-memory segments to the socket as memoryview slices of the
gateway's read-only mapping: no copy in Python, no decoding. While a segment is being sent
the transport's write-buffer limit is zero, so each drain waits until the kernel holds the
bytes: once a segment's send returns, nothing refers to it and the pool may lend it again.

A result that fits one segment is sent with Content-Length and every X- header. A larger one
streams as it is produced (chunked transfer encoding): the first bytes leave once one segment
is full, whatever the size, and X-Row-Count / X-Execution-Time-Ms are not known in time for
the headers (JSON carries both in its body). If such a result fails midway, or a client takes
no bytes for send_timeout_s, the connection is aborted without the final chunk, so the client
sees a truncated transfer, never a silently short result.
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

log = log_mod.get()

SLICE = 4 * 1024 * 1024
SMALL = 256 * 1024  # results up to this size are copied into one response body

STATUS = {
    Kind.BAD_REQUEST: 400,
    Kind.SQL_ERROR: 400,
    Kind.OUT_OF_MEMORY: 400,
    Kind.QUARANTINED: 400,
    Kind.UNAUTHORIZED: 401,
    Kind.FORBIDDEN: 403,
    Kind.TOO_LARGE: 413,
    Kind.RATE_LIMITED: 429,
    Kind.OVERLOADED: 503,
    Kind.WORKER_LOST: 503,
    Kind.TIMEOUT: 504,
    Kind.INTERNAL: 500,
}
RETRY_AFTER_S = "1"


def error_response(kind: Kind, message: str, status: int | None = None) -> web.Response:
    status = status or STATUS[kind]
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    body = msgspec.json.encode({"success": False, "error": message, "error_type": str(kind)})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


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
    with _unbuffered(request) as transport:
        async with asyncio.timeout(send_timeout):
            await writer.drain()  # the headers: sendfile writes behind the transport's back
        for segment, length in entry.segments:
            await sendfile(transport, segment.fd, 0, length, send_timeout)
            writer.output_size += length
    if tail:
        await response.write(tail)
    await response.write_eof()
    return response


async def _send(request, job: Job, fmt: str, send_timeout: float, segment: Segment, length: int,
                result, keeper: Keeper | None, cache_state: str | None) -> web.StreamResponse:
    headers = {"Content-Type": MEDIA_TYPES[fmt], "X-Wait-Time-Ms": f"{job.wait_ms:.3f}"}
    if cache_state:
        headers["X-Cache"] = cache_state
    if result is not None:
        return await _send_whole(request, job, fmt, segment, length, result, headers, send_timeout)
    response = web.StreamResponse(headers=headers)
    response.enable_chunked_encoding()
    writer = await response.prepare(request)
    try:
        while True:
            try:
                await _send_view(request, response, writer, segment.view[:length], send_timeout)
            finally:
                job.sent(segment, kept=keeper is not None and keeper.keep(segment, length))
            if result is not None:
                break
            segment, length, result = await job.next()
        if fmt == "json":
            await response.write(json_tail(result.execution_ms, job.wait_ms))
        await response.write_eof()
        if keeper is not None and (entry := keeper.finish(result.rows, result.execution_ms)):
            entry.unpin()  # stored for the next requests; this one has it all
    except (QueryError, TimeoutError) as exc:
        log.warning("stream_aborted", query_id=job.id, error=str(exc))
        if request.transport is not None:
            request.transport.abort()
    return response


async def _send_whole(request, job: Job, fmt: str, segment: Segment, length: int,
                      result, headers: dict, send_timeout: float) -> web.StreamResponse:
    headers.update({"X-Row-Count": str(result.rows),
                    "X-Execution-Time-Ms": f"{result.execution_ms:.3f}"})
    tail = json_tail(result.execution_ms, job.wait_ms) if fmt == "json" else b""
    try:
        if length <= SMALL:
            return web.Response(body=bytes(segment.view[:length]) + tail, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.content_length = length + len(tail)
        writer = await response.prepare(request)
        await _send_view(request, response, writer, segment.view[:length], send_timeout)
    finally:
        job.sent(segment)
    if tail:
        await response.write(tail)
    await response.write_eof()
    return response


async def _send_view(request: web.Request, response: web.StreamResponse, writer,
                     view: memoryview, send_timeout: float) -> None:
    """Write view and wait until the kernel has all of it (see the module docstring)."""
    with _unbuffered(request):
        for offset in range(0, len(view), SLICE):
            async with asyncio.timeout(send_timeout):
                await response.write(view[offset:offset + SLICE])
        async with asyncio.timeout(send_timeout):
            await writer.drain()  # with the limit at zero: until the kernel has every byte


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
