"""What the sandbox and DuckDB's Parquet metadata cache cost a query, in one DuckDB:

    python -m bench.profile [--quick]

The mix's 60 distinct queries (bench/peers/dashboard.py: its 20 panels, each with its three
window lengths ending at NOW0) over views of the demo data's globs (as bench.peers serves the
other peers), in one single-threaded in-process DuckDB, in four forms: plain; with
`parquet_metadata_cache = true`; sandboxed as a worker is (engine/sandbox.py: allowed_directories,
enable_external_access = false, locked configuration); sandboxed with the metadata cache. Each
form gets a fresh connection, one untimed pass, then `--runs` timed passes: the median over
passes of the mean milliseconds a query. Every answer of every form is compared with the plain
form's first pass (bench/answers.py); a difference exits 1. The forms run in turn, pass by
pass, so a noisy neighbour slows every form alike.

Prints the figures and writes bench/results/profile.json. Ratios against the plain form are
the figures to read (absolute milliseconds depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from bench.answers import wrong_answer
from bench.common import write_report
from bench.peers.dashboard import NOW0, PANELS, WINDOWS, panel_sql
from bench.peers.datasets import demo_views
from engine import sandbox
from engine.demo import write_demo

FORMS = {"plain": (False, False), "metadata_cache": (False, True), "sandboxed": (True, False),
         "sandboxed_metadata_cache": (True, True)}


def connect(data: Path, sandboxed: bool, metadata_cache: bool) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"threads": 1})
    for statement in demo_views(data):
        con.execute(statement)
    if metadata_cache:
        con.execute("SET parquet_metadata_cache = true")
    if sandboxed:
        sandbox.apply(con, [str(data)])
    return con


def one_pass(con: duckdb.DuckDBPyConnection, queries: list[str]) -> tuple[float, list]:
    """(mean ms a query, every answer)."""
    answers = []
    started = time.perf_counter()
    for sql in queries:
        answers.append(con.execute(sql).fetchall())
    return (time.perf_counter() - started) * 1000 / len(queries), answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed passes instead of 9")
    args = parser.parse_args(argv)
    runs = 3 if args.quick else 9
    queries = [panel_sql(panel, NOW0, length) for panel in PANELS for length in WINDOWS]
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    wrong: list[str] = []
    with tempfile.TemporaryDirectory(prefix="duckfleet-profile-") as tmp:
        data = Path(tmp) / "data"
        write_demo(data)
        cons = {form: connect(data, *flags) for form, flags in FORMS.items()}
        try:
            expected = None
            for form, con in cons.items():  # the untimed pass, checked
                _, answers = one_pass(con, queries)
                expected = expected or answers
                wrong += [f"{form}: {sql[:100]}: {problem}" for sql, got, want in zip(queries, answers, expected)
                          if (problem := wrong_answer(got, want))]
            for _ in range(runs):
                for form, con in cons.items():
                    ms, _ = one_pass(con, queries)
                    times[form].append(ms)
        finally:
            for con in cons.values():
                con.close()
    medians = {form: statistics.median(t) for form, t in times.items()}
    report = {"queries": len(queries), "runs": runs, "duckdb": duckdb.__version__,
              "ms_per_query": medians, "passes_ms": times,
              "ratio_to_plain": {form: medians[form] / medians["plain"] for form in FORMS},
              "wrong": wrong}
    for form in FORMS:
        print(f"{form:26s} {medians[form]:7.2f} ms a query ({report['ratio_to_plain'][form]:.2f}x plain; "
              f"median of {runs} passes of {len(queries)} queries)")
    print(f"wrote {write_report('profile', report)}")
    if wrong:
        print(json.dumps(wrong[:10], indent=1), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
