"""The fleet's result cache: one per gateway, so every worker's results serve every request.

Entries hold finished response bodies (without JSON's timing tail, added per response). A body
up to render.SMALL is copied into gateway memory; a larger one keeps the shared-memory
segments the worker wrote (taken out of the pool's count) and is sent from them with
sendfile. An entry is charged what it holds: its bytes, or its whole segments.

Keys (`CacheKey`): the statement's parse tree from DuckDB (gateway/sqlkey.py), the parameters,
the format, and the caller's data scope (its token's databases, or everything): callers with
the same scope see the same rows, so they share entries, and no other caller can.

Lifetime: ttl_seconds (volatile_ttl_seconds for queries calling now(), random()...: 0 keeps them
out), a change to files under a table the entry read (heard from gateway/catalog.py), an operator's clear,
and LRU eviction within max_size entries and max_total_mb. An entry sent while it dies is
freed when its last response is sent (pins).

Single-flight (`single_flight`, called by the run API in gateway/run.py): the first request
for a key runs it (a Flight) and its result is kept as it passes (the result's tee hands each
sent piece to a Keeper); identical requests arriving meanwhile wait for it and are answered
from its entry. A failure reaches each waiter once and is not cached; a result too large to
cache sends the waiters to run it themselves; a leader whose client left hands over to the
next request. A flight whose tables change while it runs is not stored, and requests arriving
after the change start a new one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import msgspec

from engine import log as log_mod
from engine.config import QueryCacheConfig
from engine.errors import Kind, QueryError
from gateway.segments import Segment, SegmentPool
from gateway.sqlkey import Analysis

log = log_mod.get()
MiB = 2**20
RETRY = "retry"    # flight outcome: its leader left; ask again
BYPASS = "bypass"  # flight outcome: not cacheable; run it yourself
SMALL = 256 * 1024  # a whole result up to this size is copied out of its segment
EVICTION_REASONS = ("ttl", "lru", "invalidated", "cleared")


@dataclass(frozen=True)
class CacheKey:
    shape: bytes
    fmt: str
    params: bytes
    scope: tuple[str, ...] | None
    tables: frozenset[str] | None = field(compare=False)  # None: depends on everything
    ttl: float = field(compare=False)

    def depends_on(self, touched: set[str] | None) -> bool:
        return touched is None or self.tables is None or not self.tables.isdisjoint(touched)


class Entry:
    """A finished result: `body` bytes, or `segments` [(segment, length)] kept from the pool."""

    def __init__(self, cache: QueryCache, key: CacheKey, rows: int, execution_ms: float,
                 body: bytes | None, segments: list[tuple[Segment, int]]):
        self.cache = cache
        self.key = key
        self.rows = rows
        self.execution_ms = execution_ms
        self.body = body
        self.segments = segments
        self.length = len(body) if body is not None else sum(n for _, n in segments)
        self.charged = len(body) if body is not None else len(segments) * cache.pool.chunk_bytes
        self.created = time.monotonic()
        self.expires = self.created + key.ttl
        self.pins = 0        # responses sending it
        self.dead = False    # out of the cache: freed at the last unpin

    def pin(self) -> None:
        self.pins += 1

    def unpin(self) -> None:
        self.pins -= 1
        self._free_if_unused()

    def kill(self) -> None:
        self.dead = True
        self._free_if_unused()

    def _free_if_unused(self) -> None:
        if self.dead and self.pins == 0:
            for segment, _ in self.segments:
                self.cache.pool.reclaim(segment)
            self.segments = []
            self.body = None


class Flight:
    """The one execution of a key; identical requests wait on `outcome`."""

    def __init__(self, key: CacheKey):
        self.key = key
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.outcome.add_done_callback(lambda f: f.cancelled() or f.exception())  # no warning
        self.waiters = 0
        self.stale = False  # its tables changed while it ran: answer the waiters, do not store

    async def wait(self):
        """An Entry (pinned for this caller), RETRY or BYPASS; or raises the leader's error."""
        self.waiters += 1
        try:
            return await asyncio.shield(self.outcome)
        except asyncio.CancelledError:  # the leader may have pinned an entry for us already
            if self.outcome.done() and not self.outcome.exception() \
                    and isinstance(self.outcome.result(), Entry):
                self.outcome.result().unpin()
            raise
        finally:
            self.waiters -= 1

    def resolve(self, outcome) -> None:
        if isinstance(outcome, Entry):
            outcome.pins += self.waiters
        if isinstance(outcome, QueryError):
            self.outcome.set_exception(outcome)
        else:
            self.outcome.set_result(outcome)


