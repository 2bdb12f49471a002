"""The run API and the pieces under it, without processes: the fair waiter queue, the segment
pool, the cache's single-flight, and `Runner.run` over a real Fleet, SegmentPool, Catalog and
QueryCache whose workers are fake links (a coroutine that speaks the worker protocol over a
socketpair and writes real shared-memory segments). The end-to-end tests keep real processes."""

import asyncio
import itertools
import os
import socket

import msgspec
import pytest

from engine import config as config_mod, protocol
from engine.errors import Kind, QueryError
from engine.shm import SHM_DIR
from gateway.cache import QueryCache
from gateway.catalog import Catalog
from gateway.fleet import Fleet
from gateway.run import Ask, Runner
from gateway.segments import SegmentPool
from gateway.waiters import Waiters
from harness.server import fleet_segments

CHUNK = 64 * 1024
_pids = itertools.count(4_000_000)  # beyond pid_max: never a real process


def run(coro, timeout: float = 30):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


class FakeWorker:
    """A worker link for unit tests: answers each Query with `behaviour(query)`'s bytes."""

    def __init__(self, fleet: Fleet, worker_id: int, behaviour):
        self.fleet = fleet
        self.worker_id = worker_id
        self.pid = next(_pids)
        self.behaviour = behaviour
        self.queries: list[protocol.Query] = []
        self.cancels: list[int] = []
        self.grants: asyncio.Queue = asyncio.Queue()

    async def start(self) -> "FakeWorker":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        gateway_side = await asyncio.open_unix_connection(sock=theirs)
        self.link_task = asyncio.ensure_future(self.fleet.accept(*gateway_side))
        self.reader, self.writer = await asyncio.open_unix_connection(sock=ours)
        protocol.write(self.writer, protocol.Hello(self.worker_id, self.pid, 2**30))
        assert isinstance(await protocol.read(self.reader), protocol.Welcome)
        self.task = asyncio.ensure_future(self._serve())
        return self

    async def _serve(self) -> None:
        while (message := await protocol.read(self.reader)) is not None:
            if isinstance(message, protocol.Query):
                self.queries.append(message)
                asyncio.ensure_future(self._answer(message))
            elif isinstance(message, protocol.Grant):
                self.grants.put_nowait(message.segment)
            elif isinstance(message, protocol.Cancel):
                self.cancels.append(message.id)

    async def _answer(self, query: protocol.Query) -> None:
        outcome = await self.behaviour(self, query)
        if outcome == "die":
            self.die()
            return
        if isinstance(outcome, protocol.Failure):
            protocol.write(self.writer, outcome)
            return
        segment, data = query.segment, outcome
        while len(data) > CHUNK:
            _write(segment, data[:CHUNK])
            protocol.write(self.writer, protocol.Chunk(query.id, segment, CHUNK))
            data = data[CHUNK:]
            segment = await self.grants.get()
        _write(segment, data)
        protocol.write(self.writer, protocol.Result(query.id, segment, len(data), 1, 0.5))

    def die(self) -> None:
        self.writer.close()
        self.fleet.on_exit(self.pid, -9)  # killed from outside: not the query's fault


