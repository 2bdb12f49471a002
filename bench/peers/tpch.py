"""TPC-H: the 22 queries, sequentially and at concurrency 4, each result checked.

The reference is in-process DuckDB with one thread on the same Parquet files. A peer's result
must have the same columns and rows: in order where the query has an ORDER BY, as a multiset
otherwise, with floats equal to a relative 1e-6 (bench/answers.py's rules). A wrong result is
a mismatch and fails the run.

Every peer gets the same treatment (`run`): one untimed warm pass, checked (the reference's own
peer has had it: the pass that made the reference), then `runs` timed sequential passes and one
pass at CONCURRENCY; the statistic is the median of the passes' totals. Two peers whose ratio
is a target run `side_by_side`: their timed passes interleaved, query by query. A query that errors
(Arc's pool timeout, a Quack transport error) is a failure: its pass has no total (None, shown
as failed), never a total without that query's time.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time

import pyarrow as pa

from bench.answers import same_value, sort_key
from bench.peers.loadgen import fetch_arrow
from bench.peers.servers import Peer

CONCURRENCY = 4


def fetch(peer: Peer, sql: str) -> pa.Table:
    if peer.kind == "http":
        return fetch_arrow(peer.port, sql)
    cursor = peer.cursor()
    try:
        return cursor.sql(peer.sql_for(sql)).arrow().read_all()
    finally:
        cursor.close()


def mismatch(sql: str, got: pa.Table, want: pa.Table) -> str | None:
    """None when got matches want, else what differs."""
    if got.num_columns != want.num_columns:
        return f"{got.num_columns} columns, expected {want.num_columns}"
    if got.num_rows != want.num_rows:
        return f"{got.num_rows} rows, expected {want.num_rows}"
    rows_got = list(zip(*(c.to_pylist() for c in got.columns)))
    rows_want = list(zip(*(c.to_pylist() for c in want.columns)))
    if "order by" not in sql.lower():
        rows_got.sort(key=sort_key)
        rows_want.sort(key=sort_key)
    for n, (a, b) in enumerate(zip(rows_got, rows_want)):
        if not all(same_value(x, y) for x, y in zip(a, b)):
            return f"row {n}: {a!r} != {b!r}"
    return None


def _one(peer: Peer, number: int, sql: str, reference: dict[int, pa.Table]) -> dict:
    started = time.perf_counter()
    try:
        table = fetch(peer, sql)
    except Exception as exc:  # an error is that peer's result: a failure, counted
        return {"query": number, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    seconds = time.perf_counter() - started
    return {"query": number, "seconds": seconds, "rows": table.num_rows,
            "mismatch": mismatch(sql, table, reference[number])}


def run(peer: Peer, queries: dict[int, str], reference: dict[int, pa.Table], runs: int,
        warm: bool = True) -> dict:
    """A warm pass (unless the peer made the reference), `runs` timed sequential passes (the
    median of their totals, None when any pass had an error) and one pass at CONCURRENCY."""
    return side_by_side([peer], queries, reference, runs, warm)[0]


def side_by_side(peers: list[Peer], queries: dict[int, str], reference: dict[int, pa.Table],
                 runs: int, warm: bool = True) -> list[dict]:
    """`run` for several peers at once: their timed passes interleaved query by query (each
    query on every peer in turn), so a machine that speeds up or slows down meanwhile moves
    every peer's total alike and their ratio holds."""
    errors: list[list] = [[] for _ in peers]
    mismatches: list[list] = [[] for _ in peers]

    def record(i: int, r: dict, phase: str) -> None:
        if "error" in r:
            errors[i].append({**r, "phase": phase})
        elif r["mismatch"]:
            mismatches[i].append({"query": r["query"], "mismatch": r["mismatch"], "phase": phase})

    if warm:
        for i, peer in enumerate(peers):
            for number, sql in queries.items():
                record(i, _one(peer, number, sql, reference), "warm")
    totals: list[list] = [[] for _ in peers]
    per_query: list[dict] = [{} for _ in peers]
    for n in range(runs):
        total, failed = [0.0] * len(peers), [False] * len(peers)
        for number, sql in queries.items():
            for i, peer in enumerate(peers):
                r = _one(peer, number, sql, reference)
                record(i, r, f"run {n + 1}")
                if "error" in r:
                    failed[i] = True
                    continue
                total[i] += r["seconds"]
                per_query[i].setdefault(number, []).append(r["seconds"])
        for i in range(len(peers)):
            totals[i].append(None if failed[i] else total[i])
    results = []
    for i, peer in enumerate(peers):
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            parallel = list(pool.map(lambda item: _one(peer, *item, reference), queries.items()))
        wall = time.perf_counter() - started
        for r in parallel:
            record(i, r, f"c={CONCURRENCY}")
        results.append({
            "sequential_total_s": None if None in totals[i] else statistics.median(totals[i]),
            "sequential_runs": totals[i], "warm_pass": warm,
            "concurrent_wall_s": None if any("error" in r for r in parallel) else wall,
            "concurrency": CONCURRENCY,
            "per_query_s": {str(n): statistics.median(t) for n, t in per_query[i].items()},
            "errors": errors[i], "mismatches": mismatches[i], "complete": not errors[i]})
    return results


def reference_tables(peer: Peer, queries: dict[int, str]) -> dict[int, pa.Table]:
    return {n: fetch(peer, sql) for n, sql in queries.items()}
