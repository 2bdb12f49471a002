"""The dashboard mix and large results, measured against one running peer.

Dashboard: after a warm-up (every panel once), closed-loop runs at each concurrency, repeated
`runs` times; the peak RSS of every process of the peer is sampled during each run. Large
results: Arrow (read into a pyarrow Table) and JSON (the whole body received, not parsed) of
1M and 10M rows, seconds and rows a second; a measurement whose first run takes longer than
SLOW_S is not repeated, so a slow peer cannot blow the time budget.
"""

from __future__ import annotations

import re
import statistics
import time

from bench.peers.dashboard import NOW0, PANELS, WINDOWS, DashboardMix, panel_sql
from bench.peers.loadgen import closed_loop, fetch_arrow, post
from bench.peers.servers import Peer, RssSampler

LARGE = {n: f"SELECT i, i * 2 AS j, i % 7 AS k FROM range({n}) t(i)" for n in (1_000_000, 10_000_000)}
SLOW_S = 15.0


def warm(peer: Peer) -> None:
    for panel in PANELS:
        sql = panel_sql(panel, NOW0, next(iter(WINDOWS)))
        if peer.kind == "http":
            status, body = post(peer.port, "/api/v1/query", sql)
            if status != 200:
                raise RuntimeError(f"{peer.name} warm-up: {status} {body[:300]!r}")
        else:
            cursor = peer.cursor()
            cursor.execute(peer.sql_for(sql)).fetchall()
            cursor.close()


def dashboard(peer: Peer, concurrencies: list[int], duration: float, runs: int, epoch: float) -> dict:
    warm(peer)
    per_c: dict[int, list[dict]] = {c: [] for c in concurrencies}
    for run in range(runs):
        for c in concurrencies:
            mixes = [DashboardMix(seed=run * 10_000 + c * 100 + n, epoch=epoch) for n in range(c)]
            with RssSampler(peer.pids) as rss:
                stats = closed_loop(peer, lambda n: mixes[n].next(), c, duration)
            stats["rss"] = rss.summary()
            per_c[c].append(stats)
    return {str(c): summarize(rows) for c, rows in per_c.items()}


def summarize(rows: list[dict]) -> dict:
    """Medians over runs of the rates and percentiles; sums of counts; the worst peak RSS."""
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    kinds: dict[str, int] = {}
    for r in rows:
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    return {"qps": med("qps"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "requests": sum(r["requests"] for r in rows), "errors": sum(r["errors"] for r in rows),
            "error_kinds": kinds, "client_cpu_share": med("client_cpu_share"),
            "distinct_query_share": med("distinct_query_share"),
            "peak_rss_total_mb": max(r["rss"]["peak_total_mb"] for r in rows),
            "peak_rss_by_process_mb": rows[-1]["rss"]["peak_by_process_mb"],
            "runs": [{k: r[k] for k in ("qps", "p50_ms", "p99_ms", "errors")} for r in rows]}


def _fetch(peer: Peer, fmt: str, sql: str, rows: int) -> None:
    if peer.kind == "http" and fmt == "arrow":
        got = fetch_arrow(peer.port, sql).num_rows
    elif peer.kind == "http":
        status, body = post(peer.port, "/api/v1/query", sql)
        if status != 200:
            raise RuntimeError(f"{status}: {body[:200]!r}")
        # Arc's JSON shape ends with its row count: read it there, not by parsing every row
        # (that would time the client's parser, not the server).
        found = re.search(rb'"row_count":\s*(\d+)', body[-512:])
        got = int(found.group(1)) if found else -1
    elif peer.kind == "flight":  # ADBC's fetch_arrow_table: the whole result as a pyarrow Table
        cursor = peer.cursor()
        try:
            got = cursor.execute(sql).fetch_arrow_table().num_rows
        finally:
            cursor.close()
    else:
        got = peer.cursor().sql(peer.sql_for(sql)).arrow().read_all().num_rows
    if got != rows:
        raise RuntimeError(f"{got} rows, expected {rows}")


def large_results(peer: Peer, runs: int, json_max_rows: int) -> dict:
    out = {}
    for rows, sql in LARGE.items():
        for fmt in ("arrow", "json"):
            if fmt == "json" and rows > json_max_rows:
                continue
            if fmt == "json" and peer.kind != "http":
                continue  # a DuckDB client gets Arrow-like batches; there is no JSON to time
            times, error = [], None
            with RssSampler(peer.pids) as rss:
                for _ in range(runs):
                    started = time.perf_counter()
                    try:
                        _fetch(peer, fmt, sql, rows)
                    except Exception as exc:  # a failure is a result: recorded, not fatal
                        error = f"{type(exc).__name__}: {str(exc)[:200]}"
                        break
                    times.append(time.perf_counter() - started)
                    if times[-1] > SLOW_S:
                        break
            seconds = statistics.median(times) if times else None
            out[f"{fmt}_{rows}"] = {"seconds": seconds, "rows_per_s": rows / seconds if seconds else None,
                                    "runs": len(times), "error": error,
                                    "peak_rss_total_mb": rss.summary()["peak_total_mb"]}
    return out
