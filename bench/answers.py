"""Is an answer right? Rows from any peer compared with in-process DuckDB's for the same SQL.

Owns the comparison every benchmark shares (bench.history, bench.peers' dashboard mix; TPC-H
compares Arrow tables with the same value rules): values are brought to one form first
(`canonical`: a timestamp, whether DuckDB's datetime, duckfleet's JSON string or the Arc-style
tier's `str(datetime)`, becomes a naive UTC datetime), floats agree to a relative 1e-6 (sums
in another order round differently), rows agree in order or, where ORDER BY leaves ties, as a
multiset; and a top-N whose cut falls in a tie may return any of the tied rows.

`Reference` holds every row of a data directory in memory, read through the glob with
union_by_name, so its answers depend on no file list and no pruning; `expect` computes the
answers of many queries once (before a load, so the check takes no CPU from it).
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from bench.peers.datasets import DEMO_TABLES

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")
TOP_N = re.compile(r"\s+ORDER BY (\w+)(?: DESC)?\s+LIMIT \d+\s*$", re.I)


def canonical(value):
    """One form for a value, whichever client carried it."""
    if isinstance(value, str) and _TIMESTAMP.match(value):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def canonical_rows(rows) -> list[tuple]:
    return [tuple(canonical(v) for v in row) for row in rows]


def sort_key(row: tuple) -> tuple:
    return tuple(("0", "") if v is None else ("f", float(f"{v:.6g}")) if isinstance(v, float)
                 else ("s", str(v)) for v in row)


def same_value(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def same_row(a, b) -> bool:
    return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))


def wrong_answer(got: list, want: list) -> str | None:
    """None when the rows agree (in order; or as a multiset, where ORDER BY leaves ties)."""
    got, want = canonical_rows(got), canonical_rows(want)
    if len(got) != len(want):
        return f"{len(got)} rows, expected {len(want)}"
    if all(same_row(a, b) for a, b in zip(got, want)):
        return None
    for n, (a, b) in enumerate(zip(sorted(got, key=sort_key), sorted(want, key=sort_key))):
        if not same_row(a, b):
            return f"row {n}: {a!r} != {b!r}"
    return None


class Reference:
    """In-process DuckDB over every row of `data_dir`'s demo tables; answers are memoized."""

    def __init__(self, data_dir: Path):
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        self.answers: dict[str, list[tuple]] = {}
        for table in DEMO_TABLES:
            glob = f"{data_dir}/default/{table}/**/*.parquet".replace("'", "''")
            self.con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet('{glob}', "
                             "union_by_name = true)")

    def rows(self, sql: str) -> list[tuple]:
        if sql not in self.answers:
            self.answers[sql] = canonical_rows(self.con.execute(sql).fetchall())
        return self.answers[sql]

    def expect(self, queries) -> int:
        """Compute (and keep) the answers of every query not yet known; how many were new."""
        new = [sql for sql in dict.fromkeys(queries) if sql not in self.answers]
        for sql in new:
            self.rows(sql)
        return len(new)

    def close(self) -> None:
        self.con.close()


def check_answer(reference: Reference, sql: str, got: list, columns: list[str] | None) -> str | None:
    """wrong_answer against the reference; for `ORDER BY <column> LIMIT n` whose cut falls in a
    tie, any of the tied rows is right: then the rows must all be rows of the unlimited result,
    with the same sort keys as the reference's."""
    want = reference.rows(sql)
    problem = wrong_answer(got, want)
    top = TOP_N.search(sql)
    if problem is None or top is None or not columns or top.group(1) not in columns:
        return problem
    got = canonical_rows(got)
    key = columns.index(top.group(1))
    unlimited = reference.rows(sql[:top.start()] + f" ORDER BY {top.group(1)}")
    keys_got = sorted(float(r[key]) for r in got)
    keys_want = sorted(float(r[key]) for r in want)
    if len(got) != len(want) or not all(same_value(a, b) for a, b in zip(keys_got, keys_want)):
        return problem
    left = list(unlimited)
    for row in got:
        match = next((i for i, r in enumerate(left) if same_row(row, r)), None)
        if match is None:
            return problem
        left.pop(match)
    return None
