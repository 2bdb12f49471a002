"""Queries started when their statement was prepared, waiting for the DoGet that runs it.

ADBC and JDBC prepare every statement before they execute it, and the answer to a prepare
names the result's schema, which DuckDB tells only by binding the statement: for a dashboard
panel that costs about what running it does. So a statement without parameters starts running
when it is prepared (gateway/flight/server.py), its schema is read from its first bytes, and
the running query waits here for the same caller's DoGet of that statement, which takes it
over with its own deadline and cancellation (bridge.Pipe.adopt).

A started query is taken once. It is ended (its query cancelled) when it is not taken within
KEEP_S, when the caller closes the statement or starts more than PER_CALLER others, and when
more than KEPT wait in all: each holds a worker and the segment of its first piece. One whose
catalog changed before it was taken is ended too, and the DoGet runs the statement afresh. An
ended one writes no access line: the prepare's stands for it. A caller is one client connection
with one token. Shared by gRPC threads; expiry runs on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass

import pyarrow as pa

from gateway.access import RequestFacts
from gateway.flight.bridge import Pipe

KEEP_S = 5.0
PER_CALLER = 2
KEPT = 16


@dataclass(eq=False)
class Started:
    pipe: Pipe
    facts: RequestFacts  # the query's record: the DoGet that takes it writes its access line
    changes: int         # Catalog.changes when it started
    reader: pa.RecordBatchStreamReader | None = None  # its schema read, when it came in time


class StartedQueries:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._waiting: collections.OrderedDict[tuple, Started] = collections.OrderedDict()

    def put(self, caller: tuple, sql: str, started: Started) -> None:
        with self._lock:
            ended = [self._waiting.pop((caller, sql), None)]
            self._waiting[(caller, sql)] = started
            mine = [key for key in self._waiting if key[0] == caller]
            ended += [self._waiting.pop(key) for key in mine[:-PER_CALLER]]
            while len(self._waiting) > KEPT:
                ended.append(self._waiting.popitem(last=False)[1])
        self._end(ended)
        self._loop.call_soon_threadsafe(self._loop.call_later, KEEP_S, self._expire,
                                        (caller, sql), started)

    def take(self, caller: tuple, sql: str, changes: int) -> Started | None:
        with self._lock:
            started = self._waiting.pop((caller, sql), None)
        if started is not None and started.changes != changes:
            self._end([started])
            return None
        return started

    def drop(self, caller: tuple, sql: str) -> None:
        with self._lock:
            started = self._waiting.pop((caller, sql), None)
        self._end([started])

    def close(self) -> None:
        with self._lock:
            ended, self._waiting = list(self._waiting.values()), collections.OrderedDict()
        self._end(ended)

    def _expire(self, key: tuple, started: Started) -> None:
        with self._lock:
            if self._waiting.get(key) is not started:
                return  # taken, or replaced
            del self._waiting[key]
        self._end([started])

    @staticmethod
    def _end(ended: list[Started | None]) -> None:
        for started in ended:
            if started is not None:
                started.pipe.cancel()
