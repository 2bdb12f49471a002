"""A worker's hard memory cap: a thread that reads the worker's RSS while a query runs.

Owned by the worker (engine/worker.py), one per process. DuckDB's memory_limit governs only
its buffer manager; some functions (repeat, lpad, string_split, range lists) allocate gigabytes
outside it and do not look at interrupts while they do. So RSS is read from /proc/self/statm
every `interval_s` while the worker is armed (a query is running), not only after the query.
DuckDB releases the GIL while it executes, so this thread runs even then.

The first reading past `cap_bytes` calls `on_over(query_id, rss)`, once, from this thread:
the worker cannot take the memory back, so on_over reports and ends the process. A reading
that fails (no /proc) disables the watch rather than killing a healthy worker.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


class MemoryWatch:
    def __init__(self, cap_bytes: int, interval_s: float, on_over: Callable[[int, int], None]):
        self.cap = cap_bytes
        self.interval = interval_s
        self._on_over = on_over
        self._armed = threading.Event()
        self._lock = threading.Lock()
        self._query: int | None = None

    def start(self) -> None:
        if self.cap:
            threading.Thread(target=self._run, name="memory-watch", daemon=True).start()

    def arm(self, query_id: int) -> None:
        with self._lock:
            self._query = query_id
        self._armed.set()

    def disarm(self) -> None:
        with self._lock:
            self._query = None
        self._armed.clear()

    def armed_for(self) -> int | None:
        with self._lock:
            return self._query

    def _run(self) -> None:
        while True:
            self._armed.wait()
            try:
                rss = current_rss()
            except (OSError, ValueError, IndexError):
                return
            query = self.armed_for()
            if query is not None and rss > self.cap:
                self._on_over(query, rss)
                return
            time.sleep(self.interval)
