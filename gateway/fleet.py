"""The gateway's view of the workers: one link per connected worker, and dispatch.

Runs on the gateway's event loop only; nothing here blocks. Workers connect to the gateway's
worker socket and say Hello; each becomes a WorkerLink, idle until a request takes it.
`Fleet.run` waits (bounded by max_queue_size and queue_timeout_s) for an idle worker, lends it
a shared-memory segment, sends the query and awaits the reply.

Ownership rule: a segment lent to a worker comes back to the pool only after the worker has
replied or died, never while it might still write into it. A timed-out query is interrupted
(Cancel); if the worker does not answer within the grace period, the client gets its 504 and
the worker and segment are returned when the late reply comes (or the worker dies).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time

import psutil

from engine import log as log_mod, protocol
from engine.errors import Kind, QueryError
from engine.shm import Segment, SegmentPool

log = log_mod.get()

CANCEL_GRACE_S = 5.0


class WorkerLost(Exception):
    pass


class WorkerLink:
    """One connected worker. `busy` while it holds a query (or a late one after a timeout)."""

    def __init__(self, hello: protocol.Hello, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.worker_id = hello.worker_id
        self.pid = hello.pid
        self.memory_limit = hello.memory_limit
        self.settings = hello.settings
        self.reader = reader
        self.writer = writer
        self.served = 0
        self.busy = False
        self.alive = True
        self._reply: asyncio.Future | None = None
        self._on_late_reply = None  # called once the reply to an abandoned query arrives

    @property
    def state(self) -> str:
        return "busy" if self.busy else "idle"

    def rss(self) -> int | None:
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None

    async def execute(self, query: protocol.Query, timeout: float) -> protocol.Result | protocol.Failure:
        """The worker's reply. Raises WorkerLost, or TimeoutError when it ignores a Cancel."""
        if not self.alive:
            raise WorkerLost(f"worker {self.worker_id} is gone")
        self._reply = asyncio.get_running_loop().create_future()
        protocol.write(self.writer, query)
        try:
            return await asyncio.wait_for(asyncio.shield(self._reply), timeout)
        except TimeoutError:
            if self.alive:
                protocol.write(self.writer, protocol.Cancel(query.id))
            return await asyncio.wait_for(asyncio.shield(self._reply), CANCEL_GRACE_S)

    def abandon(self, on_late_reply) -> None:
        """The current query's caller gave up; run on_late_reply() when the worker is done."""
        if self._reply is not None and not self._reply.done():
            self._on_late_reply = on_late_reply
        else:
            on_late_reply()

    async def read_loop(self, on_gone) -> None:
        try:
            while (message := await protocol.read(self.reader)) is not None:
                if isinstance(message, (protocol.Result, protocol.Failure)):
                    self._resolve(message)
        except (OSError, protocol.ProtocolError) as exc:
            log.warning("worker_link_failed", worker=self.worker_id, error=str(exc))
        finally:
            self.alive = False
            if self._reply is not None and not self._reply.done():
                self._reply.set_exception(WorkerLost(f"worker {self.worker_id} (pid {self.pid}) died"))
                self._reply.exception()  # mark retrieved: an abandoned query has no awaiter
            self._finish_late()
            self.writer.close()
            on_gone(self)

    def _resolve(self, message) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(message)
        self._finish_late()

    def _finish_late(self) -> None:
        if self._on_late_reply is not None:
            callback, self._on_late_reply = self._on_late_reply, None
            callback()