def _write(name: str, data: bytes) -> None:
    fd = os.open(SHM_DIR / name, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def answering(data: bytes):
    async def behaviour(worker, query):
        return data
    return behaviour


class Rig:
    """A Runner over a real pool, fleet, catalog (an empty data_dir) and cache, with fakes
    for workers."""

    def __init__(self, tmp_path, cache: bool = False, queue_timeout: float = 5.0):
        self.tmp_path, self.with_cache, self.queue_timeout = tmp_path, cache, queue_timeout

    async def __aenter__(self):
        self.pool = SegmentPool(f"duckfleet.{os.getpid()}.{os.getpid()}.", CHUNK, 16 * CHUNK, 0)
        self.fleet = Fleet(self.pool, max_queue=8, queue_timeout=self.queue_timeout,
                           query_timeout=30, cancel_grace=1, aging=2, max_result_bytes=0,
                           batch_rows=1000, stream_buffer=4 * CHUNK)
        self.catalog = Catalog(msgspec.convert({"data_dir": str(self.tmp_path)},
                                               config_mod.CatalogConfig))
        await self.catalog.start()
        self.cache = (QueryCache(config_mod.QueryCacheConfig(), self.pool)
                      if self.with_cache else None)
        self.runner = Runner(self.fleet, self.catalog, self.cache)
        self.workers: list[FakeWorker] = []
        return self

    async def add(self, behaviour) -> FakeWorker:
        worker = await FakeWorker(self.fleet, len(self.workers), behaviour).start()
        self.workers.append(worker)
        return worker

    async def __aexit__(self, *exc):
        if self.cache is not None:
            self.cache.close()
        for worker in self.workers:
            worker.writer.close()
        self.fleet.close()
        self.catalog.close()
        assert not fleet_segments(os.getpid()), "segments left in /dev/shm"

    async def collect(self, sql: str, **kw) -> tuple[bytes, object]:
        async with self.runner.run(Ask(sql, "arrow", **kw)) as result:
            data = b"".join([bytes(buf) async for piece in result
                             async for buf in piece.buffers()])
        return data, result


# --- the waiter queue and the segment pool ---

def test_waiters_serve_by_key_then_arrival_and_a_cancelled_waiter_gives_back():
    async def main():
        given_back = []
        waiters = Waiters(given_back.append)
        late = asyncio.ensure_future(waiters.wait(key=5.0, label="low"))
        first = asyncio.ensure_future(waiters.wait(key=1.0, label="high"))
        second = asyncio.ensure_future(waiters.wait(key=1.0, label="high"))
        await asyncio.sleep(0)
        assert waiters.count() == 3 and waiters.count("high") == 2
        assert waiters.hand("a") and waiters.hand("b")
        assert [await first, await second] == ["a", "b"]
        assert waiters.hand("c")  # handed to `late` ...
        late.cancel()             # ... which is cancelled before it wakes: it gives it back
        with pytest.raises(asyncio.CancelledError):
            await late
        assert given_back == ["c"] and not waiters and not waiters.hand("d")
        with pytest.raises(TimeoutError):
            await waiters.wait(timeout=0.01)
        assert waiters.count() == 0
    run(main())


def test_segment_pool_waits_in_arrival_order_within_its_budget():
    async def main():
        pool = SegmentPool(f"duckfleet.{os.getpid()}.{os.getpid()}.", CHUNK, 2 * CHUNK, CHUNK)
        a, b = await pool.acquire(), await pool.acquire()
        assert pool.try_acquire() is None
        first = asyncio.ensure_future(pool.acquire())
        second = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        assert pool.waiting == 2
        pool.release(a)
        assert await first is a and not second.done()
        second.cancel()
        pool.release(b)  # nobody waits any more: b is idle, kept for reuse
        assert pool.in_use == 1 and pool.idle == 1 and pool.waiting == 0
        pool.release(a)
        assert pool.idle == 1 and pool.created == 2  # beyond shm_idle: unlinked
        pool.close()
        assert not fleet_segments(os.getpid())
    run(main())


# --- the run API ---

def test_a_streamed_result_comes_in_order_and_every_segment_goes_back(tmp_path):
    data = bytes(range(256)) * (CHUNK * 5 // 256 + 7)  # six pieces

    async def main():
        async with Rig(tmp_path) as rig:
            await rig.add(answering(data))
            got, result = await rig.collect("SELECT 1")
            assert got == data and not result.whole and result.rows == 1
            assert rig.pool.in_use == 0 and rig.fleet.busy == 0
            assert len(rig.runner.running) == 0
    run(main())


def test_leaving_midway_interrupts_the_worker_and_frees_every_segment(tmp_path):
    async def endless(worker, query):
        protocol.write(worker.writer, protocol.Chunk(query.id, query.segment, CHUNK))
        while query.id not in worker.cancels:
            await asyncio.sleep(0.01)
        return protocol.Failure(query.id, Kind.TIMEOUT, "query interrupted")

    async def main():
        async with Rig(tmp_path) as rig:
            worker = await rig.add(endless)
            async with rig.runner.run(Ask("SELECT 1", "arrow")) as result:
                assert await anext(result)  # the first piece, then the caller leaves
            async with asyncio.timeout(10):
                while rig.fleet.busy or rig.pool.in_use:
                    await asyncio.sleep(0.01)
            assert worker.cancels == [worker.queries[0].id]
    run(main())


def test_a_worker_lost_before_the_first_piece_is_retried_once_elsewhere(tmp_path):
    async def dies(worker, query):
        return "die"

    async def main():
        async with Rig(tmp_path) as rig:
            await rig.add(dies)
            healthy = await rig.add(answering(b"answer"))
            got, _ = await rig.collect("SELECT 1")
            assert got == b"answer" and len(healthy.queries) == 1 and rig.fleet.retried == 1
            second = await rig.add(dies)
            third = await rig.add(dies)
            healthy.die()
            while healthy.pid in rig.fleet.links:
                await asyncio.sleep(0.01)
            with pytest.raises(QueryError) as lost:
                await rig.collect("SELECT 2")
            assert lost.value.kind == Kind.WORKER_LOST
            assert len(second.queries) + len(third.queries) == 2, "tried twice, no more"
    run(main())


def test_identical_queries_at_once_run_once_with_the_cache(tmp_path):
    async def main():
        gate = asyncio.Event()

        async def slow(worker, query):
            await gate.wait()
            return b"x" * 1000

        async with Rig(tmp_path, cache=True) as rig:
            workers = [await rig.add(slow), await rig.add(slow)]
            calls = [asyncio.ensure_future(rig.collect("SELECT 42 AS answer"))]
            async with asyncio.timeout(10):
                while not any(w.queries for w in workers):
                    await asyncio.sleep(0.01)
                calls += [asyncio.ensure_future(rig.collect("SELECT 42 AS answer"))
                          for _ in range(2)]
                while sum(f.waiters for f in rig.cache.flights.values()) < 2:
                    await asyncio.sleep(0.01)
            gate.set()
            outcomes = [await call for call in calls]
            assert {data for data, _ in outcomes} == {b"x" * 1000}
            assert [r.cache for _, r in outcomes] == ["miss", "coalesced", "coalesced"]
            assert sum(len(w.queries) for w in workers) == 1
            data, result = await rig.collect("SELECT 42 AS answer")
            assert result.cache == "hit" and data == b"x" * 1000
            assert rig.pool.in_use == 0
    run(main())


def test_cancel_of_a_queued_and_of_a_running_query(tmp_path):
    async def hangs(worker, query):
        while query.id not in worker.cancels:
            await asyncio.sleep(0.01)
        return protocol.Failure(query.id, Kind.TIMEOUT, "query interrupted")

    async def main():
        async with Rig(tmp_path) as rig:
            worker = await rig.add(hangs)
            running = asyncio.ensure_future(rig.collect("SELECT 1", request_id="r"))
            queued = asyncio.ensure_future(rig.collect("SELECT 2", request_id="q"))
            async with asyncio.timeout(10):
                while rig.fleet.queued() != 1 or not worker.queries:
                    await asyncio.sleep(0.01)
            states = {a.ask.request_id: a.state for a in rig.runner.running.visible(None)}
            assert states == {"r": "running", "q": "waiting"}
            assert rig.runner.running.cancel("q", None) == 1
            with pytest.raises(QueryError) as cancelled:
                await queued
            assert cancelled.value.kind == Kind.CANCELLED and rig.fleet.queued() == 0
            rig.runner.running.cancel("r", None)
            with pytest.raises(QueryError) as cancelled:
                await running
            assert cancelled.value.kind == Kind.CANCELLED
            async with asyncio.timeout(10):
                while not worker.cancels:  # the worker is told to stop
                    await asyncio.sleep(0.01)
            with pytest.raises(QueryError) as unknown:
                rig.runner.running.cancel("r", None)
            assert unknown.value.kind == Kind.NOT_FOUND
    run(main())
