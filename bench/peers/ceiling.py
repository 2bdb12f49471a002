"""The in-process ceiling: as many single-threaded DuckDB processes as duckfleet has workers,
each running the dashboard mix in a loop, with no HTTP, no sockets and no shared memory.

Two forms. The default runs each query as written over the `boot` views (as bench.peers does:
views over the glob of each measurement). With `pruned_dir`, each query's tables are replaced
by `read_parquet` of exactly the hour files its window needs, found from the window and Arc's
layout (<dir>/<database>/<measurement>/YYYY/MM/DD/HH/*.parquet, listed once at start), not with
duckfleet's code: what a perfect pruner would read, at no planning cost.

The processes are spawned (DuckDB starts threads; never fork it), boot and warm up, wait at a
barrier until all are ready, then each runs for `duration` seconds; QPS is their total over it.
`epoch` is the mix's (dashboard.py): None holds "now" at the config's now0, as bench.peers does.
No load generator shares their cores, unlike the servers' (the report says so).
Every process is terminated and joined on the way out, whatever happens.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from bench.peers.dashboard import DEMO, PANELS, WINDOWS, DashboardMix, MixConfig, panel_sql

BOOT_TIMEOUT_S = 60.0
_TABLE = re.compile(r"\bFROM (cpu|mem|disk)\b")


class HourFiles:
    """The Parquet files of each (measurement, hour) under <data_dir>/<database>/, from the
    directory names of Arc's layout."""

    def __init__(self, data_dir: Path, database: str = "default"):
        self.files: dict[tuple[str, datetime], list[str]] = {}
        for path in sorted((Path(data_dir) / database).glob("*/*/*/*/*/*.parquet")):
            measurement, y, m, d, h = path.parts[-6:-1]
            hour = datetime(int(y), int(m), int(d), int(h))
            self.files.setdefault((measurement, hour), []).append(str(path))

    def window(self, measurement: str, lo: datetime, hi: datetime) -> list[str]:
        """Files of the hours that overlap [lo, hi)."""
        hour, found = lo.replace(minute=0, second=0, microsecond=0), []
        while hour < hi:
            found += self.files.get((measurement, hour), [])
            hour += timedelta(hours=1)
        return found

    def sql(self, panel: str, end: datetime, length: timedelta) -> str:
        """The panel's query with each table replaced by read_parquet of its window's files."""
        def table(match: re.Match) -> str:
            files = self.window(match.group(1), end - length, end)
            if not files:
                raise LookupError(f"no {match.group(1)} files for {end - length} .. {end}")
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            return f"FROM read_parquet([{listed}], union_by_name = true) AS {match.group(1)}"
        return _TABLE.sub(table, panel_sql(panel, end, length))


def _loop(boot: list[str], seed: int, epoch: float | None, ready, duration: float, out,
          config: MixConfig, pruned_dir: str | None) -> None:
    con = duckdb.connect(config={"threads": 1})
    for statement in boot:
        con.execute(statement)
    hours = HourFiles(Path(pruned_dir)) if pruned_dir else None
    render = hours.sql if hours else panel_sql
    for panel in PANELS:  # warm: the same as the servers' warm-up
        con.execute(render(panel, config.now0, next(iter(WINDOWS)))).fetchall()
    mix = DashboardMix(seed, epoch, config)
    ready.wait(BOOT_TIMEOUT_S)
    count, stop_at = 0, time.perf_counter() + duration
    while time.perf_counter() < stop_at:
        con.execute(render(*mix.next_panel())).fetchall()
        count += 1
    out.put(count)


def ceiling_qps(boot: list[str], processes: int, duration: float, epoch: float | None, seed: int,
                config: MixConfig = DEMO, pruned_dir: Path | None = None) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_loop, args=(boot, seed * 1000 + n, epoch, ready, duration, out,
                                             config, str(pruned_dir) if pruned_dir else None),
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
            "qps": total / duration, "form": "pruned file lists" if pruned_dir else "views over the glob"}