class Fleet:
    def __init__(self, segments: SegmentPool, max_queue: int, queue_timeout: float,
                 query_timeout: float, max_result_bytes: int, batch_rows: int):
        self.segments = segments
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.query_timeout = query_timeout
        self.max_result_bytes = max_result_bytes
        self.batch_rows = batch_rows
        self.links: dict[int, WorkerLink] = {}
        self._idle: collections.deque[WorkerLink] = collections.deque()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self.served = 0
        self.crashed = 0
        self.timeouts = 0

    # --- membership ---

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Connection handler of the worker socket: Hello, then the link's read loop."""
        try:
            hello = await asyncio.wait_for(protocol.read(reader), 10)
        except (TimeoutError, protocol.ProtocolError, OSError) as exc:
            log.warning("worker_hello_failed", error=str(exc))
            writer.close()
            return
        if not isinstance(hello, protocol.Hello):
            writer.close()
            return
        link = WorkerLink(hello, reader, writer)
        self.links[link.pid] = link
        log.info("worker_joined", worker=link.worker_id, worker_pid=link.pid)
        self._give(link)
        await link.read_loop(self._gone)

    def _gone(self, link: WorkerLink) -> None:
        self.links.pop(link.pid, None)
        if link in self._idle:
            self._idle.remove(link)
        if link.busy:
            self.crashed += 1
        log.info("worker_left", worker=link.worker_id, worker_pid=link.pid, busy=link.busy)

    @property
    def ready(self) -> int:
        return len(self.links)

    @property
    def busy(self) -> int:
        return sum(link.busy for link in self.links.values())

    @property
    def queued(self) -> int:
        return sum(not w.done() for w in self._waiters)

    # --- dispatch ---

    def _give(self, link: WorkerLink) -> None:
        link.busy = False
        if not link.alive:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                link.busy = True
                waiter.set_result(link)
                return
        self._idle.append(link)

    async def _acquire(self) -> WorkerLink:
        while self._idle:
            link = self._idle.popleft()
            if link.alive:
                link.busy = True
                return link
        if self.queued >= self.max_queue:
            raise QueryError(Kind.OVERLOADED,
                             f"the queue is full (max_queue_size = {self.max_queue})")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, self.queue_timeout)
        except TimeoutError:
            raise QueryError(Kind.OVERLOADED, f"no worker became free within queue_timeout_s "
                                              f"= {self.queue_timeout:g}") from None
        except asyncio.CancelledError:
            # The link may have been handed over just as the caller went away: give it back.
            if waiter.done() and not waiter.cancelled():
                self._give(waiter.result())
            raise

    async def run(self, sql: str, fmt: str, params: list | None, timeout_s: float | None,
                  databases: list[str] | None = None) -> tuple[protocol.Result, Segment, float]:
        """Run one query; returns (reply, segment holding the result, wait ms).

        The caller sends the segment's bytes, then gives it back with segments.release().
        """
        started = time.perf_counter()
        link = await self._acquire()
        wait_ms = (time.perf_counter() - started) * 1000
        segment = self.segments.acquire()
        query = protocol.Query(next(self._ids), sql, fmt, segment.name, params,
                               self.max_result_bytes, self.batch_rows, databases)
        timeout = min(timeout_s, self.query_timeout) if timeout_s else self.query_timeout
        released = False
        try:
            reply = await link.execute(query, timeout)
            link.served += 1
            self.served += 1
        except WorkerLost:
            self.segments.release(segment)
            raise QueryError(Kind.WORKER_LOST,
                             f"worker {link.worker_id} died while running the query; retry") from None
        except (TimeoutError, asyncio.CancelledError) as exc:
            # The worker may still write into the segment: both return when it is done.
            released = True
            link.abandon(lambda: (self.segments.release(segment), self._give(link)))
            if isinstance(exc, TimeoutError):
                self.timeouts += 1
                raise QueryError(Kind.TIMEOUT, f"query ran past its {timeout:g} s deadline") from None
            raise
        finally:
            if not released:
                self._give(link)
        if isinstance(reply, protocol.Failure):
            self.segments.release(segment)
            if reply.kind == Kind.TIMEOUT:
                self.timeouts += 1
                raise QueryError(Kind.TIMEOUT, f"query ran past its {timeout:g} s deadline and was interrupted")
            raise QueryError(Kind(reply.kind), reply.message)
        return reply, segment, wait_ms

    def stats(self) -> dict:
        workers = [{"id": link.worker_id, "pid": link.pid, "state": link.state,
                    "served": link.served, "rss_bytes": link.rss(),
                    "memory_limit": link.memory_limit}
                   for link in sorted(self.links.values(), key=lambda l: l.worker_id)]
        return {"worker_count": len(workers), "busy": self.busy, "idle": len(workers) - self.busy,
                "queued": self.queued, "served": self.served, "recycled": 0,
                "crashed": self.crashed, "timeouts": self.timeouts,
                "shm_segments_in_use": self.segments.in_use, "shm_segments_idle": self.segments.idle,
                "workers": workers}

    def close(self) -> None:
        for link in list(self.links.values()):
            link.writer.close()
        self.segments.close()
