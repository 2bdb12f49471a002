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


class _Side:
    """One peer's passes: their errors and mismatches, each timed pass's total."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self.errors: list[dict] = []
        self.mismatches: list[dict] = []
        self.totals: list[float | None] = []  # None: a query of that pass failed
        self.per_query: dict[int, list[float]] = {}

    def record(self, r: dict, phase: str) -> None:
        if "error" in r:
            self.errors.append({**r, "phase": phase})
        elif r["mismatch"]:
            self.mismatches.append({"query": r["query"], "mismatch": r["mismatch"], "phase": phase})

    def timed_pass(self, results: list[dict]) -> None:
        for r in results:
            if "error" not in r:
                self.per_query.setdefault(r["query"], []).append(r["seconds"])
        failed = any("error" in r for r in results)
        self.totals.append(None if failed else sum(r["seconds"] for r in results))


def side_by_side(peers: list[Peer], queries: dict[int, str], reference: dict[int, pa.Table],
                 runs: int, warm: bool = True) -> list[dict]:
    """`run` for several peers at once: their timed passes interleaved query by query (each
    query on every peer in turn), so a machine that speeds up or slows down meanwhile moves
    every peer's total alike and their ratio holds."""
    sides = [_Side(peer) for peer in peers]
    if warm:
        for side in sides:
            for number, sql in queries.items():
                side.record(_one(side.peer, number, sql, reference), "warm")
    for n in range(runs):
        timed: list[list[dict]] = [[] for _ in sides]
        for number, sql in queries.items():
            for side, results in zip(sides, timed):
                results.append(_one(side.peer, number, sql, reference))
                side.record(results[-1], f"run {n + 1}")
        for side, results in zip(sides, timed):
            side.timed_pass(results)
    out = []
    for side in sides:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            parallel = list(pool.map(lambda item: _one(side.peer, *item, reference), queries.items()))
        wall = time.perf_counter() - started
        for r in parallel:
            side.record(r, f"c={CONCURRENCY}")
        out.append({
            "sequential_total_s": None if None in side.totals else statistics.median(side.totals),
            "sequential_runs": side.totals, "warm_pass": warm,
            "concurrent_wall_s": None if any("error" in r for r in parallel) else wall,
            "concurrency": CONCURRENCY,
            "per_query_s": {str(n): statistics.median(t) for n, t in side.per_query.items()},
            "errors": side.errors, "mismatches": side.mismatches, "complete": not side.errors})
    return out


def reference_tables(peer: Peer, queries: dict[int, str]) -> dict[int, pa.Table]:
    return {n: fetch(peer, sql) for n, sql in queries.items()}
