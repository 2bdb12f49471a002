"""The run API: one query's life, from a caller's Ask to its last byte, in one place.

Every front end (HTTP in gateway/handlers.py and render.py, Flight SQL) runs a query so:

    async with runner.run(ask) as result:      # raises QueryError before any byte
        async for piece in result:             # the result's bytes, in order
            async for buf in piece.buffers():  # valid until the next iteration
                ...

`run` plans the query against the file index (gateway/catalog.py), refuses a quarantined one,
answers from the cache or joins the same query already running (QueryCache.single_flight),
otherwise takes a worker (gateway/fleet.py) and reads its Job (gateway/job.py). It returns once
the first piece is there, so every error that comes before the first byte is raised by `run`
itself; a worker lost before that point is retried once elsewhere (every query is a read),
and a file of the plan that vanished (compaction) makes it plan again. A large result (more
than one piece) takes one of its client's stream slots (gateway/streams.py).

Each piece goes back to the pool, or into the cache when the cache keeps the result (the
cache's tee, `LiveResult.keep`), once the caller asks for the next one; leaving the block,
normally, by an exception or by cancellation, gives back everything and interrupts the query
in its worker if it still runs. Every run is listed (gateway/running.py) while it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from engine import log as log_mod
from engine.errors import Kind, QueryError
from engine.tokens import Token
from gateway.cache import BYPASS, RETRY
from gateway.catalog import Catalog, Plan
from gateway.fleet import Fleet
from gateway.job import Job
from gateway.running import Activity, Running
from gateway.segments import Segment
from gateway.spill import Piece as Spilled
from gateway.streams import StreamSlots

log = log_mod.get()
SLICE = 4 * 1024 * 1024  # the most a buffer holds: spilled pieces are read back this much at a time


@dataclass
class Ask:
    """One query as a caller asks it."""
    sql: str
    fmt: str = "json"
    params: list | None = None
    timeout_s: float | None = None  # capped by queue.query_timeout_s
    priority: str = "normal"
    use_cache: bool = True  # False: neither answered from nor stored in the cache
    token: Token | None = None  # its databases are the query's scope
    request_id: str = ""
    route: str = "http"
    client: str = ""  # whom per-client limits count (gateway/access.py client_key)

    @property
    def databases(self) -> list[str] | None:
        return self.token.databases if self.token is not None else None


class Piece:
    """`length` bytes of a result: a view of memory (a segment, a cached body), or `spilled`
    to disk. `fd` is set for a cached segment, which HTTP may send with sendfile."""

    __slots__ = ("length", "view", "spilled", "segment", "fd")

    def __init__(self, length: int, view: memoryview | bytes | None = None,
                 spilled: Spilled | None = None, segment: Segment | None = None,
                 fd: int | None = None):
        self.length = length
        self.view = view
        self.spilled = spilled
        self.segment = segment
        self.fd = fd

    async def buffers(self, size: int = SLICE):
        if self.spilled is None:
            for offset in range(0, self.length, size):
                yield self.view[offset:offset + size]
            return
        try:
            await asyncio.shield(self.spilled.copied)  # cancelling must not free it mid-copy
            for offset in range(0, self.length, size):
                yield await self.spilled.read(offset, min(size, self.length - offset))
        except OSError as exc:  # the disk's
            raise QueryError(Kind.INTERNAL, f"the spilled result could not be written or read "
                                            f"back: {exc}") from None


class Result:
    """A query's answer: pieces in order; rows and execution_ms once the last has come."""

    def __init__(self, activity: Activity, plan: Plan, cache: str | None, wait_ms: float):
        self.activity = activity
        self.cache = cache  # hit, miss, coalesced or bypass; None with the cache off
        self.wait_ms = wait_ms
        self.files_scanned, self.files_pruned = plan.files_scanned, plan.files_pruned
        self.rows: int | None = None
        self.execution_ms: float | None = None
        self.whole = False  # the first piece is all of it: its length is known up front
        self.length: int | None = None

    def __aiter__(self):
        return self


