"""An Arc-style query tier: the FastAPI app Gunicorn runs in each UvicornWorker.

    gunicorn -k uvicorn.workers.UvicornWorker -w N bench.peers.arc_tier:app

Rebuilt from Arc's public descriptions (see /work/shared/reference and ARCHITECTURE.md),
not from its code. Each worker process holds a pool of DuckDB connections, each its own
in-memory database with the views run at boot. Endpoints are sync `def`s, so FastAPI runs
them in its threadpool (40 threads); a request checks out a connection (waiting at most 5 s,
then 503 "No available connections after 5.0s", as Arc's pool answered), runs the query, and:
  /api/v1/query        fetchall() rows -> Python lists -> JSON in Arc's shape
  /api/v1/query/arrow  the whole result as an Arrow table, then one IPC stream in memory
After a result of more than ARC_RECREATE_AFTER_ROWS rows (Arc: 5000) the connection is closed
and recreated before it goes back to the pool, as Arc's pool fix did to release memory.

With ARC_CACHE_TTL > 0, each worker keeps the query cache the production guide prescribes
(`[query_cache] ttl_seconds = 60, max_size = 100, max_result_mb = 10`): JSON answers by SQL text,
in the worker's own memory (Arc's cache was per worker), least recently used first out past
max_size, bodies over max_result_mb not kept; `X-Cache: hit | miss` says which.

Configured by the environment (the harness sets it): ARC_BOOT_SQL (a file of statements, one a
line), ARC_POOL_SIZE, ARC_THREADS, ARC_MEMORY_LIMIT ("" = DuckDB's default), ARC_RECREATE_AFTER_ROWS,
ARC_CACHE_TTL, ARC_CACHE_MAX_SIZE, ARC_CACHE_MAX_RESULT_MB, and ARC_PRUNE_DIR: when set, each query's tables are pruned as Arc's Python tier pruned them
(bench/peers/arc_pruner.py: regular expressions on literal times, hour globs under that data
directory) before it runs; the `X-Arc-Pruned-Globs` header says how many hour globs it read.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import queue
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
from fastapi import Body, FastAPI
from fastapi.responses import Response

from bench.peers import arc_pruner

POOL_TIMEOUT_S = 5.0


def _settings() -> dict:
    return {
        "boot": [s for s in Path(os.environ["ARC_BOOT_SQL"]).read_text().splitlines() if s.strip()],
        "pool_size": int(os.environ.get("ARC_POOL_SIZE", "5")),
        "threads": int(os.environ.get("ARC_THREADS", str(os.cpu_count() or 1))),
        "memory_limit": os.environ.get("ARC_MEMORY_LIMIT", ""),
        "recreate_after_rows": int(os.environ.get("ARC_RECREATE_AFTER_ROWS", "5000")),
        "prune_dir": os.environ.get("ARC_PRUNE_DIR", ""),
        "cache_ttl": float(os.environ.get("ARC_CACHE_TTL", "0")),
        "cache_max_size": int(os.environ.get("ARC_CACHE_MAX_SIZE", "100")),
        "cache_max_bytes": int(float(os.environ.get("ARC_CACHE_MAX_RESULT_MB", "10")) * 2**20),
    }


class QueryCache:
    """One worker's cache of JSON answers by SQL text; endpoints run on threads, hence the lock."""

    def __init__(self, ttl: float, max_size: int, max_bytes: int):
        self.ttl, self.max_size, self.max_bytes = ttl, max_size, max_bytes
        self._entries: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, sql: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(sql)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._entries[sql]
                return None
            self._entries.move_to_end(sql)
            return entry[1]

    def put(self, sql: str, body: bytes) -> None:
        if len(body) > self.max_bytes:
            return
        with self._lock:
            self._entries[sql] = (time.monotonic() + self.ttl, body)
            self._entries.move_to_end(sql)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)


