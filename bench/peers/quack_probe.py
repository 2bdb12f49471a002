"""Quack's other client mode: ATTACH 'quack:host:port' and query the remote tables directly.

Earlier trials saw it fail with "Failure when receiving data from the peer", so it is probed
rather than benchmarked: every panel query once through the attached database, sequentially,
then the same at concurrency 8 for a few seconds; the error rate is the result.
"""

from __future__ import annotations

import statistics
import time

import duckdb

from bench.peers.dashboard import NOW0, PANELS, WINDOWS, DashboardMix, panel_sql
from bench.peers.extensions import load
from bench.peers.loadgen import closed_loop
from bench.peers.servers import QUACK_TOKEN, Peer, quack_uri


def attach_probe(peer: Peer, epoch: float, duration: float = 3.0) -> dict:
    con = duckdb.connect()
    try:
        load(con, "httpfs", "quack")
        try:
            con.execute(f"CREATE SECRET (TYPE quack, TOKEN '{QUACK_TOKEN}')")
            con.execute(f"ATTACH '{quack_uri(peer)}' AS remote (TYPE quack)")
            con.execute("USE remote")
        except duckdb.Error as exc:
            return {"attached": False, "error": str(exc)[:300]}
        errors, times, kinds = 0, [], {}
        for panel in PANELS:
            started = time.perf_counter()
            try:
                con.execute(panel_sql(panel, NOW0, next(iter(WINDOWS)))).fetchall()
                times.append(time.perf_counter() - started)
            except duckdb.Error as exc:
                errors += 1
                kinds[str(exc)[:120]] = kinds.get(str(exc)[:120], 0) + 1
        attached = Peer("quack-attach", "duckdb", con=con, cursor_setup=["USE remote"])
        mixes = [DashboardMix(seed=7000 + n, epoch=epoch) for n in range(8)]
        loaded = closed_loop(attached, lambda n: mixes[n].next(), 8, duration)
        return {"attached": True, "sequential_queries": len(PANELS), "sequential_errors": errors,
                "sequential_error_kinds": kinds,
                "sequential_p50_ms": statistics.median(times) * 1000 if times else None,
                "c8": {k: loaded[k] for k in ("requests", "ok", "errors", "error_kinds", "qps",
                                              "p50_ms", "p99_ms")}}
    finally:
        con.close()