class CachedResult(Result):
    """A cache entry (pinned for this caller until close)."""

    def __init__(self, entry, activity: Activity, plan: Plan, state: str):
        super().__init__(activity, plan, state, 0.0)
        self.entry = entry
        self.age_s = int(time.monotonic() - entry.created)
        self.rows, self.execution_ms = entry.rows, entry.execution_ms
        self.whole, self.length = True, entry.length
        self._pieces = iter([Piece(len(entry.body), entry.body)] if entry.body is not None else
                            [Piece(n, segment.view[:n], segment=segment, fd=segment.fd)
                             for segment, n in entry.segments])

    async def __anext__(self) -> Piece:
        self.activity.check()
        piece = next(self._pieces, None)
        if piece is None:
            raise StopAsyncIteration
        self.activity.sent_bytes += piece.length
        self.activity.state = "sending"
        return piece

    def close(self) -> None:
        self.entry.unpin()


class LiveResult(Result):
    """A Job's result as the worker writes it. A piece handed to the caller goes back to the
    pool (or to the cache's keeper) when the caller asks for the next one, or at close."""

    def __init__(self, job: Job, activity: Activity, plan: Plan):
        super().__init__(activity, plan, None, job.wait_ms)
        self.job = job
        self.keeper = None  # the cache's, when this result is kept as it passes
        self.entry = None   # a whole result stored at once: served from the cache's entry
        self.error: QueryError | None = None
        self.complete = False
        self._next: Piece | None = None  # taken from the job, not yet handed to the caller
        self._held: Piece | None = None  # handed to the caller, not yet given back
        self._final = False

    async def start(self) -> None:
        """Wait for the first piece: errors before the first byte are raised here."""
        self._next = await self._take()
        self.whole = self._final
        self.length = self._next.length if self.whole else None

    async def _take(self) -> Piece:
        try:
            item, length, final = await self.job.next()
        except QueryError as exc:
            self.error = exc
            raise
        if final is not None:
            self._final = True
            self.rows, self.execution_ms = final.rows, final.execution_ms
            self.activity.rows = final.rows
        if isinstance(item, Spilled):
            return Piece(length, spilled=item)
        return Piece(length, item.view[:length], segment=item)

    async def __anext__(self) -> Piece:
        if self._held is not None:
            self.activity.sent_bytes += self._held.length
            self._release(self._held, sent=True)
            self._held = None
        self.activity.check()
        if self._next is not None:
            piece, self._next = self._next, None
        elif self._final:
            self.complete = True
            if self.keeper is not None and self.entry is None:
                self.entry = self.keeper.finish(self.rows, self.execution_ms)
            raise StopAsyncIteration
        else:
            piece = await self._take()
        self._held = piece
        self.activity.state = "sending"
        return piece

    def keep(self, keeper) -> None:
        """The cache's tee: keep the pieces as they pass. A whole result is stored at once (its
        waiters need not wait for this caller's client) and served from the entry."""
        self.keeper = keeper
        piece = self._next
        if not self.whole or piece.spilled is not None:
            return
        self.entry = keeper.store_whole(piece.segment, piece.length, self.rows, self.execution_ms)
        if self.entry is not None:
            self.job.sent(piece.segment, kept=self.entry.body is None)
            self._next = (Piece(piece.length, self.entry.body) if self.entry.body is not None
                          else Piece(piece.length, piece.view, segment=piece.segment,
                                     fd=piece.segment.fd))

    def _release(self, piece: Piece, sent: bool) -> None:
        """Give a piece back: into the cache's keeper if it was sent and the cache keeps this
        result, else to the pool. A piece of the entry stays the entry's (unpinned at close)."""
        if piece.fd is not None or (piece.segment is None and piece.spilled is None):
            return
        if piece.spilled is not None:
            if self.keeper is not None:
                self.keeper.give_up()  # spilled: too large for the cache anyway
            self.job.sent(piece.spilled)
            return
        kept = sent and self.keeper is not None and self.keeper.keep(piece.segment, piece.length)
        self.job.sent(piece.segment, kept=kept)

    def close(self) -> None:
        for piece in (self._held, self._next):
            if piece is not None:
                self._release(piece, sent=False)
        self._held = self._next = None
        self.job.close()
        if self.keeper is not None:
            self.keeper.close(self.error if self.error is not None
                              else BYPASS if self.complete else RETRY)
        if self.entry is not None:
            self.entry.unpin()


