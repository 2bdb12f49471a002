"""A soak: hostile requests of every kind the hardening issue found, mixed with normal load.

Normal clients run dashboard panels and check every answer against the one the fleet gave
before the soak; hostile clients meanwhile send side-effecting and setting-revealing table
functions, memory hogs that ignore DuckDB's limit, analysis bombs (780 KB of SQL, deep
nesting), results they read slowly, and connections they leave idle. The normal clients' error
rate must stay 0 and every answer right; afterwards the fleet serves with all its workers, and
a restart on the same data works. Marked slow (about a minute).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest

from harness.server import Server, assert_no_leaks, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SOAK_S = 20
CONFIG = """
[duckdb]
memory_limit = "256MB"
[workers]
rss_margin_mb = 256
[queue]
query_timeout_s = 10
queue_timeout_s = 30
[query_cache]
enabled = true
[results]
send_timeout_s = 2
"""
PANELS = [
    "SELECT host, round(avg(usage_user), 6) FROM cpu WHERE time >= TIMESTAMP '2025-11-03' "
    "AND time < TIMESTAMP '2025-11-03 06:00:00' GROUP BY host ORDER BY host",
    "SELECT count(*), max(used_percent) FROM mem WHERE time BETWEEN '2025-11-05' AND '2025-11-06'",
    "SELECT path, min(free_bytes) FROM disk WHERE time > TIMESTAMP '2025-11-07 12:00:00' "
    "GROUP BY path ORDER BY path",
    "SELECT count(*) FROM cpu",
]
HOSTILE = [
    "SELECT * FROM enable_profiling(format := 'json', save_location := '/nonexistent/p.json')",
    "SELECT * FROM duckdb_settings()",
    "SELECT current_setting('temp_directory')",
    "SELECT length(repeat('x', 2000000000))",
    "SELECT i," + "*," * 390000 + " FROM t",
    "SELECT " + "1+" * 250 + "1",
    "SELECT * FROM cpu, (WITH cpu AS (SELECT 1) SELECT * FROM cpu) s LIMIT 1",
]


def test_hostile_soak_with_normal_load(tmp_path, demo_dir):
    srv = Server(tmp_path / "srv", demo_dir, config=CONFIG).start()
    try:
        want = [srv.query(sql).json()["data"] for sql in PANELS]
        stop = threading.Event()
        normal: list[tuple[float, int, bool]] = []  # (seconds, status, right)
        hostile: list[int] = []
        idle: list[socket.socket] = []

        def client(n: int) -> None:
            while not stop.is_set():
                i = len(normal) % len(PANELS)
                started = time.perf_counter()
                response = srv.query(PANELS[i], cache=(n % 2 == 0), timeout=60)
                right = response.status == 200 and response.json()["data"] == want[i]
                normal.append((time.perf_counter() - started, response.status, right))

        def attacker() -> None:
            k = 0
            while not stop.is_set():
                k += 1
                if k % 5 == 0:  # a slow reader of a large result, then gone
                    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
                    body = b'{"sql": "SELECT * FROM cpu", "format": "arrow"}'
                    sock.sendall(b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    sock.recv(1000)
                    sock.close()
                    continue
                if k % 7 == 0 and len(idle) < 50:  # connections left idle
                    idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=30))
                    continue
                hostile.append(srv.query(HOSTILE[k % len(HOSTILE)], timeout=60).status)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        threads += [threading.Thread(target=attacker) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + SOAK_S
        try:
            wait_for(lambda: time.monotonic() > deadline or not all(r for _, _, r in normal),
                     SOAK_S + 30, interval=0.5, what="the soak")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
            for sock in idle:
                sock.close()
        wrong = [(status, ok) for _, status, ok in normal if not ok]
        assert normal and not wrong, f"{len(wrong)} of {len(normal)} normal answers went wrong"
        assert hostile and 500 not in hostile, hostile
        latencies = sorted(s for s, _, _ in normal)
        print(f"normal: {len(normal)} answers, p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.1f} ms; "
              f"hostile statuses {sorted(set(hostile))}")
        srv.wait_ready(workers=2, timeout=60)  # whatever was killed, both workers are back
        assert [srv.query(sql).json()["data"] for sql in PANELS] == want
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)
    again = Server(tmp_path / "again", demo_dir, config=CONFIG).start()  # a restart works
    try:
        assert [again.query(sql).json()["data"] for sql in PANELS] == want
    finally:
        assert again.stop() == 0
        assert_no_leaks(again)
