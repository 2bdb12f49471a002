"""The gateway's view of the workers: links, the admission queue, and the start of each Job.

Runs on the gateway's event loop only; nothing here blocks. A Job (gateway/job.py) follows one
query on its worker; the run API (gateway/run.py) is the only caller of `submit`.

Admission: a request takes an idle worker or waits in a bounded queue (max_queue_size) for at
most queue_timeout_s; either limit gives OVERLOADED. Waiters (gateway/waiters.py) are served by
key = arrival time + rank x priority_aging_s (high 0, normal 1, low 2): higher priorities go
first, and a waiter of lower priority goes first once it has waited that much longer, so none
starves. The worker is back in the idle set the moment its final reply arrives.

How a worker ended: the supervisor writes `exited <pid> <code>` for each worker to a pipe the
gateway reads (gateway/app.py); `cause_of_death` waits briefly for that line, so that a query
whose worker died of a fault signal is quarantined (gateway/quarantine.py) instead of retried.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import signal
import time

import psutil

from engine import log as log_mod, protocol
from engine.config import PRIORITIES
from engine.errors import Kind, QueryError
from engine.process import FAULT_SIGNALS
from gateway.job import Job
from gateway.quarantine import Quarantine
from gateway.segments import SegmentPool
from gateway.spill import Spills
from gateway.waiters import Waiters

log = log_mod.get()

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
        self._waiters: Waiters[WorkerLink] = Waiters(self._give)
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
                if isinstance(message, protocol.Progress):
                    job.progress = message
                elif isinstance(message, protocol.Chunk):
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
        return self._waiters.count(priority)

    # --- admission ---

    def _give(self, link: WorkerLink) -> None:
        link.busy = False
        if not link.alive:
            return
        if link.retiring:
            link.writer.close()
            return
        if self._waiters.hand(link):
            link.busy = True
        else:
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
        key = time.monotonic() + PRIORITIES.index(priority) * self.aging
        try:
            return await self._waiters.wait(key, priority, self.queue_timeout)
        except TimeoutError:
            self.rejected["queue_timeout"] += 1
            raise QueryError(Kind.OVERLOADED, f"no worker became free within queue_timeout_s "
                                              f"= {self.queue_timeout:g}") from None

    async def submit(self, sql: str, fmt: str, params: list | None, timeout_s: float | None,
                     priority: str, databases: list[str] | None = None, catalog: int = 0,
                     evolved: list[str] | None = None, fills: dict | None = None) -> Job:
        """Admit, take a worker and a segment, send the query; the caller reads the Job.

        `databases`: the token's scope, enforced by the worker (None: the whole catalog);
        `catalog`, `evolved`, `fills`: the table set the query was planned against, and the
        values of its markers (Query says more).
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
                                 databases, catalog, evolved, fills), segment)
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
                "queued_by_priority": {p: self.queued(p) for p in PRIORITIES},
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