class Keeper:
    """Collects a leader's result pieces, while they fit max_result_mb, into an Entry."""

    def __init__(self, cache: QueryCache, flight: Flight):
        self.cache = cache
        self.flight = flight
        self.pieces: list[tuple[Segment, int]] = []
        self.size = 0
        self.gave_up = False

    def keep(self, segment: Segment, length: int) -> bool:
        """Take this piece (the caller leaves it out of the pool), or refuse: too large."""
        if self.gave_up or self.size + length > self.cache.max_result_bytes:
            self.give_up()
            return False
        self.pieces.append((segment, length))
        self.size += length
        return True

    def give_up(self) -> None:
        self.gave_up = True
        for segment, _ in self.pieces:
            self.cache.pool.reclaim(segment)
        self.pieces = []

    def store_whole(self, segment: Segment, length: int, rows: int,
                    execution_ms: float) -> Entry | None:
        """A one-piece result, stored before it is sent: a small one copied (the caller gives
        the segment back), a larger one kept in its segment (the caller detaches it)."""
        if length <= SMALL:
            return self.finish(rows, execution_ms, bytes(segment.view[:length]))
        if not self.keep(segment, length):
            return None
        return self.finish(rows, execution_ms)

    def finish(self, rows: int, execution_ms: float, body: bytes | None = None) -> Entry | None:
        """The whole result is here: an Entry pinned for the caller, or None (not kept)."""
        if self.gave_up:
            return None
        entry = Entry(self.cache, self.flight.key, rows, execution_ms, body, self.pieces)
        self.pieces = []
        entry.pins = 1
        self.cache._store(self.flight, entry)
        self.cache.land(self.flight, entry)  # the waiters need not wait for the leader's client
        return entry

    def close(self, outcome) -> None:
        """The leader's result is closed: what was not stored is freed; its waiters learn the
        outcome (its error, RETRY if it left early, BYPASS if it was not kept)."""
        self.give_up()
        self.cache.land(self.flight, outcome)


