"""The dashboard mix and large results, measured against one running peer.

Dashboard: after a warm-up (every panel once), the plan's segments (mixcheck.py: each run at
each concurrency, the same queries for every peer), closed loop; the peak RSS of every process
of the peer is sampled during each, and its answers are checked after it (the warm-up's, a
fixed sample of at least 10%, every one a cache served). Large
results: Arrow (read into a pyarrow Table) and JSON (the whole body received, not parsed) of
1M and 10M rows, seconds and rows a second, a client connection of a DB-API peer (in-process
DuckDB, ADBC) opened before the runs of a measurement; a measurement whose first run takes
longer than SLOW_S is not repeated, so a slow peer cannot blow the time budget.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import time

import duckdb

from bench.answers import Reference, check_answer
from bench.peers import mixcheck
from bench.peers.loadgen import closed_loop, fetch_arrow, post
from bench.peers.servers import Peer, RssSampler

LARGE = {n: f"SELECT i, i * 2 AS j, i % 7 AS k FROM range({n}) t(i)" for n in (1_000_000, 10_000_000)}
IN_PROCESS = Peer("in-process-1thread", "duckdb")  # the baseline a server's large result is timed beside
SLOW_S = 15.0


def warm(peer: Peer, reference: Reference, queries: list[str]) -> list[dict]:
    """Each query once (mixcheck.warm_queries: every panel); its answer checked. An error is
    raised (the peer cannot be measured)."""
    wrong = []
    for sql in queries:
        if peer.kind == "http":
            status, body = post(peer.port, "/api/v1/query", sql)
            if status != 200:
                raise RuntimeError(f"{peer.name} warm-up: {status} {body[:300]!r}")
            doc = json.loads(body)
            rows, columns = doc["data"], doc["columns"]
        else:
            cursor = peer.cursor()
            try:
                result = cursor.execute(peer.sql_for(sql))
                rows, columns = result.fetchall(), [d[0] for d in result.description]
            finally:
                cursor.close()
        problem = check_answer(reference, sql, rows, columns)
        if problem:
            wrong.append({"sql": sql, "wrong": problem})
    return wrong


def dashboard(peer: Peer, segments: list[mixcheck.Segment], duration: float, reference: Reference,
              warm_sql: list[str]) -> dict:
    """{concurrency: summary over runs, "warm_up_wrong": [...]}; warm_sql first (may be empty)."""
    warm_wrong = warm(peer, reference, warm_sql)
    per_c: dict[int, list[dict]] = {}
    for segment in segments:
        keeper = mixcheck.Keeper()
        with RssSampler(peer.pids) as rss:
            stats = closed_loop(peer, segment.feeder(), segment.concurrency, duration,
                                on_reply=keeper.on_reply)
        stats["rss"] = rss.summary()
        stats["answers"] = mixcheck.check(keeper, reference)
        per_c.setdefault(segment.concurrency, []).append(stats)
    result = {str(c): summarize(rows) for c, rows in per_c.items()}
    result["warm_up_wrong"] = warm_wrong
    return result


def summarize(rows: list[dict]) -> dict:
    """Medians over runs of the rates and percentiles; sums of counts; the worst peak RSS."""
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    kinds: dict[str, int] = {}
    first: dict[str, str] = {}
    for r in rows:
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
        for k, v in r["first_errors"].items():
            first.setdefault(k, v)
    answers = {k: sum(r["answers"][k] for r in rows) for k in ("checked", "of", "cache_served", "wrong")}
    answers["wrong_examples"] = [e for r in rows for e in r["answers"]["wrong_examples"]][:5]
    return {"qps": med("qps"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "requests": sum(r["requests"] for r in rows), "errors": sum(r["errors"] for r in rows),
            "error_kinds": kinds, "first_errors": first, "answers": answers,
            "client_cpu_share": med("client_cpu_share"), "duration_s": med("duration_s"),
            "distinct_query_share": med("distinct_query_share"),
            "peak_rss_total_mb": max(r["rss"]["peak_total_mb"] for r in rows),
            "peak_rss_by_process_mb": rows[-1]["rss"]["peak_by_process_mb"],
            "runs": [{k: r[k] for k in ("qps", "p50_ms", "p99_ms", "errors", "duration_s")} for r in rows]}


def _fetch(peer: Peer, fmt: str, sql: str, rows: int, cursor=None) -> None:
    """One fetch; a DB-API peer's `cursor` is opened once for all runs (as an application
    keeps its connection), so a run times the query, not the connection's set-up."""
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
        got = cursor.execute(sql).fetch_arrow_table().num_rows
    else:
        got = cursor.sql(peer.sql_for(sql)).arrow().read_all().num_rows
    if got != rows:
        raise RuntimeError(f"{got} rows, expected {rows}")


def large_results(peer: Peer, runs: int, sizes: list[int], json_max_rows: int) -> dict:
    """Each size and format `runs` times; an Arrow run of a server's is preceded by the same
    query in this process's DuckDB (one thread, as a worker has): `baseline_seconds`, the
    median of those, is what the server's figure is a ratio of, timed alongside it."""
    out = {}
    baseline = duckdb.connect(config={"threads": 1}) if peer.kind != "duckdb" else None
    try:
        for rows in sizes:
            sql = LARGE[rows]
            for fmt in ("arrow", "json"):
                if fmt == "json" and rows > json_max_rows:
                    continue
                if fmt == "json" and peer.kind != "http":
                    continue  # a DuckDB client gets Arrow-like batches; there is no JSON to time
                alongside = baseline if fmt == "arrow" else None
                out[f"{fmt}_{rows}"] = _large(peer, fmt, sql, rows, runs, alongside)
    finally:
        if baseline is not None:
            baseline.close()
    return out


def _large(peer: Peer, fmt: str, sql: str, rows: int, runs: int, baseline) -> dict:
    times, base_times, error = [], [], None
    cursor = peer.cursor() if peer.kind != "http" else None
    with RssSampler(peer.pids) as rss, contextlib.closing(cursor) if cursor else \
            contextlib.nullcontext():
        for _ in range(runs):
            if baseline is not None:
                started = time.perf_counter()
                _fetch(IN_PROCESS, fmt, sql, rows, baseline)
                base_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            try:
                _fetch(peer, fmt, sql, rows, cursor)
            except Exception as exc:  # a failure is a result: recorded, not fatal
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
                break
            times.append(time.perf_counter() - started)
            if times[-1] > SLOW_S:
                break
    seconds = statistics.median(times) if times else None
    return {"seconds": seconds, "rows_per_s": rows / seconds if seconds else None,
            "runs": len(times), "error": error,
            "baseline_seconds": statistics.median(base_times) if base_times else None,
            "peak_rss_total_mb": rss.summary()["peak_total_mb"]}
