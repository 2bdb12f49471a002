"""Queries that killed a worker: refused for a while instead of being run again.

Owned by the Fleet, on the gateway's event loop only. A query is entered when the worker
running it died of a fault signal (SIGSEGV, SIGABRT...: the supervisor reports how each worker
ended, see Fleet.cause_of_death); the same query (its SQL with whitespace runs collapsed, and
its parameters) is then refused with 400 `quarantined` for `queue.quarantine_s`, whoever sends
it, without reaching a worker. This spares the fleet a dashboard that repeats such a query;
it cannot stop a client that varies the text, which is why a query that killed a worker is
never retried on another one, and why crash backoff ignores deaths during a query
(engine/supervisor.py). At most MAX_KEYS entries are kept, the oldest dropped first.
"""

from __future__ import annotations

import collections
import hashlib
import time

import msgspec

from engine.errors import Kind, QueryError

MAX_KEYS = 10_000


class Quarantine:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: collections.OrderedDict[bytes, tuple[float, str]] = collections.OrderedDict()
        self.added = 0

    @staticmethod
    def key(sql: str, params: list | None) -> bytes:
        text = " ".join(sql.split()).encode()
        return hashlib.sha256(text + b"\0" + msgspec.json.encode(params)).digest()

    def add(self, sql: str, params: list | None, why: str) -> QueryError:
        """Enter the query; the error for the request that sent it."""
        self.added += 1
        if self.ttl_s > 0:
            key = self.key(sql, params)
            self._entries.pop(key, None)
            self._entries[key] = (time.monotonic(), why)
            while len(self._entries) > MAX_KEYS:
                self._entries.popitem(last=False)
        return QueryError(Kind.QUARANTINED, f"this query crashed the worker running it ({why}); "
                                            f"it is refused for {self.ttl_s:g} s and was not retried")

    def check(self, sql: str, params: list | None) -> QueryError | None:
        if not self._entries:
            return None
        key = self.key(sql, params)
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = time.monotonic() - entry[0]
        if age >= self.ttl_s:
            del self._entries[key]
            return None
        return QueryError(Kind.QUARANTINED, f"this query crashed a worker ({entry[1]}) {age:.0f} s "
                                            f"ago; it is refused for {self.ttl_s - age:.0f} s more")

    def __len__(self) -> int:
        now = time.monotonic()
        while self._entries and now - next(iter(self._entries.values()))[0] >= self.ttl_s:
            self._entries.popitem(last=False)
        return len(self._entries)
