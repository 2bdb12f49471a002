"""Admission and streaming benchmark, in one run:

    python -m bench.admission [--quick]

1. 10M-row Arrow through duckfleet against in-process DuckDB (`con.sql(q).arrow().read_all()`,
   one thread like a worker), as a ratio of medians; the client parses while it downloads.
2. Time to first byte for 1M and 10M rows (Arrow): request sent -> first body byte.
3. Result handoff into shared memory: writing 8 MiB chunks with ChunkWriter into fresh
   segments against pre-allocated (reused) ones, in GB/s.
4. Overload: an open-loop client offers 4x the fleet's measured capacity for a fixed time
   against a small queue; p50/p99 of admitted queries, p50/p99 of rejections (503), and the
   RSS of the gateway and workers before and after.

Starts its own server on a free loopback port; writes bench/results/admission.json.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import aiohttp
import duckdb

from bench.common import demo_server, fetch_arrow, percentile, timed, write_report
from engine.shm import SHM_DIR, ChunkWriter
from gateway.segments import Segment
from harness.server import Server

TEN_MILLION = "SELECT i, i * 2 AS j, i % 7 AS k FROM range(10000000) t(i)"
DASHBOARD = ("SELECT host, avg(usage_user) AS usage FROM cpu WHERE time >= '2025-11-03' "
             "AND time < '2025-11-03 06:00' GROUP BY host ORDER BY host")


def large(server: Server, runs: int) -> dict:
    local = duckdb.connect(config={"threads": 1})
    fetch_arrow(server.port, TEN_MILLION)  # warm
    fleet, ttfb = [], {}
    for _ in range(runs):
        started = time.perf_counter()
        first, table = fetch_arrow(server.port, TEN_MILLION)
        fleet.append(time.perf_counter() - started)
        assert table.num_rows == 10_000_000
    inproc = timed(lambda: local.sql(TEN_MILLION).arrow().read_all(), runs)
    for rows in (1_000_000, 10_000_000):
        sql = f"SELECT i, i * 2 AS j, i % 7 AS k FROM range({rows}) t(i)"
        ttfb[f"arrow_{rows}_ms"] = statistics.median(fetch_arrow(server.port, sql)[0] for _ in range(runs)) * 1000
    return {"arrow_10M_duckfleet_s": statistics.median(fleet),
            "arrow_10M_in_process_s": statistics.median(inproc),
            "ratio": statistics.median(fleet) / statistics.median(inproc),
            "ttfb": ttfb}


def handoff(rounds: int) -> dict:
    """GB/s of ChunkWriter into fresh segments against pre-allocated, reused ones."""
    chunk = 8 * 2**20
    payload = os.urandom(chunk)
    out = {}
    for mode in ("fresh", "reused"):
        pool = [Segment(f"duckfleet.bench-{os.getpid()}-{mode}-{i}", chunk) for i in range(4)] \
            if mode == "reused" else []
        elapsed = 0.0
        for n in range(rounds):
            if mode == "fresh":
                name = f"duckfleet.bench-{os.getpid()}-fresh-{n}"
                fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            else:
                name = pool[n % len(pool)].name
            started = time.perf_counter()
            with ChunkWriter(name, chunk, 0, lambda *_: None, lambda: name) as writer:
                writer.write(payload)
            elapsed += time.perf_counter() - started
            if mode == "fresh":
                os.close(fd)
                (SHM_DIR / name).unlink()
        for segment in pool:
            segment.destroy()
        out[f"{mode}_GBps"] = rounds * chunk / elapsed / 1e9
    return out


async def _closed_loop(port: int, seconds: float, concurrency: int) -> float:
    body = json.dumps({"sql": DASHBOARD}).encode()
    done, deadline = 0, time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        async def client():
            nonlocal done
            while time.monotonic() < deadline:
                async with session.post(f"http://127.0.0.1:{port}/api/v1/query", data=body) as r:
                    await r.read()
                    done += r.status == 200
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / seconds


async def _open_loop(port: int, rate: float, seconds: float) -> dict:
    body = json.dumps({"sql": DASHBOARD}).encode()
    ok, rejected, other = [], [], 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one():
            nonlocal other
            started = time.perf_counter()
            async with session.post(f"http://127.0.0.1:{port}/api/v1/query", data=body) as r:
                await r.read()
            (ok if r.status == 200 else rejected if r.status == 503 else [None]).append(
                time.perf_counter() - started)
            other += r.status not in (200, 503)
        tasks, start = [], time.monotonic()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    return {"offered": n, "admitted": len(ok), "rejected": len(rejected), "other": other,
            "admitted_p50_ms": percentile(ok, 50) * 1000 if ok else None,
            "admitted_p99_ms": percentile(ok, 99) * 1000 if ok else None,
            "rejected_p50_ms": percentile(rejected, 50) * 1000 if rejected else None,
            "rejected_p99_ms": percentile(rejected, 99) * 1000 if rejected else None}


def rss_mb(server: Server) -> dict:
    return {p.pid: round(p.memory_info().rss / 2**20, 1) for p in server.children()}


def overload(server: Server, seconds: float) -> dict:
    capacity = asyncio.run(_closed_loop(server.port, seconds / 2, 2 * server.workers))
    before = rss_mb(server)
    result = asyncio.run(_open_loop(server.port, 4 * capacity, seconds))
    after = rss_mb(server)
    return {"capacity_qps": capacity, "offered_qps": 4 * capacity, **result,
            "rss_mb_before": before, "rss_mb_after": after}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    runs, seconds, rounds = (3, 6, 30) if args.quick else (7, 20, 120)
    with demo_server(config="[queue]\nmax_queue_size = 16\nqueue_timeout_s = 0.5\n") as server:
        report = {"large": large(server, runs), "handoff": handoff(rounds),
                  "overload": overload(server, seconds)}
    write_report("admission", report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