class QueryCache:
    def __init__(self, cfg: QueryCacheConfig, pool: SegmentPool):
        """Tables changing reach it through invalidate(), a listener of gateway/catalog.py."""
        self.cfg = cfg
        self.pool = pool
        self.max_result_bytes = cfg.max_result_mb * MiB
        self.max_bytes = cfg.max_total_mb * MiB
        self.entries: collections.OrderedDict[CacheKey, Entry] = collections.OrderedDict()
        self.flights: dict[CacheKey, Flight] = {}
        self.bytes = 0
        self.hits = self.misses = self.coalesced = self.bypassed = 0
        self.hit_bytes = 0
        self.evictions = dict.fromkeys(EVICTION_REASONS, 0)
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._sweep()

    def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        self.clear("cleared")

    # --- keys ---

    def key(self, analysis: Analysis | None, fmt: str, params: list | None,
            scope: list[str] | None) -> CacheKey | None:
        """The key of a cacheable query (analysis None: the caller opted out), else None
        (counted as bypassed)."""
        ttl = self.cfg.ttl_seconds
        if analysis is not None and analysis.volatile:
            ttl = min(ttl, self.cfg.volatile_ttl_seconds)
        if analysis is None or analysis.shape is None or ttl <= 0:
            self.bypassed += 1
            return None
        return CacheKey(analysis.shape, fmt, msgspec.msgpack.encode(params or []),
                        tuple(sorted(scope)) if scope is not None else None,
                        analysis.tables, ttl)

    # --- lookups ---

    def get(self, key: CacheKey) -> Entry | None:
        """A live entry, pinned for the caller (who must unpin it), else None. The caller has
        polled the catalog, so a file changed before this request has invalidated already."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            self._evict(entry, "ttl")
            return None
        self.entries.move_to_end(key)
        entry.pin()
        self.hits += 1
        self.hit_bytes += entry.length
        return entry

    async def single_flight(self, key: CacheKey, compute: Callable[[], Awaitable],
                            deadline_s: float, from_entry: Callable[[Entry, str], object]):
        """A hit; or the outcome of the same query already running (waiting at most
        deadline_s); or compute()'s result, kept as it passes (its `keep` tee) and closed by
        the caller, which lands the flight. `from_entry(entry, state)` makes a result of a
        pinned entry."""
        while True:
            if (entry := self.get(key)) is not None:
                return from_entry(entry, "hit")
            if (flight := self.flights.get(key)) is None:
                break
            try:
                async with asyncio.timeout(deadline_s):
                    outcome = await flight.wait()
            except TimeoutError:
                raise QueryError(Kind.TIMEOUT, f"the same query, already running, did not "
                                               f"finish within {deadline_s:g} s") from None
            if isinstance(outcome, Entry):
                self.coalesced += 1
                return from_entry(outcome, "coalesced")
            if outcome == BYPASS:
                result = await compute()
                result.cache = "bypass"
                return result
            # RETRY: its leader left before the result; ask again (the first asker leads)
        self.misses += 1
        flight = self.flights[key] = Flight(key)
        keeper = Keeper(self, flight)
        try:
            result = await compute()
        except QueryError as exc:
            keeper.close(exc)
            raise
        except BaseException:
            keeper.close(RETRY)  # a waiter takes over
            raise
        result.cache = "miss"
        result.keep(keeper)
        return result

    def land(self, flight: Flight, outcome) -> None:
        """The leader is done: Entry (already stored), QueryError, RETRY or BYPASS."""
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        if not flight.outcome.done():
            flight.resolve(outcome)

    # --- storing and evicting ---

    def _store(self, flight: Flight, entry: Entry) -> None:
        if flight.stale or entry.charged > self.max_bytes:
            entry.dead = True  # serves its leader and waiters, then is freed
            return
        old = self.entries.pop(entry.key, None)
        if old is not None:
            self._drop(old)
        self.entries[entry.key] = entry
        self.bytes += entry.charged
        while len(self.entries) > self.cfg.max_size or self.bytes > self.max_bytes:
            self._evict(next(iter(self.entries.values())), "lru")

    def _evict(self, entry: Entry, reason: str) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
            self._drop(entry)
            self.evictions[reason] += 1

    def _drop(self, entry: Entry) -> None:
        self.bytes -= entry.charged
        entry.kill()

    def invalidate(self, touched: set[str] | None) -> None:
        """Files changed under these tables (None: anywhere): their entries and flights die."""
        for entry in [e for e in self.entries.values() if e.key.depends_on(touched)]:
            self._evict(entry, "invalidated")
        for key, flight in list(self.flights.items()):
            if key.depends_on(touched):
                flight.stale = True
                del self.flights[key]

    def clear(self, reason: str = "cleared") -> int:
        count = len(self.entries)
        for entry in list(self.entries.values()):
            self._evict(entry, reason)
        return count

    def _sweep(self) -> None:
        """Expired entries go once a second, so their memory does not wait for a lookup."""
        now = time.monotonic()
        for entry in [e for e in self.entries.values() if e.expires <= now]:
            self._evict(entry, "ttl")
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def stats(self) -> dict:
        return {"enabled": True, "entries": len(self.entries), "bytes": self.bytes,
                "max_size": self.cfg.max_size, "max_total_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "coalesced": self.coalesced,
                "bypassed": self.bypassed, "hit_bytes": self.hit_bytes,
                "evicted": sum(self.evictions.values()), "evicted_by_reason": dict(self.evictions),
                "in_flight": len(self.flights),
                "ttl_seconds": self.cfg.ttl_seconds,
                "volatile_ttl_seconds": self.cfg.volatile_ttl_seconds}
