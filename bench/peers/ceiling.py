"""The in-process ceiling: as many single-threaded DuckDB processes as duckfleet has workers,
each running the dashboard mix in a loop, with no HTTP, no sockets and no shared memory.

The processes are spawned (DuckDB starts threads; never fork it), boot and warm up, wait at a
barrier until all are ready, then each runs for `duration` seconds; QPS is their total over it.
Every process is terminated and joined on the way out, whatever happens.
"""

from __future__ import annotations

import multiprocessing
import time

import duckdb

from bench.peers.dashboard import PANELS, NOW0, WINDOWS, DashboardMix, panel_sql

BOOT_TIMEOUT_S = 60.0


def _loop(boot: list[str], seed: int, epoch: float, ready, duration: float, out) -> None:
    con = duckdb.connect(config={"threads": 1})
    for statement in boot:
        con.execute(statement)
    for panel in PANELS:  # warm: the same as the servers' warm-up
        con.execute(panel_sql(panel, NOW0, next(iter(WINDOWS)))).fetchall()
    mix = DashboardMix(seed, epoch)
    ready.wait(BOOT_TIMEOUT_S)
    count, stop_at = 0, time.perf_counter() + duration
    while time.perf_counter() < stop_at:
        con.execute(mix.next()).fetchall()
        count += 1
    out.put(count)


def ceiling_qps(boot: list[str], processes: int, duration: float, epoch: float, seed: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_loop, args=(boot, seed * 1000 + n, epoch, ready, duration, out),
                         daemon=True) for n in range(processes)]
    try:
        for p in procs:
            p.start()
        total = sum(out.get(timeout=BOOT_TIMEOUT_S + duration + 60) for _ in procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)
    return {"processes": processes, "queries": total, "duration_s": duration,
            "qps": total / duration}
