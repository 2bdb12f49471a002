"""Pieces every benchmark shares: a server on demo data, timing, percentiles, an Arrow client."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from engine.demo import write_demo
from harness.server import Server

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def demo_server(workers: int | None = None, config: str = ""):
    """A duckfleet server on a fresh copy of the demo data, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="duckfleet-bench-") as tmp:
        tmp = Path(tmp)
        write_demo(tmp / "data")
        server = Server(tmp / "server", tmp / "data", workers=workers or os.cpu_count() or 2,
                        config=config).start()
        try:
            yield server
        finally:
            server.stop()
            server.runtime_base.rmdir()


def raise_on_stop_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the main thread, wherever it is, so every
    `finally` stops its server (asyncio.run's own SIGINT handling only cancels its task, which
    aiohttp can absorb)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def timed(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


class _Prefixed:
    """A file object: `head` bytes, then the rest of `body`."""

    def __init__(self, head: bytes, body):
        self._head, self._body, self.closed = head, body, False

    def read(self, n=-1):
        if self._head:
            head, self._head = self._head, b""
            return head + (self._body.read(n - len(head)) if n and n > len(head) else b"")
        return self._body.read(n)


def fetch_arrow(port: int, sql: str) -> tuple[float, pa.Table]:
    """(seconds to the first body byte, table), parsing while it downloads, as a user would."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/api/v1/query/arrow", json.dumps({"sql": sql}).encode())
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
    first = resp.read(1)
    ttfb = time.perf_counter() - started
    table = pa.ipc.open_stream(_Prefixed(first, resp)).read_all()
    conn.close()
    return ttfb, table


def write_report(name: str, report: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2))
    return path
