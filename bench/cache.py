"""Result cache benchmark, in one run:

    python -m bench.cache [--quick] [--workers 2]

1. The dashboard mix (bench/peers/dashboard.py: 20 panels, live windows aligned to the minute)
   at concurrency 32, closed loop, against duckfleet with the cache off and then on (TTL 60 s,
   as Arc's guide recommends): QPS, p50, p99, and the cache's own counts. Answers are checked
   as bench.peers checks them (a fixed 10% sample and every cache-served one, against in-process
   DuckDB: bench/peers/mixcheck.py).
2. A cache hit's latency over loopback HTTP (one keep-alive client, sequential; http.client,
   and a bare-socket client that spends almost nothing) against `SELECT 1` in in-process
   DuckDB (threads=1, back to back) and against GET /health, the floor of the HTTP stack.

Writes bench/results/cache.json; exits 1 on any error or wrong answer. Bounded in count and time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import duckdb

from bench.answers import Reference
from bench.common import percentile, write_report
from bench.peers import mixcheck, servers, workloads
from bench.peers.dashboard import NOW0, PANELS, WINDOWS, panel_sql
from engine.demo import write_demo

CACHE_ON = "[query_cache]\nenabled = true\nttl_seconds = 60\n"


def mix(tmp: Path, data: Path, workers: int, cache: bool, duration: float, runs: int,
        reference: Reference) -> dict:
    name = f"duckfleet-cache-{'on' if cache else 'off'}"
    segments = mixcheck.plan([32], runs, duration)
    reference.expect(mixcheck.to_expect(segments, mixcheck.warm_queries()))
    with servers.duckfleet(name, tmp, data, workers, CACHE_ON if cache else "") as peer:
        result = workloads.dashboard(peer, segments, duration, reference, mixcheck.warm_queries())
        out = result["32"]
        out["warm_up_wrong"] = result["warm_up_wrong"]
        out["cache"] = json.loads(_request(peer.port, "GET", "/api/v1/cache/stats")[1])
    return out


def _request(port: int, method: str, path: str, body: bytes | None = None,
             conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes, dict]:
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read(), dict(resp.getheaders())


def sequential_ms(fn, count: int) -> list[float]:
    for _ in range(count // 10):  # warm
        fn()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times


class RawClient:
    """A keep-alive HTTP/1.1 client on a bare socket: the least client time per request, so the
    figure is mostly the server's and the loopback's."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, body: bytes) -> bytes:
        self.sock.sendall(b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        assert b"x-cache: hit" in head.lower(), head
        return rest


def hit_latency(tmp: Path, data: Path, workers: int, count: int) -> dict:
    sql = panel_sql(next(iter(PANELS)), NOW0, next(iter(WINDOWS)))
    body = json.dumps({"sql": sql}).encode()
    with servers.duckfleet("duckfleet-hits", tmp, data, workers, CACHE_ON) as peer:
        conn = http.client.HTTPConnection("127.0.0.1", peer.port, timeout=60)

        def hit():
            status, _, headers = _request(peer.port, "POST", "/api/v1/query", body, conn)
            assert status == 200 and headers["X-Cache"] == "hit", (status, headers)

        _request(peer.port, "POST", "/api/v1/query", body, conn)  # the miss
        hits = sequential_ms(hit, count)
        raw = RawClient(peer.port)
        raw_hits = sequential_ms(lambda: raw.post(body), count)
        health = sequential_ms(lambda: _request(peer.port, "GET", "/health", None, conn), count)
    con = duckdb.connect(config={"threads": 1})
    select_1 = sequential_ms(lambda: con.execute("SELECT 1").fetchall(), count)
    summary = lambda ts: {"p50_ms": percentile(ts, 50), "p99_ms": percentile(ts, 99),  # noqa: E731
                          "mean_ms": statistics.fmean(ts), "count": len(ts)}
    out = {"hit": summary(hits), "hit_raw_socket_client": summary(raw_hits), "health": summary(health), "in_process_select_1": summary(select_1)}
    out["hit_p50_over_select_1_p50"] = out["hit"]["p50_ms"] / out["in_process_select_1"]["p50_ms"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    duration, runs, count = (3.0, 1, 500) if args.quick else (10.0, 3, 3000)
    with tempfile.TemporaryDirectory(prefix="duckfleet-cache-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        write_demo(data)
        reference = Reference(data)
        try:
            report = {"workers": args.workers, "concurrency": 32, "duration_s": duration, "runs": runs,
                      "cache_off": mix(tmp, data, args.workers, False, duration, runs, reference),
                      "cache_on": mix(tmp, data, args.workers, True, duration, runs, reference),
                      "latency": hit_latency(tmp, data, args.workers, count)}
        finally:
            reference.close()
    off, on = report["cache_off"], report["cache_on"]
    report["qps_ratio_on_over_off"] = on["qps"] / off["qps"]
    for label, r in (("cache off", off), ("cache on", on)):
        a = r["answers"]
        print(f"c=32 {label}: {r['qps']:.1f} QPS, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"errors {r['errors']}/{r['requests']}, answers checked {a['checked']} "
              f"({a['cache_served']} cache-served), wrong {a['wrong'] + len(r['warm_up_wrong'])}")
    print(f"cache on: {on['cache']['hits']} hits, {on['cache']['misses']} misses, "
          f"{on['cache']['coalesced']} coalesced; QPS on/off = {report['qps_ratio_on_over_off']:.1f}")
    lat = report["latency"]
    print(f"hit over HTTP p50 {lat['hit']['p50_ms']:.3f} ms (p99 {lat['hit']['p99_ms']:.3f}); "
          f"GET /health p50 {lat['health']['p50_ms']:.3f} ms; in-process SELECT 1 p50 "
          f"{lat['in_process_select_1']['p50_ms']:.3f} ms; hit / SELECT 1 = "
          f"{lat['hit_p50_over_select_1_p50']:.2f}; with a bare-socket client p50 "
          f"{lat['hit_raw_socket_client']['p50_ms']:.3f} ms")
    print(f"wrote {write_report('cache', report)}")
    failed = any(r["errors"] or r["answers"]["wrong"] or r["warm_up_wrong"] for r in (off, on))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
