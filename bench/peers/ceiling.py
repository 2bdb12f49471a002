"""The in-process ceiling: as many single-threaded DuckDB processes as duckfleet has workers,
each running the dashboard mix in a loop, with no HTTP, no sockets and no shared memory.

The processes are spawned (DuckDB starts threads; never fork it), boot and warm up, then all
start at one wall-clock instant and stop at another; QPS is their total over that interval.
Every process is terminated and joined on the way out, whatever happens.
"""

from __future__ import annotations

import multiprocessing
import time

import duckdb

from bench.peers.dashboard import PANELS, NOW0, WINDOWS, DashboardMix, panel_sql

BOOT_S = 5.0  # time the processes get to start before the measured interval begins


def _loop(boot: list[str], seed: int, epoch: float, start_at: float, stop_at: float, out) -> None:
    con = duckdb.connect(config={"threads": 1})
    for statement in boot:
        con.execute(statement)
    for panel in PANELS:  # warm: the same as the servers' warm-up
        con.execute(panel_sql(panel, NOW0, next(iter(WINDOWS)))).fetchall()
    mix = DashboardMix(seed, epoch)
    time.sleep(max(0.0, start_at - time.time()))
    count = 0
    while time.time() < stop_at:
        con.execute(mix.next()).fetchall()
        count += 1
    out.put(count)


def ceiling_qps(boot: list[str], processes: int, duration: float, epoch: float, seed: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + BOOT_S
    procs = [ctx.Process(target=_loop, args=(boot, seed * 1000 + n, epoch, start_at,
                                             start_at + duration, out), daemon=True)
             for n in range(processes)]
    try:
        for p in procs:
            p.start()
        total = sum(out.get(timeout=BOOT_S + duration + 60) for _ in procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)
    return {"processes": processes, "queries": total, "duration_s": duration,
            "qps": total / duration}
