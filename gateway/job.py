"""One query on one worker (a Job): the segments lent for it, its result as it comes, its deadline.

Runs on the gateway's event loop only; created by Fleet.submit (gateway/fleet.py), read by the
run API (gateway/run.py), fed by the link's reader.

The worker writes the result into segments lent by the pool: a full one comes back as a Chunk
for the caller to send, and the job grants a spare so the worker never waits for the client, as
long as the client's unsent chunks stay under stream_buffer_mb and the pool's budget has room.
Past stream_buffer_mb the next pieces go to the job's spill file (gateway/spill.py) while the
spill budget has room, so a slow client holds disk, not its worker; with no room, the worker
waits (back-pressure). The worker is free again the moment its final reply arrives, before the
client has all the bytes. Segments go back to the pool once sent or spilled, or at once if the
caller has gone.

Deadline: at query_timeout_s (or the request's lower timeout) the job sends Cancel, which
interrupts DuckDB; if the worker has not answered after cancel_grace_s the caller gets its
TIMEOUT anyway, and the worker stays busy until it replies or dies.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from engine import log as log_mod, protocol
from engine.errors import Kind, QueryError
from gateway.segments import Segment
from gateway.spill import Piece, Spill

if TYPE_CHECKING:
    from gateway.fleet import Fleet, WorkerLink

log = log_mod.get()
CANCEL_REPEAT_S = 0.5


class Job:
    """One query on one worker, and every segment lent for it."""

    def __init__(self, fleet: Fleet, link: WorkerLink, query_id: int, timeout: float,
                 wait_ms: float):
        self.fleet = fleet
        self.link = link
        self.id = query_id
        self.timeout = timeout
        self.wait_ms = wait_ms
        self.lent: dict[str, Segment] = {}   # held by the worker
        self.items: asyncio.Queue = asyncio.Queue()  # for the caller: chunks, then the end
        self.unsent = 0                      # chunks handed to the caller, not yet sent
        self.spill: Spill | None = None      # where pieces past stream_buffer wait, if any
        self.copying = 0                     # segments being copied into the spill file
        self.finished = False                # the worker has sent its final reply, or died
        self.closed = False                  # the caller is done with this job
        self.lost = False                    # the worker died before its final reply
        self.result: protocol.Result | None = None  # the final reply, once it came
        self.progress: protocol.Progress | None = None  # the worker's latest report
        self._granting = False
        self._timer = asyncio.get_running_loop().call_later(timeout, self._expire)

    def start(self, query: protocol.Query, segment: Segment) -> None:
        self.lent[segment.name] = segment
        self.link.send(query)
        self._grant()

    # --- the caller's side ---

    async def next(self) -> tuple[Segment | Piece, int, protocol.Result | None]:
        """(segment, length, None) for a chunk; (segment, length, Result) for the last piece;
        a spilled Piece instead of a segment for pieces the client was too slow to take."""
        item = await self.items.get()
        if isinstance(item, QueryError):
            raise item
        return item

    def sent(self, segment: Segment | Piece, kept: bool = False) -> None:
        """The caller is done with a segment: back to the pool, or kept (by the cache)."""
        if isinstance(segment, Piece):
            self._grant()
            return
        if kept:
            self.fleet.segments.detach(segment)
        else:
            self.fleet.segments.release(segment)
        self.unsent -= 1
        self._grant()

    def close(self) -> None:
        """The caller is done: free what it did not send, stop the worker if it still runs."""
        self.closed = True
        while not self.items.empty():
            item = self.items.get_nowait()
            if isinstance(item, tuple) and isinstance(item[0], Segment):
                self.fleet.segments.release(item[0])
        if self.spill is not None:
            self.spill.close()
        if not self.finished:
            self._cancel()

    def interrupt(self, error: QueryError) -> None:
        """Stop the query now (an operator cancelled it): the caller's next read raises error."""
        if not self.finished and not self.closed:
            self.items.put_nowait(error)
            self._cancel()

    def _cancel(self) -> None:
        """Cancel, again every CANCEL_REPEAT_S until the worker answers: DuckDB forgets an
        interrupt that lands between two of its calls (while binding, before executing)."""
        if not self.finished:
            self.link.send(protocol.Cancel(self.id))
            asyncio.get_running_loop().call_later(CANCEL_REPEAT_S, self._cancel)

    # --- the worker's side (called by the link's reader) ---

    def on_chunk(self, message: protocol.Chunk) -> None:
        segment = self.lent.pop(message.segment)
        if self.closed:
            self.fleet.segments.release(segment)
        else:
            self._hand_over(segment, message.length, None)
        self._grant()

    def on_final(self, message: protocol.Result | protocol.Failure) -> None:
        self._finish()
        if isinstance(message, protocol.Result):
            self.result = message
            segment = self.lent.pop(message.segment)
            self._reclaim()
            if self.closed:
                self.fleet.segments.release(segment)
            else:
                self._hand_over(segment, message.length, message)
            return
        self._reclaim()
        if message.kind == Kind.TIMEOUT:
            self.items.put_nowait(self._timeout_error())
        else:
            self.items.put_nowait(QueryError(message.kind, message.message))

    def _hand_over(self, segment: Segment, length: int, result: protocol.Result | None) -> None:
        """To the caller: in memory while its unsent chunks stay under stream_buffer, else
        copied to the spill file if the spill budget has room (the segment is freed then)."""
        spills = self.fleet.spills
        if (self.unsent * self.fleet.segments.chunk_bytes >= self.fleet.stream_buffer
                and spills is not None and spills.has_room(length)):
            if self.spill is None:
                self.spill = spills.open()
            self.copying += 1
            self.items.put_nowait((self.spill.append(segment, length, self._copied), length, result))
        else:
            self.unsent += 1
            self.items.put_nowait((segment, length, result))

    def _copied(self, segment: Segment) -> None:
        self.copying -= 1
        self.fleet.segments.release(segment)
        self._grant()

    def on_lost(self) -> None:
        self.lost = True
        self._finish()
        self._reclaim()
        self.items.put_nowait(QueryError(
            Kind.WORKER_LOST, f"worker {self.link.worker_id} died while running the query; retry"))

    def _finish(self) -> None:
        self.finished = True
        self._timer.cancel()

    def _reclaim(self) -> None:
        """After the final reply the worker holds nothing: take back unused grants."""
        for segment in self.lent.values():
            self.fleet.segments.release(segment)
        self.lent.clear()

    # --- deadline ---

    def _expire(self) -> None:
        if self.finished:
            return
        self.fleet.timeouts += 1
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(self.fleet.cancel_grace, self._give_up)

    def _give_up(self) -> None:
        if not self.finished:
            log.warning("worker_ignores_cancel", worker=self.link.worker_id, query_id=self.id)
            self.items.put_nowait(self._timeout_error())

    def _timeout_error(self) -> QueryError:
        return QueryError(Kind.TIMEOUT, f"query ran past its {self.timeout:g} s deadline and "
                                        "was interrupted")

    # --- grants: keep one spare segment with the worker while there is room ---

    def _wants_segment(self) -> bool:
        chunk, spills = self.fleet.segments.chunk_bytes, self.fleet.spills
        buffered = (self.unsent + len(self.lent) + self.copying) * chunk
        room = buffered < self.fleet.stream_buffer or (
            spills is not None and spills.has_room((len(self.lent) + 1) * chunk))
        return (not self.finished and not self.closed and not self._granting
                and len(self.lent) < 2 and room)

    def _grant(self) -> None:
        if not self._wants_segment():
            return
        segment = self.fleet.segments.try_acquire()
        if segment is not None:
            self._give_segment(segment)
        else:
            self._granting = True
            task = asyncio.ensure_future(self._grant_later())
            self.fleet.tasks.add(task)
            task.add_done_callback(self.fleet.tasks.discard)

    async def _grant_later(self) -> None:
        try:
            segment = await self.fleet.segments.acquire()
        finally:
            self._granting = False
        if self.finished or self.closed:
            self.fleet.segments.release(segment)
        else:
            self._give_segment(segment)

    def _give_segment(self, segment: Segment) -> None:
        self.lent[segment.name] = segment
        self.link.send(protocol.Grant(self.id, segment.name))
        self._grant()
