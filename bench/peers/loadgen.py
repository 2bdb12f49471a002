"""Closed-loop load: `concurrency` clients, each sending its next query when the last answered.

HTTP peers are driven by one asyncio aiohttp client in this process; DuckDB-client peers
(in-process, Quack) by one thread per client, each with its own cursor (DuckDB releases the
GIL while it runs). Every run stops by itself: at `duration` seconds no client starts another
query, and `max_requests` bounds the count. The client shares the machine's cores with the
server; `client_cpu_share` (this process's CPU seconds over wall seconds, all threads) says
how much of them it took. `next_sql(client)` may return None: that client's sequence is over
and it stops. `on_reply(Reply)`, if given, sees every answer, HTTP or DuckDB (bench.history
and the peers' dashboard mix keep a sample of them to check after the run).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
import http.client
import pyarrow as pa

from bench.common import percentile
from bench.peers.servers import LOOPBACK, Peer

REQUEST_TIMEOUT_S = 120


def post(port: int, path: str, sql: str) -> tuple[int, bytes]:
    """One blocking request with a JSON body: (status, whole body)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=600)
    try:
        conn.request("POST", path, json.dumps({"sql": sql}).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fetch_arrow(port: int, sql: str) -> pa.Table:
    """POST /api/v1/query/arrow, parsed while it downloads, as a pyarrow user would."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=600)
    try:
        conn.request("POST", "/api/v1/query/arrow", json.dumps({"sql": sql}).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
        return pa.ipc.open_stream(resp).read_all()
    finally:
        conn.close()


FAILED = 0  # Reply.status of a request that got no answer


@dataclass
class Reply:
    """One answer: an HTTP peer's status, X-Cache and body, or a DuckDB client's rows."""
    client: int
    sql: str
    status: int  # DuckDB-client peers: 200; FAILED: no answer (an exception, a timeout)
    cache: str | None = None
    body: bytes | None = None
    rows: list | None = None
    columns: list[str] | None = None


class Tally:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self.first_error: dict[str, str] = {}  # kind -> the first such error's text
        self.queries: set[str] = set()
        self.sent = 0

    def error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        self.first_error.setdefault(kind, text)


def _stats(tally: Tally, concurrency: int, wall: float, cpu: float) -> dict:
    ok = len(tally.latencies)
    lat = tally.latencies or [float("nan")]
    return {"concurrency": concurrency, "requests": tally.sent, "ok": ok,
            "errors": sum(tally.errors.values()), "error_kinds": dict(tally.errors),
            "first_errors": tally.first_error,
            "qps": ok / wall if wall else 0.0,
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "duration_s": wall, "client_cpu_share": cpu / wall if wall else 0.0,
            "distinct_query_share": len(tally.queries) / max(1, tally.sent)}


async def _http(peer: Peer, next_sql: Callable[[int], str | None], concurrency: int, duration: float,
                max_requests: int, on_reply: Callable | None = None) -> Tally:
    tally = Tally()
    url = f"http://{LOOPBACK}:{peer.port}/api/v1/query"
    deadline = time.perf_counter() + duration
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=timeout) as session:
        async def client(n: int):
            while time.perf_counter() < deadline and tally.sent < max_requests:
                sql = next_sql(n)
                if sql is None:
                    return
                tally.sent += 1
                tally.queries.add(sql)
                started = time.perf_counter()
                try:
                    async with session.post(url, data=json.dumps({"sql": sql}),
                                            headers={"Content-Type": "application/json"}) as resp:
                        body = await resp.read()
                        if on_reply is not None:
                            on_reply(Reply(n, sql, resp.status, resp.headers.get("X-Cache"), body))
                        if resp.status != 200:
                            tally.error(f"http {resp.status}", body[:300].decode(errors="replace"))
                            continue
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    tally.error(type(exc).__name__, repr(exc)[:300])
                    if on_reply is not None:  # its place in the client's sequence is used up
                        on_reply(Reply(n, sql, FAILED))
                    continue
                tally.latencies.append(time.perf_counter() - started)
        await asyncio.gather(*(client(n) for n in range(concurrency)))
    return tally


def _threads(peer: Peer, next_sql: Callable[[int], str | None], concurrency: int, duration: float,
             max_requests: int, on_reply: Callable | None) -> Tally:
    tally = Tally()
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client(n: int):
        cursor = peer.cursor()
        try:
            while time.perf_counter() < deadline:
                with lock:
                    sql = next_sql(n) if tally.sent < max_requests else None
                    if sql is None:
                        return
                    tally.sent += 1
                    tally.queries.add(sql)
                started = time.perf_counter()
                try:
                    result = cursor.execute(peer.sql_for(sql))
                    rows = result.fetchall()
                except Exception as exc:  # duckdb.Error and its kin: an error is a result here
                    with lock:
                        tally.error(f"{type(exc).__name__}: {str(exc)[:80]}", str(exc)[:300])
                        if on_reply is not None:
                            on_reply(Reply(n, sql, FAILED))
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    tally.latencies.append(elapsed)
                    if on_reply is not None:
                        on_reply(Reply(n, sql, 200, rows=rows,
                                       columns=[d[0] for d in result.description]))
        finally:
            cursor.close()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def closed_loop(peer: Peer, next_sql: Callable[[int], str | None], concurrency: int, duration: float,
                max_requests: int = 100_000, on_reply: Callable | None = None) -> dict:
    """Run the load; next_sql(client number) gives each client's next query."""
    wall, cpu = time.perf_counter(), time.process_time()
    if peer.kind == "http":
        tally = asyncio.run(_http(peer, next_sql, concurrency, duration, max_requests, on_reply))
    else:
        tally = _threads(peer, next_sql, concurrency, duration, max_requests, on_reply)
    return _stats(tally, concurrency, time.perf_counter() - wall, time.process_time() - cpu)
