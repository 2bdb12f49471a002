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
import time
from typing import Callable

import duckdb

from engine import protocol
from engine.encode import Tally


class ProgressReporter:
    """The thread looks at the running query every half interval, on its own clock: arming and
    disarming are two assignments, so a query of a few milliseconds wakes no thread."""

    def __init__(self, interval_s: float, send: Callable[[protocol.Message], None]):
        self.interval = interval_s
        self._send = send
        # (query id, connection, tally, started): replaced whole, so read without a lock
        self._running: tuple[int, duckdb.DuckDBPyConnection, Tally, float] | None = None

    def start(self) -> None:
        if self.interval > 0:
            threading.Thread(target=self._run, name="progress", daemon=True).start()

    def arm(self, query_id: int, con: duckdb.DuckDBPyConnection, tally: Tally) -> None:
        self._running = (query_id, con, tally, time.monotonic())

    def disarm(self) -> None:
        self._running = None

    def _run(self) -> None:
        reported = 0.0
        while True:
            time.sleep(self.interval / 2)
            running, now = self._running, time.monotonic()
            if running is None or now - max(running[3], reported) < self.interval:
                continue  # a query still running an interval after it started, once an interval
            reported = now
            query_id, con, tally, _ = running
            try:
                percent = con.query_progress()
            except duckdb.Error:
                percent = -1.0
            try:
                self._send(protocol.Progress(query_id, round(percent, 1), tally.rows))
            except OSError:
                return  # the gateway is gone; the main thread finds out too
