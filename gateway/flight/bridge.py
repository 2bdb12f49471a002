"""From gRPC threads into the gateway's event loop, and result bytes back out.

pyarrow.flight calls each RPC handler on a gRPC thread; every query, plan and catalog lookup
lives on the gateway's asyncio loop. This module owns the crossing:

- `call(loop, context, coro)`: runs a coroutine on the loop (run_coroutine_threadsafe) and
  waits for it on the gRPC thread, looking at the call every POLL_S; when the client cancels
  the call or its deadline passes (gRPC marks the call cancelled), the loop's task is
  cancelled, which interrupts the query in its worker (the run API's contract).
- `Pipe`: one result's bytes, from the loop task that reads the run API's pieces (`feed`)
  to the gRPC thread that decodes them with pyarrow's IPC stream reader (`read`, a file-like
  object). The loop lends views of each piece and waits until they are taken (`drained`)
  before it asks for the next, so a slow client holds the loop task (and through it the
  run's own back-pressure), never memory of its own; a client that takes nothing for
  `send_timeout` seconds ends its query (QueryError TIMEOUT), as HTTP's send_timeout_s does.
  Each byte is copied once, by the reader, without the GIL, out of its shared-memory
  segment (which the run API reuses once the next piece is asked for).

Failures cross as exceptions: `call` raises what the coroutine raised; the pipe ends early and
keeps its error for the reader's owner (gateway/flight/server.py) to raise as a status.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading

import pyarrow as pa
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
    """Bytes from the loop to one gRPC thread; `read` is a file's read().

    The loop lends views of a piece (`feed`) and waits until the reader has taken them all
    (`drained`) before it asks the run API for the next piece, which reuses the segment. The
    reader copies what it takes, once, into memory of its own (pyarrow's pool, without the
    GIL): that memory is what pyarrow decodes and gRPC sends, after the segment is reused.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, context, send_timeout: float):
        self._loop = loop
        self._context = context
        self._send_timeout = send_timeout
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._lent = 0  # bytes fed and not yet copied
        self._done = False
        self.error: BaseException | None = None
        self.bytes = 0
        self._cond = threading.Condition()
        self._taken = asyncio.Event()  # loop side; created on the gRPC thread, used on the loop
        self.future: concurrent.futures.Future | None = None
        self.closed = False  # pyarrow's file interface

    # --- the loop's side ---

    def feed(self, view) -> None:
        with self._cond:
            self._chunks.append(memoryview(view))
            self._lent += len(view)
            self._cond.notify()

    async def drained(self) -> None:
        """Until the reader has copied every view fed; TIMEOUT if it takes nothing for
        send_timeout seconds."""
        while True:
            with self._cond:
                if not self._lent:
                    return
                self._taken.clear()
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._taken.wait()
            except TimeoutError:
                raise QueryError(Kind.TIMEOUT, f"the client took no bytes for "
                                               f"{self._send_timeout:g} s (results.send_timeout_s)"
                                 ) from None

    def withdraw(self) -> None:
        """Views not yet taken are dropped, before their segments go back to the pool (the
        lock waits for a copy under way)."""
        with self._cond:
            self._chunks.clear()
            self._lent = 0

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

    def ended(self, timeout: float) -> bool:
        """Whether the loop's side ended (its facts noted, its error kept) within timeout s:
        the reader sees the stream's last bytes before the run API's end."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done, timeout)

    def adopt(self, context) -> None:
        """Another call reads the stream from now on: its cancellation ends the query."""
        self._context = context

    def read(self, size: int):
        """Up to size bytes, copied out of the lent views; b"" at the end. The copy is made
        under the lock, so `withdraw` cannot give a segment back while it is read."""
        out, got = None, 0
        with self._cond:
            while got < size:
                if not self._chunks:
                    if self._done:
                        break  # a short read only at the end: pyarrow takes it as the end
                    if self._context is not None and self._context.is_cancelled():
                        self.cancel()
                        raise fl.FlightCancelledError("the call was cancelled")
                    if got:  # all lent is taken: the loop may lend the next piece
                        self._loop.call_soon_threadsafe(self._taken.set)
                    self._cond.wait(POLL_S)
                    continue
                if out is None:
                    out = pa.allocate_buffer(size)
                    writer = pa.FixedSizeBufferWriter(out)
                head = self._chunks[0]
                take = min(len(head), size - got)
                writer.write(head[:take])  # a memcpy without the GIL
                if take == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[take:]
                self._lent -= take
                got += take
            if got:
                self._loop.call_soon_threadsafe(self._taken.set)
        self.bytes += got
        if out is None:
            return b""
        return out if got == size else out.slice(0, got)

    def close(self) -> None:
        self.closed = True
