"""A running query's progress, reported by the worker to the gateway (GET /api/v1/queries).

Owned by the worker (engine/worker.py), one thread per process. While a query runs, every
`interval_s` (the first report after one interval, so short queries send nothing) the thread
reads DuckDB's query_progress() (a percentage, or -1 when DuckDB cannot tell) and the rows
written so far (encode.Tally), and sends a Progress message through the worker's send, whose
lock keeps frames whole. A report that arrives after its query ended is ignored by the gateway
(it matches the query id).
"""

from __future__ import annotations

import threading
from typing import Callable

import duckdb

from engine import protocol
from engine.encode import Tally


class ProgressReporter:
    def __init__(self, interval_s: float, send: Callable[[protocol.Message], None]):
        self.interval = interval_s
        self._send = send
        self._lock = threading.Lock()
        self._armed = threading.Event()
        self._ended = threading.Event()  # set when a query ends: cuts the interval's wait short
        self._running: tuple[int, duckdb.DuckDBPyConnection, Tally] | None = None

    def start(self) -> None:
        if self.interval > 0:
            threading.Thread(target=self._run, name="progress", daemon=True).start()

    def arm(self, query_id: int, con: duckdb.DuckDBPyConnection, tally: Tally) -> None:
        with self._lock:
            self._running = (query_id, con, tally)
            self._ended.clear()
        self._armed.set()

    def disarm(self) -> None:
        with self._lock:
            self._running = None
            self._ended.set()
        self._armed.clear()

    def _run(self) -> None:
        while True:
            self._armed.wait()
            with self._lock:
                first = self._running
            if first is None or self._ended.wait(self.interval):
                continue
            with self._lock:
                running = self._running
            if running is None or running[0] != first[0]:
                continue  # report only a query still running an interval later
            query_id, con, tally = running
            try:
                percent = con.query_progress()
            except duckdb.Error:
                percent = -1.0
            try:
                self._send(protocol.Progress(query_id, round(percent, 1), tally.rows))
            except OSError:
                return  # the gateway is gone; the main thread finds out too
