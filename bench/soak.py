"""Fleet-management benchmark: a soak with memory hygiene on and off, and queries lost to a
reload and to chaos, in one run:

    python -m bench.soak [--queries 20000] [--quick]

Variants, each a fresh server with one worker per core, running the same closed-loop mix
(4 clients; 1 in 5 queries a 100k-row Arrow result, the rest small dashboard aggregates):
  hygiene_on   the defaults (gen-0 GC each query, full GC every 100, malloc_trim(0) on RSS
               growth, a fresh DuckDB connection past reconnect_growth_mb)
  hygiene_off  none of it
  arc_trigger  hygiene on, plus Arc's trigger: a fresh connection after any result over 5000 rows
               (a quarter as many queries: it compares cost, not drift)
For each: every worker's RSS after warm-up (the first 10% of queries), at the end and at its
peak; p50 of the small queries; DuckDB reconnects. Then, on the hygiene_on server: a SIGHUP
reload and 10 s of SIGKILLing a random worker every 200 ms, both under load, with the queries
lost and answered wrongly. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time

from bench.common import demo_server, percentile, write_report
from harness.server import wait_for

SMALL = ("SELECT host, avg(usage_user) AS u, max(usage_system) AS s FROM cpu "
         "WHERE time >= TIMESTAMP '2025-11-0{d}' AND time < TIMESTAMP '2025-11-0{d}' + INTERVAL 3 HOUR "
         "GROUP BY host ORDER BY host")
LARGE = "SELECT time, host, usage_user FROM cpu LIMIT 100000 OFFSET {o}"
VARIANTS = {
    "hygiene_on": "",
    "hygiene_off": "[workers]\nhygiene = false\n",
    "arc_trigger": "[workers]\nreconnect_after_rows = 5000\n",
}


def soak(server, queries: int, clients: int = 4) -> dict:
    rss: dict[int, list[int]] = {}
    small_latency: list[float] = []
    counter = iter(range(queries))
    errors = []
    warm = threading.Event()

    def client():
        for n in counter:
            if n == queries // 10:
                warm.set()
            started = time.perf_counter()
            if n % 5 == 0:
                resp = server.query(LARGE.format(o=(n * 7919) % 200_000), format="arrow")
            else:
                resp = server.query(SMALL.format(d=1 + n % 7))
                if warm.is_set():
                    small_latency.append(time.perf_counter() - started)
            if resp.status != 200:
                errors.append(resp.status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    samples_after_warm: dict[int, list[int]] = {}
    while any(t.is_alive() for t in threads):
        for w in server.stats()["workers"]:
            rss.setdefault(w["pid"], []).append(w["rss_bytes"] or 0)
            if warm.is_set():
                samples_after_warm.setdefault(w["pid"], []).append(w["rss_bytes"] or 0)
        time.sleep(0.25)
    for t in threads:
        t.join()
    stats = server.stats()
    mib = 2**20
    probe = []  # hygiene's cost per query: SELECT 1 one at a time, nothing else running
    for _ in range(500):
        started = time.perf_counter()
        server.query("SELECT 1")
        probe.append(time.perf_counter() - started)
    workers = {
        str(pid): {"start_mb": round(s[0] / mib, 1), "end_mb": round(s[-1] / mib, 1),
                   "peak_mb": round(max(rss[pid]) / mib, 1),
                   "end_vs_start": round(s[-1] / s[0], 3)}
        for pid, s in samples_after_warm.items() if s}
    return {"queries": queries, "errors": len(errors), "workers": workers,
            "small_p50_ms": round(statistics.median(small_latency) * 1000, 3),
            "small_p99_ms": round(percentile(small_latency, 99) * 1000, 3),
            "select_1_sequential_p50_ms": round(statistics.median(probe) * 1000, 3),
            "reconnects": sum(w["connections"] - 1 for w in stats["workers"])}


def under_load(server, action, seconds: float) -> dict:
    """Run `action` while 4 clients check every answer; count lost and wrong answers."""
    stop, counts = threading.Event(), {"ok": 0, "wrong": 0, "lost": 0}

    def client(n):
        i = 0
        while not stop.is_set():
            k = n * 1_000_000 + i
            try:
                resp = server.query(f"SELECT {k} AS k, sum(x) AS s FROM range(1000) t(x)", timeout=60)
                good = resp.status == 200 and resp.json()["data"] == [[k, 499500]]
                counts["ok" if good else "wrong" if resp.status == 200 else "lost"] += 1
            except OSError:
                counts["lost"] += 1
            i += 1
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    extra = action(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return {**counts, **(extra or {})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 queries a variant")
    args = parser.parse_args(argv)
    queries = 2_000 if args.quick else args.queries
    report = {}
    for name, config in VARIANTS.items():
        with demo_server(config=config + "[queue]\nqueue_timeout_s = 60\n") as server:
            # Arc's trigger is a comparison of cost, not of drift: a quarter of the queries do.
            report[name] = soak(server, queries if name != "arc_trigger" else queries // 4)
            print(name, json.dumps(report[name]), flush=True)
            if name != "hygiene_on":
                continue

            def reload(_):
                server.send_signal(signal.SIGHUP)
                wait_for(lambda: server.event("reloaded"), 120, what="the reload")
                time.sleep(0.5)

            def chaos(seconds):
                kills, deadline = 0, time.monotonic() + seconds
                while time.monotonic() < deadline:
                    pids = server.processes("engine.worker")
                    if pids:
                        os.kill(random.choice(pids), signal.SIGKILL)
                        kills += 1
                    time.sleep(0.2)
                return {"sigkills": kills}
            report["reload"] = under_load(server, reload, 0)
            report["chaos"] = under_load(server, chaos, 10)
            print("reload", report["reload"], "chaos", report["chaos"], flush=True)
    print(json.dumps(report, indent=2))
    write_report("soak", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