class ConnectionPool:
    """A fixed number of connections; checkout blocks the calling (threadpool) thread."""

    def __init__(self, settings: dict):
        self.settings = settings
        self._free: queue.Queue = queue.Queue()
        for _ in range(settings["pool_size"]):
            self._free.put(self.connect())
        self.cache = QueryCache(settings["cache_ttl"], settings["cache_max_size"],
                                settings["cache_max_bytes"]) if settings["cache_ttl"] > 0 else None

    def connect(self) -> duckdb.DuckDBPyConnection:
        config = {"threads": self.settings["threads"]}
        if self.settings["memory_limit"]:
            config["memory_limit"] = self.settings["memory_limit"]
        con = duckdb.connect(config=config)
        for statement in self.settings["boot"]:
            con.execute(statement)
        return con

    def checkout(self) -> duckdb.DuckDBPyConnection | None:
        try:
            return self._free.get(timeout=POOL_TIMEOUT_S)
        except queue.Empty:
            return None

    def checkin(self, con: duckdb.DuckDBPyConnection, rows: int) -> None:
        if rows > self.settings["recreate_after_rows"]:
            con.close()
            con = self.connect()  # synchronously, so the pool never holds a dead slot
        self._free.put(con)


app = FastAPI()
_pool: ConnectionPool | None = None


def pool() -> ConnectionPool:
    global _pool  # one pool per worker process, made in the worker (after Gunicorn's fork)
    if _pool is None:
        _pool = ConnectionPool(_settings())
    return _pool


@app.on_event("startup")
def _warm() -> None:
    pool()


def _error(status: int, message: str) -> Response:
    body = {"success": False, "error": message, "detail": message}
    return Response(json.dumps(body), status, media_type="application/json")


@app.get("/health")
def health() -> dict:
    return {"status": "ok", "pid": os.getpid()}


@app.post("/api/v1/query")
def query(sql: str = Body(..., embed=True)) -> Response:
    started = time.perf_counter()
    cache = pool().cache
    if cache is not None and (cached := cache.get(sql)) is not None:
        return Response(cached, media_type="application/json", headers={"X-Cache": "hit"})
    con = pool().checkout()
    if con is None:
        return _error(503, f"No available connections after {POOL_TIMEOUT_S}s")
    waited = time.perf_counter() - started
    rows, globs = 0, None
    try:
        if pool().settings["prune_dir"]:
            sql, globs = arc_pruner.rewrite(sql, Path(pool().settings["prune_dir"]))
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description]
        data = [list(row) for row in cursor.fetchall()]
        rows = len(data)
    except duckdb.Error as exc:
        return _error(400, str(exc))
    finally:
        pool().checkin(con, rows)
    body = {"success": True, "columns": columns, "data": data, "row_count": rows,
            "execution_time_ms": (time.perf_counter() - started - waited) * 1000,
            "wait_time_ms": waited * 1000,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "error": None}
    encoded = json.dumps(body, default=str).encode()
    headers = {"X-Arc-Pruned-Globs": str(globs)}
    if cache is not None:
        cache.put(sql, encoded)
        headers["X-Cache"] = "miss"
    return Response(encoded, media_type="application/json", headers=headers)


@app.post("/api/v1/query/arrow")
def query_arrow(sql: str = Body(..., embed=True)) -> Response:
    started = time.perf_counter()
    con = pool().checkout()
    if con is None:
        return _error(503, f"No available connections after {POOL_TIMEOUT_S}s")
    rows = 0
    try:
        table = con.execute(sql).fetch_arrow_table()
        rows = table.num_rows
    except duckdb.Error as exc:
        return _error(400, str(exc))
    finally:
        pool().checkin(con, rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return Response(sink.getvalue().to_pybytes(), media_type="application/vnd.apache.arrow.stream",
                    headers={"X-Row-Count": str(rows),
                             "X-Execution-Time-Ms": f"{(time.perf_counter() - started) * 1000:.1f}"})
