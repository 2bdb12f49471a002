"""TPC-H: the 22 queries, sequentially and at concurrency 4, each result checked.

The reference is in-process DuckDB with one thread on the same Parquet files. A peer's result
must have the same columns and rows: in order where the query has an ORDER BY, as a multiset
otherwise, with floats equal to a relative 1e-6 (sums in another order round differently).
A wrong result is a mismatch and fails the run; a peer that answers with an error (Arc's pool
timeout, a Quack transport error) has it recorded as its error count.
"""

from __future__ import annotations

import concurrent.futures
import math
import statistics
import time

import pyarrow as pa

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


def _sort_key(row: tuple) -> tuple:
    return tuple(("0", "") if v is None else ("f", float(f"{v:.6g}")) if isinstance(v, float)
                 else ("s", str(v)) for v in row)


def _same_value(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def mismatch(sql: str, got: pa.Table, want: pa.Table) -> str | None:
    """None when got matches want, else what differs."""
    if got.num_columns != want.num_columns:
        return f"{got.num_columns} columns, expected {want.num_columns}"
    if got.num_rows != want.num_rows:
        return f"{got.num_rows} rows, expected {want.num_rows}"
    rows_got = list(zip(*(c.to_pylist() for c in got.columns)))
    rows_want = list(zip(*(c.to_pylist() for c in want.columns)))
    if "order by" not in sql.lower():
        rows_got.sort(key=_sort_key)
        rows_want.sort(key=_sort_key)
    for n, (a, b) in enumerate(zip(rows_got, rows_want)):
        if not all(_same_value(x, y) for x, y in zip(a, b)):
            return f"row {n}: {a!r} != {b!r}"
    return None


def _one(peer: Peer, number: int, sql: str, reference: dict[int, pa.Table] | None) -> dict:
    started = time.perf_counter()
    try:
        table = fetch(peer, sql)
    except Exception as exc:  # an error is that peer's result, counted
        return {"query": number, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    seconds = time.perf_counter() - started
    wrong = mismatch(sql, table, reference[number]) if reference else None
    return {"query": number, "seconds": seconds, "rows": table.num_rows, "mismatch": wrong,
            "table": table}


def run(peer: Peer, queries: dict[int, str], reference: dict[int, pa.Table] | None,
        runs: int) -> dict:
    """Sequential totals (median of runs) and one run at CONCURRENCY; results checked each time."""
    totals, per_query, errors, mismatches = [], {}, [], []
    for _ in range(runs):
        total = 0.0
        for number, sql in queries.items():
            r = _one(peer, number, sql, reference)
            if "error" in r:
                errors.append(r)
                continue
            if r["mismatch"]:
                mismatches.append({"query": number, "mismatch": r["mismatch"]})
            total += r["seconds"]
            per_query.setdefault(number, []).append(r["seconds"])
        totals.append(total)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        parallel = list(pool.map(lambda item: _one(peer, *item, reference), queries.items()))
    wall = time.perf_counter() - started
    for r in parallel:
        if "error" in r:
            errors.append(r)
        elif r["mismatch"]:
            mismatches.append({"query": r["query"], "mismatch": r["mismatch"], "concurrent": True})
    return {"sequential_total_s": statistics.median(totals), "sequential_runs": totals,
            "concurrent_wall_s": wall, "concurrency": CONCURRENCY,
            "per_query_s": {str(n): statistics.median(t) for n, t in per_query.items()},
            "errors": [{k: v for k, v in e.items()} for e in errors], "mismatches": mismatches,
            "complete": not errors and len(per_query) == len(queries)}


def reference_tables(peer: Peer, queries: dict[int, str]) -> dict[int, pa.Table]:
    return {n: fetch(peer, sql) for n, sql in queries.items()}
