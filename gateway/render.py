"""Responses: the one place that maps error kinds to HTTP, and the sender of result bytes.

Result bytes go from the shared-memory segment to the socket as memoryview slices of a
read-only mapping: no copy in Python, no decode. The transport's write buffer limit is set to
zero while a segment is being sent, so every drain waits until the kernel has taken the
bytes: when send_segment returns, nothing refers to the segment any more and it can be reused.
"""

from __future__ import annotations

import datetime
import os
import time

import msgspec
from aiohttp import web

from engine.errors import Kind
from engine.shm import Segment

CHUNK = 4 * 1024 * 1024
SMALL = 256 * 1024  # results up to this size are read with one pread instead of mapped

STATUS = {
    Kind.BAD_REQUEST: 400,
    Kind.SQL_ERROR: 400,
    Kind.OUT_OF_MEMORY: 400,
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


async def send_segment(request: web.Request, segment: Segment, length: int, tail: bytes,
                       content_type: str, headers: dict[str, str]) -> web.StreamResponse:
    if length <= SMALL:
        body = os.pread(segment.fd, length, 0) + tail
        return web.Response(body=body, headers={**headers, "Content-Type": content_type})
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = content_type
    response.content_length = length + len(tail)
    writer = await response.prepare(request)
    transport = request.transport
    if length and transport is not None:
        mapping = segment.map(length)
        view = memoryview(mapping)
        transport.set_write_buffer_limits(high=0)
        try:
            for offset in range(0, length, CHUNK):
                await response.write(view[offset:offset + CHUNK])
            await writer.drain()  # with the limit at zero: until the kernel has every byte
        finally:
            view.release()
            try:
                mapping.close()
            except BufferError:  # a closed connection may still hold a slice; GC frees it
                pass
            if not transport.is_closing():
                transport.set_write_buffer_limits()
    if tail:
        await response.write(tail)
    await response.write_eof()
    return response


def now_ms() -> float:
    return time.perf_counter() * 1000
