"""The gateway's view of the workers: links, the admission queue, and one Job per query.

Runs on the gateway's event loop only; nothing here blocks.

Admission: a request takes an idle worker or waits in a bounded queue (max_queue_size) for at
most queue_timeout_s; either limit gives OVERLOADED. Waiters are served by key = arrival time +
rank x priority_aging_s (high 0, normal 1, low 2): higher priorities go first, and a waiter of
lower priority goes first once it has waited that much longer, so none starves.

A Job follows one query from Query to the worker's final reply. The worker writes the result
into segments lent by the pool: a full one comes back as a Chunk for the caller to send, and the
job grants a spare so the worker never waits for the client, as long as the client's unsent
chunks stay under stream_buffer_mb and the pool's budget has room. Past stream_buffer_mb the
next pieces go to the job's spill file (gateway/spill.py) while the spill budget has room, so a
slow client holds disk, not its worker; with no room, the worker waits (back-pressure).
The worker is returned to the idle set the moment its final reply arrives, before the client has
all the bytes. Segments go back to the pool once sent or spilled, or at once if the caller has gone.

Deadline: at query_timeout_s (or the request's lower timeout) the job sends Cancel, which
interrupts DuckDB; if the worker has not answered after cancel_grace_s the caller gets its
TIMEOUT anyway, and the worker stays busy until it replies or dies.

How a worker ended: the supervisor writes `exited <pid> <code>` for each worker to a pipe the
gateway reads (gateway/app.py); `cause_of_death` waits briefly for that line, so that a query
whose worker died of a fault signal is quarantined (gateway/quarantine.py) instead of retried.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import signal
import time

import psutil

from engine import log as log_mod, protocol
from engine.errors import Kind, QueryError
from engine.process import FAULT_SIGNALS
from engine.shm import Segment, SegmentPool
from gateway.quarantine import Quarantine
from gateway.spill import Piece, Spill, Spills

log = log_mod.get()

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
CANCEL_REPEAT_S = 0.5
OVER_MEMORY = "out_of_memory"  # a worker's Bye reason before it fails its query and exits
EXIT_NOTICE_S = 2.0  # how long a lost query waits to learn how its worker ended
KEPT_EXITS = 256


class WorkerLink:
    """One connected worker; `job` is the query it is running, if any."""

    def __init__(self, hello: protocol.Hello, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.worker_id = hello.worker_id
        self.pid = hello.pid
        self.memory_limit = hello.memory_limit
        self.settings = hello.settings
        self.reader = reader
        self.writer = writer
        self.served = 0
        self.alive = True
        self.job: Job | None = None
        self.busy = False
        self.retiring: str | None = None  # said Bye: gets no more queries
        self.status: protocol.Status | None = None

    @property
    def state(self) -> str:
        return "retiring" if self.retiring else "busy" if self.busy else "idle"

    def send(self, message: protocol.Message) -> None:
        if self.alive:
            protocol.write(self.writer, message)

    def rss(self) -> int | None:
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None


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
        self.timed_out = False
        self.lost = False                    # the worker died before its final reply
        self.result: protocol.Result | None = None  # the final reply, once it came
        self.send_ms = 0.0  # time the caller spent sending, for the access log
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
            self.items.put_nowait(QueryError(Kind(message.kind), message.message))

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
        self.timed_out = True
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


class Fleet:
    def __init__(self, segments: SegmentPool, *, max_queue: int, queue_timeout: float,
                 query_timeout: float, cancel_grace: float, aging: float,
                 max_result_bytes: int, batch_rows: int, stream_buffer: int,
                 spills: Spills | None = None, quarantine_s: float = 0.0):
        self.segments = segments
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.query_timeout = query_timeout
        self.cancel_grace = cancel_grace
        self.aging = aging
        self.max_result_bytes = max_result_bytes
        self.batch_rows = batch_rows
        self.stream_buffer = stream_buffer
        self.spills = spills
        self.links: dict[int, WorkerLink] = {}
        self._idle: collections.deque[WorkerLink] = collections.deque()
        self._waiters: list[tuple[float, int, asyncio.Future, str]] = []  # a heap
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self.tasks: set[asyncio.Task] = set()
        self.served = 0
        self.crashed = 0
        self.timeouts = 0
        self.retried = 0
        self.memory_kills = 0  # workers stopped by their RSS cap (they said Bye "out_of_memory")
        self.rejected = {"queue_full": 0, "queue_timeout": 0}
        self.recycled: dict[str, int] = {}
        self.quarantine = Quarantine(quarantine_s)
        self._exits: collections.OrderedDict[int, int] = collections.OrderedDict()  # pid -> code
        self._exit_waiters: dict[int, asyncio.Future] = {}

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
        link.send(protocol.Welcome())
        await self._read_loop(link)

    async def _read_loop(self, link: WorkerLink) -> None:
        try:
            while (message := await protocol.read(link.reader)) is not None:
                if isinstance(message, protocol.Status):
                    link.status = message
                    continue
                if isinstance(message, protocol.Bye):
                    self._retire(link, message.reason)
                    continue
                job = link.job
                if job is None or getattr(message, "id", None) != job.id:
                    continue
                if isinstance(message, protocol.Chunk):
                    job.on_chunk(message)
                elif isinstance(message, (protocol.Result, protocol.Failure)):
                    link.job = None
                    link.served += 1
                    self.served += 1
                    job.on_final(message)
                    self._give(link)
        except (OSError, protocol.ProtocolError) as exc:
            log.warning("worker_link_failed", worker=link.worker_id, error=str(exc))
        finally:
            link.alive = False
            link.writer.close()
            self.links.pop(link.pid, None)
            if link in self._idle:
                self._idle.remove(link)
            if link.job is not None:
                self.crashed += 1
                link.job.on_lost()
                link.job = None
            if link.retiring == OVER_MEMORY:
                self.memory_kills += 1
            elif link.retiring:
                self.recycled[link.retiring] = self.recycled.get(link.retiring, 0) + 1
            log.info("worker_left", worker=link.worker_id, worker_pid=link.pid,
                     reason=link.retiring or "lost")

    def _retire(self, link: WorkerLink, reason: str) -> None:
        """The worker said Bye: no more queries; close once it is idle, so it can leave."""
        link.retiring = reason
        if link in self._idle:
            self._idle.remove(link)
            link.writer.close()

    # --- how workers ended (the supervisor's notices) ---

    def on_exit(self, pid: int, code: int) -> None:
        self._exits[pid] = code
        while len(self._exits) > KEPT_EXITS:
            self._exits.popitem(last=False)
        waiter = self._exit_waiters.pop(pid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(code)

    async def cause_of_death(self, pid: int) -> str | None:
        """The fault signal that killed worker `pid` (a crash of its own, so of its query);
        None if it was killed from outside, exited, or the notice did not come in time."""
        code = self._exits.get(pid)
        if code is None:
            waiter = self._exit_waiters.setdefault(pid, asyncio.get_running_loop().create_future())
            try:
                code = await asyncio.wait_for(asyncio.shield(waiter), EXIT_NOTICE_S)
            except TimeoutError:
                log.warning("worker_exit_unknown", worker_pid=pid)
                return None
            finally:
                self._exit_waiters.pop(pid, None)
        if code < 0 and -code in FAULT_SIGNALS:
            return signal.Signals(-code).name
        return None

    @property
    def ready(self) -> int:
        return sum(not link.retiring for link in self.links.values())

    @property
    def busy(self) -> int:
        return sum(link.busy for link in self.links.values() if not link.retiring)

    def queued(self, priority: str | None = None) -> int:
        return sum(not f.done() and priority in (None, p) for _, _, f, p in self._waiters)

    # --- admission ---

    def _give(self, link: WorkerLink) -> None:
        link.busy = False
        if not link.alive:
            return
        if link.retiring:
            link.writer.close()
            return
        while self._waiters:
            _, _, waiter, _ = heapq.heappop(self._waiters)
            if not waiter.done():
                link.busy = True
                waiter.set_result(link)
                return
        self._idle.append(link)

    async def _acquire(self, priority: str) -> WorkerLink:
        while self._idle:
            link = self._idle.popleft()
            if link.alive:
                link.busy = True
                return link
        if self.queued() >= self.max_queue:
            self.rejected["queue_full"] += 1
            raise QueryError(Kind.OVERLOADED,
                             f"the queue is full (max_queue_size = {self.max_queue})")
        waiter = asyncio.get_running_loop().create_future()
        key = time.monotonic() + PRIORITY_RANK[priority] * self.aging
        heapq.heappush(self._waiters, (key, next(self._seq), waiter, priority))
        try:
            return await asyncio.wait_for(waiter, self.queue_timeout)
        except TimeoutError:
            self.rejected["queue_timeout"] += 1
            raise QueryError(Kind.OVERLOADED, f"no worker became free within queue_timeout_s "
                                              f"= {self.queue_timeout:g}") from None
        except asyncio.CancelledError:
            # The link may have been handed over just as the caller went away: give it back.
            if waiter.done() and not waiter.cancelled():
                self._give(waiter.result())
            raise

    async def submit(self, sql: str, fmt: str, params: list | None, timeout_s: float | None,
                     priority: str, databases: list[str] | None = None, catalog: int = 0,
                     evolved: list[str] | None = None) -> Job:
        """Admit, take a worker and a segment, send the query; the caller reads the Job.

        `databases`: the token's scope, enforced by the worker (None: the whole catalog);
        `catalog`, `evolved`: the table set the query was planned against (Query says more).
        """
        started = time.perf_counter()
        while True:
            link = await self._acquire(priority)
            try:
                segment = await self.segments.acquire()
            except BaseException:
                self._give(link)
                raise
            if link.alive:
                break
            # It died after it was handed over (while this waiter woke, or waited for a
            # segment): its read loop has ended and would never fail a job attached now.
            self.segments.release(segment)
        wait_ms = (time.perf_counter() - started) * 1000
        timeout = min(timeout_s, self.query_timeout) if timeout_s else self.query_timeout
        job = Job(self, link, next(self._ids), timeout, wait_ms)
        link.job = job
        job.start(protocol.Query(job.id, sql, fmt, segment.name, self.segments.chunk_bytes,
                                 params, self.max_result_bytes, self.batch_rows, timeout,
                                 databases, catalog, evolved), segment)
        return job

    def stats(self) -> dict:
        workers = [{"id": link.worker_id, "pid": link.pid, "state": link.state,
                    "served": link.served, "rss_bytes": link.rss(),
                    "memory_limit": link.memory_limit,
                    "duckdb_memory_bytes": link.status.duckdb_memory if link.status else None,
                    "connections": link.status.connections if link.status else 1}
                   for link in sorted(self.links.values(), key=lambda l: l.worker_id)]
        pool = self.segments
        return {"worker_count": len(workers), "busy": self.busy, "idle": len(workers) - self.busy,
                "queued": self.queued(),
                "queued_by_priority": {p: self.queued(p) for p in PRIORITY_RANK},
                "served": self.served, "recycled": sum(self.recycled.values()),
                "recycled_by_reason": dict(self.recycled), "crashed": self.crashed,
                "retried": self.retried, "timeouts": self.timeouts,
                "killed_over_memory": self.memory_kills,
                "killed_by_query": self.quarantine.added, "quarantined": len(self.quarantine),
                "rejected": dict(self.rejected),
                "shm_segments_in_use": pool.in_use, "shm_segments_idle": pool.idle,
                "shm_segments_created": pool.created,
                "shm_segments_cached": pool.detached, "shm_segment_bytes": pool.chunk_bytes,
                "shm_waiting": pool.waiting,
                **(self.spills.stats() if self.spills else {}),
                "workers": workers}

    def close(self) -> None:
        for link in list(self.links.values()):
            link.writer.close()
        for task in self.tasks:
            task.cancel()
        self.segments.close()
