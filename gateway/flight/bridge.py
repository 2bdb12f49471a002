"""From gRPC threads into the gateway's event loop, and result bytes back out.

pyarrow.flight calls each RPC handler on a gRPC thread; every query, plan and catalog lookup
lives on the gateway's asyncio loop. This module owns the crossing:

- `call(loop, context, coro)`: runs a coroutine on the loop (run_coroutine_threadsafe) and
  waits for it on the gRPC thread, looking at the call every POLL_S; when the client cancels
  the call or its deadline passes (gRPC marks the call cancelled), the loop's task is
  cancelled, which interrupts the query in its worker (the run API's contract).
- `Pipe`: one result's bytes, from the loop task that reads the run API's pieces (`feed`)
  to the gRPC thread that decodes them with pyarrow's IPC stream reader (`read`, a file-like
  object). At most `limit` bytes wait in it, so a slow client holds the loop task (and through
  it the run's own back-pressure), never unbounded memory; a client that takes nothing for
  `send_timeout` seconds ends its query (QueryError TIMEOUT), as HTTP's send_timeout_s does.
  Each piece is copied once, out of its shared-memory segment (which the run API reuses once
  the next piece is asked for).

Failures cross as exceptions: `call` raises what the coroutine raised; the pipe ends early and
keeps its error for the reader's owner (gateway/flight/server.py) to raise as a status.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading

import pyarrow.flight as fl

from engine.errors import Kind, QueryError

POLL_S = 0.05  # how soon a cancelled call is noticed


def call(loop: asyncio.AbstractEventLoop, context, coro):
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    while True:
        try:
            return future.result(POLL_S)
        except concurrent.futures.TimeoutError:
            if context is not None and context.is_cancelled():
                future.cancel()
                raise fl.FlightCancelledError("the call was cancelled (by the client or its "
                                              "deadline)") from None
        except concurrent.futures.CancelledError:
            raise fl.FlightCancelledError("the query was cancelled") from None


class Pipe:
    """Bytes from the loop to one gRPC thread, bounded; `read` is a file's read()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, context, limit: int, send_timeout: float):
        self._loop = loop
        self._context = context
        self._limit = limit
        self._send_timeout = send_timeout
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._buffered = 0
        self._done = False
        self.error: BaseException | None = None
        self.bytes = 0
        self._cond = threading.Condition()
        self._room = asyncio.Event()  # loop side; created on the gRPC thread, used on the loop
        self.future: concurrent.futures.Future | None = None
        self.closed = False  # pyarrow's file interface

    # --- the loop's side ---

    async def feed(self, data: bytes) -> None:
        while True:
            with self._cond:
                if self._buffered < self._limit:
                    self._chunks.append(memoryview(data))
                    self._buffered += len(data)
                    self._cond.notify()
                    return
                self._room.clear()
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._room.wait()
            except TimeoutError:
                raise QueryError(Kind.TIMEOUT, f"the client took no bytes for "
                                               f"{self._send_timeout:g} s (results.send_timeout_s)"
                                 ) from None

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self.error = error
            self._cond.notify()

    # --- the gRPC thread's side ---

    def start(self, coro) -> None:
        self.future = asyncio.run_coroutine_threadsafe(coro, self._loop)

    def cancel(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.cancel()

    def started(self, timeout: float) -> bool:
        """Whether the first bytes (or the end) arrived within timeout seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._chunks or self._done, timeout)

    def adopt(self, context) -> None:
        """Another call reads the stream from now on: its cancellation ends the query."""
        self._context = context

    def read(self, size: int = -1):
        """Up to size bytes (all that is left if size < 0); b"" at the end. A request the
        first chunk holds is a view of it (no copy); one across chunks is joined."""
        parts: list[memoryview] = []
        got = 0
        with self._cond:
            while size < 0 or got < size:
                if not self._chunks:
                    if self._done:
                        break  # a short read only at the end: pyarrow takes it as the end
                    if self._context is not None and self._context.is_cancelled():
                        self.cancel()
                        raise fl.FlightCancelledError("the call was cancelled")
                    if self._buffered < self._limit:  # taken: the loop may feed again
                        self._loop.call_soon_threadsafe(self._room.set)
                    self._cond.wait(POLL_S)
                    continue
                head = self._chunks[0]
                take = len(head) if size < 0 else min(len(head), size - got)
                parts.append(head[:take])
                if take == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[take:]
                self._buffered -= take
                got += take
            if self._buffered < self._limit:
                self._loop.call_soon_threadsafe(self._room.set)
        self.bytes += got
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def close(self) -> None:
        self.closed = True
