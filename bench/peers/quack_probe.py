"""Quack's other client mode: ATTACH 'quack:host:port' and query the remote tables directly.

Earlier trials saw it fail with "Failure when receiving data from the peer", so it is probed
rather than benchmarked, and its error rate is the result: every panel once, sequentially;
then the mix for a few seconds from 8 clients, first as 8 cursors of one client database
(one dashboard backend), then as 8 client databases with an ATTACH each.
"""

from __future__ import annotations

import statistics
import time

import duckdb

from bench.peers.dashboard import NOW0, PANELS, WINDOWS, DashboardMix, panel_sql
from bench.peers.extensions import load
from bench.peers.loadgen import closed_loop
from bench.peers.servers import QUACK_TOKEN, Peer, quack_uri

CLIENTS = 8


def _attached(uri: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    load(con, "httpfs", "quack")
    con.execute(f"CREATE SECRET (TYPE quack, TOKEN '{QUACK_TOKEN}')")
    con.execute(f"ATTACH '{uri}' AS remote (TYPE quack)")
    return con


class _DatabasePerClient:
    """Looks like a connection to closed_loop: each cursor() is a new attached client database."""

    def __init__(self, uri: str):
        self.uri = uri

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return _attached(self.uri)


def _loaded(con, duration: float) -> dict:
    peer = Peer("quack-attach", "duckdb", con=con, cursor_setup=["USE remote"])  # a cursor does not inherit USE
    mixes = [DashboardMix(seed=7000 + n, epoch=None) for n in range(CLIENTS)]
    r = closed_loop(peer, lambda n: mixes[n].next(), CLIENTS, duration)
    return {k: r[k] for k in ("requests", "ok", "errors", "error_kinds", "qps", "p50_ms", "p99_ms")}


def attach_probe(peer: Peer, duration: float) -> dict:
    uri = quack_uri(peer)
    try:
        con = _attached(uri)
    except duckdb.Error as exc:
        return {"attached": False, "error": str(exc)[:300]}
    try:
        con.execute("USE remote")
        errors, times, kinds = 0, [], {}
        for panel in PANELS:
            started = time.perf_counter()
            try:
                con.execute(panel_sql(panel, NOW0, next(iter(WINDOWS)))).fetchall()
                times.append(time.perf_counter() - started)
            except duckdb.Error as exc:
                errors += 1
                kinds[str(exc)[:120]] = kinds.get(str(exc)[:120], 0) + 1
        return {"attached": True, "sequential_queries": len(PANELS), "sequential_errors": errors,
                "sequential_error_kinds": kinds,
                "sequential_p50_ms": statistics.median(times) * 1000 if times else None,
                f"c{CLIENTS}_cursors_of_one_database": _loaded(con, duration),
                f"c{CLIENTS}_database_per_client": _loaded(_DatabasePerClient(uri), duration)}
    finally:
        con.close()