class Runner:
    """Runs asks: the one place a query's life is decided (see the module docstring)."""

    def __init__(self, fleet: Fleet, catalog: Catalog, cache=None,
                 streams: StreamSlots | None = None):
        self.fleet = fleet
        self.catalog = catalog
        self.cache = cache
        self.streams = streams or StreamSlots(0)
        self.running = Running()

    def stats(self) -> dict:
        return {**self.streams.stats(), "queries_running": len(self.running),
                "queries_cancelled": self.running.cancelled,
                "plan_templates_built": self.catalog.templates_built}

    @contextlib.asynccontextmanager
    async def run(self, ask: Ask):
        activity = self.running.add(ask)
        result: Result | None = None
        try:
            with activity.cancellable():
                result = await self._start(ask, activity)
            # a large result (more than one piece) takes one of its client's stream slots
            with contextlib.nullcontext() if result.whole else self.streams.hold(ask.client):
                yield result
        finally:
            if result is not None:
                result.close()
                if isinstance(result, LiveResult) and result.job.lost:
                    self._contain_later(ask, result.job)  # cut mid-stream: keep it out anyway
            self.running.remove(activity)

    async def _start(self, ask: Ask, activity: Activity) -> Result:
        plan = await self.catalog.plan(ask.sql, ask.databases)
        if (refused := self.fleet.quarantine.check(ask.sql, ask.params)) is not None:
            raise refused
        cache = self.cache
        key = cache.key(plan.analysis if ask.use_cache else None, ask.fmt, ask.params,
                        ask.databases) if cache is not None else None
        state = "bypass" if cache is not None else None

        async def execute() -> LiveResult:
            return await self._execute(ask, activity, plan)

        if key is None:
            result = await execute()
            result.cache = state
            return result
        return await cache.single_flight(key, execute, self._flight_deadline(ask),
                                         lambda entry, how: CachedResult(entry, activity, plan, how))

    def _flight_deadline(self, ask: Ask) -> float:
        fleet = self.fleet
        return min(ask.timeout_s or fleet.query_timeout, fleet.query_timeout) + fleet.cancel_grace

    async def _execute(self, ask: Ask, activity: Activity, plan: Plan) -> LiveResult:
        """On a worker: retried once if the worker is lost, re-planned if a file vanished."""
        lost = 0
        for attempt in (1, 2, 3):
            if not self.catalog.current(plan):  # files changed since it was planned
                plan = await self.catalog.plan(ask.sql, ask.databases)
            job = await self.fleet.submit(plan.sql, ask.fmt, ask.params, ask.timeout_s,
                                          ask.priority, ask.databases, plan.catalog, plan.evolved,
                                          plan.fills)
            activity.job, activity.state = job, "running"
            result = LiveResult(job, activity, plan)
            try:
                await result.start()
                return result
            except BaseException as exc:
                result.close()
                activity.job, activity.state = None, "waiting"
                if not isinstance(exc, QueryError):
                    raise
                if exc.kind == Kind.SQL_ERROR:
                    exc.message = self.catalog.explain(plan, exc.message)
                if exc.kind == Kind.FILE_MISSING and attempt < 3:
                    log.info("query_replanned", request_id=ask.request_id, error=exc.message)
                    plan = await self.catalog.plan(ask.sql, ask.databases)
                    continue
                if exc.kind != Kind.WORKER_LOST:
                    raise
                # Unless the worker died of a fault of its own: then the query killed it, and
                # would kill the next one too.
                if (refusal := await self._contain(ask, job)) is not None:
                    raise refusal from None
                lost += 1
                if lost == 2:
                    raise
                self.fleet.retried += 1
                log.warning("query_retried", request_id=ask.request_id, error=exc.message)
        raise AssertionError("unreachable")

    async def _contain(self, ask: Ask, job: Job) -> QueryError | None:
        """If the job's worker died of a fault of its own, quarantine the query; the error.
        Shielded: the caller may be gone, and the query must be kept out anyway."""
        return await asyncio.shield(self._contain_later(ask, job))

    def _contain_later(self, ask: Ask, job: Job) -> asyncio.Task:
        async def contain() -> QueryError | None:
            fault = await self.fleet.cause_of_death(job.link.pid)
            if fault is None:
                return None
            log.warning("query_killed_worker", request_id=ask.request_id,
                        worker=job.link.worker_id, signal=fault, sql=ask.sql[:2000])
            return self.fleet.quarantine.add(ask.sql, ask.params, fault)
        task = asyncio.ensure_future(contain())
        self.fleet.tasks.add(task)
        task.add_done_callback(self.fleet.tasks.discard)
        return task
