"""Foundation benchmark: duckfleet over HTTP against in-process DuckDB, in one run.

    python -m bench.foundation [--quick] [--workers 2]

1. Large Arrow results (1M and 10M rows): in-process `con.sql(q).arrow().read_all()` against
   POST /api/v1/query/arrow read into a pyarrow Table by a client in this process. Medians of
   several runs, reported as a ratio (duckfleet / in-process).
2. Latency of `SELECT 1` and a small dashboard aggregate at concurrency 1 and 16: p50 and p99,
   duckfleet against in-process DuckDB (threads sharing one database, one cursor each).

It starts its own server on a free loopback port, with demo data in a temporary directory,
and writes bench/results/foundation.json. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time

import aiohttp
import duckdb

from bench.common import demo_server, fetch_arrow, percentile, timed, write_report
from harness.server import Server

LARGE = {n: f"SELECT i, i * 2 AS j, i % 7 AS k FROM range({n}) t(i)" for n in (1_000_000, 10_000_000)}
SMALL = {
    "select_1": "SELECT 1",
    "small_aggregate": "SELECT host, avg(usage_user) AS usage FROM cpu WHERE time >= '2025-11-03' "
                       "AND time < '2025-11-04' GROUP BY host ORDER BY host",
}


def large_results(server: Server, local: duckdb.DuckDBPyConnection, runs: int) -> dict:
    out = {}
    for rows, sql in LARGE.items():
        def through_duckfleet():
            assert fetch_arrow(server.port, sql)[1].num_rows == rows

        def in_process():
            assert local.sql(sql).arrow().read_all().num_rows == rows  # the baseline

        through_duckfleet()  # warm: touches the segment pages once, as a running server has
        fleet = timed(through_duckfleet, runs)
        inproc = timed(in_process, runs)
        out[f"arrow_{rows}"] = {
            "duckfleet_s": statistics.median(fleet), "in_process_s": statistics.median(inproc),
            "ratio": statistics.median(fleet) / statistics.median(inproc),
            "runs": runs,
        }
    return out


async def _http_latencies(port: int, sql: str, concurrency: int, per_client: int) -> list[float]:
    latencies: list[float] = []
    body = json.dumps({"sql": sql}).encode()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client():
            for _ in range(per_client):
                started = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/api/v1/query", data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    assert resp.status == 200, await resp.text()
                latencies.append(time.perf_counter() - started)
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies


def _local_latencies(db: duckdb.DuckDBPyConnection, sql: str, concurrency: int,
                     per_client: int) -> list[float]:
    latencies: list[float] = []

    def client():
        cursor = db.cursor()
        for _ in range(per_client):
            started = time.perf_counter()
            cursor.sql(sql).fetchall()
            latencies.append(time.perf_counter() - started)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def latency(server: Server, local: duckdb.DuckDBPyConnection, requests: int) -> dict:
    out = {}
    for name, sql in SMALL.items():
        for concurrency in (1, 16):
            per_client = max(1, requests // concurrency)
            asyncio.run(_http_latencies(server.port, sql, concurrency, 2))  # warm-up
            fleet = asyncio.run(_http_latencies(server.port, sql, concurrency, per_client))
            inproc = _local_latencies(local, sql, concurrency, per_client)
            out[f"{name}_c{concurrency}"] = {
                "duckfleet_p50_ms": percentile(fleet, 50) * 1000,
                "duckfleet_p99_ms": percentile(fleet, 99) * 1000,
                "in_process_p50_ms": percentile(inproc, 50) * 1000,
                "in_process_p99_ms": percentile(inproc, 99) * 1000,
                "requests": len(fleet),
            }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, for development")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    runs, requests = (3, 160) if args.quick else (7, 800)
    with demo_server(args.workers) as server:
        local = duckdb.connect(config={"threads": 1})
        local.execute("SET TimeZone = 'UTC'")
        local.execute(f"CREATE VIEW cpu AS SELECT * FROM "
                      f"read_parquet('{server.data_dir}/default/cpu/**/*.parquet')")
        local_mt = duckdb.connect()  # DuckDB's default: one thread per core
        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "duckdb": duckdb.__version__, "platform": platform.platform()},
            "workers": args.workers,
            "large_results": large_results(server, local, runs),
            "large_results_in_process_default_threads": {
                f"arrow_{rows}": statistics.median(timed(lambda: local_mt.sql(sql).arrow().read_all(), runs))
                for rows, sql in LARGE.items()},
            "latency": latency(server, local, requests),
        }
    write_report("foundation", report)
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    print(f"\nduckfleet foundation benchmark ({report['workers']} workers, "
          f"{report['machine']['cpus']} cores, duckdb {report['machine']['duckdb']})")
    print("\nLarge Arrow results (median s; in-process = one thread, as a worker)")
    print(f"{'query':<16}{'duckfleet':>12}{'in-process':>12}{'ratio':>8}{'in-proc, all threads':>24}")
    for name, row in report["large_results"].items():
        mt = report["large_results_in_process_default_threads"][name]
        print(f"{name:<16}{row['duckfleet_s']:>12.3f}{row['in_process_s']:>12.3f}"
              f"{row['ratio']:>8.2f}{mt:>24.3f}")
    print("\nLatency (ms)")
    print(f"{'query':<22}{'fleet p50':>10}{'fleet p99':>10}{'local p50':>10}{'local p99':>10}")
    for name, row in report["latency"].items():
        print(f"{name:<22}{row['duckfleet_p50_ms']:>10.2f}{row['duckfleet_p99_ms']:>10.2f}"
              f"{row['in_process_p50_ms']:>10.2f}{row['in_process_p99_ms']:>10.2f}")


if __name__ == "__main__":
    sys.exit(main())
