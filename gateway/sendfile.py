"""sendfile(2) from a shared-memory segment to a client's socket, off the event loop.

uvloop has no loop.sendfile, so the kernel call runs in a thread: the bytes go from the
segment's pages to the socket without entering Python, and the event loop serves other
requests meanwhile. The thread uses its own duplicate of the socket's descriptor, so the
number cannot be reused under it if the connection closes; if the request is cancelled the
socket is shut down, which ends the call at once. Either way the caller returns only when the
thread no longer reads the segment, so the segment may then be reused or freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket


def _send_all(sock_fd: int, file_fd: int, offset: int, count: int, timeout_s: float) -> None:
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    end = offset + count
    while offset < end:
        try:
            offset += os.sendfile(sock_fd, file_fd, offset, end - offset)
        except BlockingIOError:
            if not poller.poll(timeout_s * 1000):
                raise TimeoutError(f"client took no bytes for {timeout_s:g} s") from None


async def sendfile(transport: asyncio.Transport, file_fd: int, offset: int, count: int,
                   timeout_s: float) -> None:
    """Send count bytes of file_fd from offset; the transport's own buffer must be empty."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    own = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        job = asyncio.get_running_loop().run_in_executor(
            None, _send_all, own.fileno(), file_fd, offset, count, timeout_s)
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                own.shutdown(socket.SHUT_RDWR)
            await asyncio.wait([job])
            raise
    finally:
        own.close()
