"""A worker's hard memory cap and the kill of queries that ignore interrupts (issue 17, item 5).

String and list functions allocate outside DuckDB's buffer manager and ignore interrupts. With a
256 MB memory_limit and a 256 MiB margin, each query below would need about 2 GB; the worker's
watch thread stops it near its cap of about 500 MiB, the client gets 400 out_of_memory naming
the limit, the query is not retried elsewhere, the worker is replaced without crash backoff,
and the other worker serves right answers all along.
"""

import socket
import threading

import pytest

from engine import config as config_mod
from engine.config import ConfigError
from harness.server import http_post, wait_for, write_small_dataset

CAPPED = '[duckdb]\nmemory_limit = "256MB"\n[workers]\nrss_margin_mb = 256\n'
GREEDY = [  # each about 2 GB of RSS if nothing stops it
    "SELECT length(repeat('x', 1000000000)) AS n",
    "SELECT lpad('a', 1000000000, 'b') IS NULL AS n",
    "SELECT string_split(repeat('a,', 10000000), ',')[1] AS n",
    "SELECT len(range(0, 30000000)) AS n",
]
IGNORES_INTERRUPTS = "SELECT length(repeat('x', 2000000000)) AS n"  # 20 s or more, deaf to cancel


@pytest.fixture
def data(tmp_path):
    return write_small_dataset(tmp_path / "data", ("default",))


class Bystander:
    """Another client querying in a loop; every answer must be right."""

    def __init__(self, srv):
        self.srv, self.stop, self.answers, self.wrong = srv, threading.Event(), 0, []
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.stop.is_set():
            resp = self.srv.query("SELECT count(*) AS n FROM cpu", timeout=60)
            if resp.status == 200 and resp.json()["data"] == [[10]]:
                self.answers += 1
            elif resp.status != 503 or resp.json()["error_type"] != "overloaded":
                self.wrong.append(resp)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


@pytest.mark.timeout(180)
def test_query_past_the_rss_cap_fails_alone_and_its_worker_is_replaced(make_server, data):
    srv = make_server(data_dir=data, config=CAPPED + "[queue]\nqueue_timeout_s = 30\n").start()
    killed = []
    with Bystander(srv) as bystander:
        for sql in GREEDY:
            resp = srv.query(sql, timeout=120)
            assert resp.status == 400, (sql, resp)
            doc = resp.json()
            assert doc["error_type"] == "out_of_memory", (sql, doc)
            assert "memory_limit is 244.1 MiB" in doc["error"] and "rss_margin_mb = 256" in doc["error"]
            wait_for(lambda: len(srv.events("worker_over_memory")) == len(killed) + 1, 30,
                     what="the worker's over-memory report")
            killed.append(srv.events("worker_over_memory")[-1]["pid"])
            srv.wait_ready()
        wait_for(lambda: bystander.answers > 0, 30, what="an answer to the other client")
    assert not bystander.wrong, bystander.wrong[:3]
    stats = srv.stats()
    assert stats["killed_over_memory"] == len(GREEDY)
    assert stats["retried"] == 0 and stats["crashed"] == 0  # not retried on the other worker
    assert not set(killed) & set(srv.worker_pids())
    for event in srv.events("worker_over_memory"):
        assert event["cap"] == 256_000_000 + 256 * 2**20
        assert event["rss"] < 2 * 10**9  # stopped on the way, not after the allocation
    wait_for(lambda: len([e for e in srv.events("exited") if e.get("planned") == "out_of_memory"])
             == len(GREEDY), 30, what="the supervisor's exit records")
    assert not srv.events("crashed") and not srv.events("crash_backoff")
    metrics = srv.get("/metrics").body.decode()
    assert f"duckfleet_worker_memory_kills_total {float(len(GREEDY))}" in metrics
    assert srv.query("SELECT 42 AS x").json()["data"] == [[42]]


@pytest.mark.timeout(120)
def test_queries_that_ignore_interrupts_are_killed_after_a_short_grace(make_server, data):
    # No RSS cap here: only the deadline can stop these. query_timeout_s keeps its 300 s default.
    srv = make_server(data_dir=data, workers=1, config=(
        "[workers]\nrss_margin_mb = 0\nkill_grace_s = 0.5\n[queue]\ncancel_grace_s = 0.5\n")).start()

    # 1. The client leaves: the supervisor kills the worker cancel_grace_s + kill_grace_s later,
    # not at the 300 s deadline (the query alone runs longer than this test's waits).
    first = srv.worker_pids()[0]
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(http_post({"sql": IGNORES_INTERRUPTS}))
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    sock.close()
    wait_for(lambda: srv.events("worker_unresponsive"), 15, what="the deaf worker to be killed")
    assert srv.event("worker_unresponsive")["child_pid"] == first
    wait_for(lambda: first not in srv.worker_pids(), 15, what="the gateway to see it go")
    srv.wait_ready()

    # 2. The request's own deadline: 504 after cancel_grace_s, the worker killed right after.
    second = srv.worker_pids()[0]
    assert second != first
    resp = srv.query(IGNORES_INTERRUPTS, timeout_ms=500, timeout=60)
    assert resp.status == 504 and resp.json()["error_type"] == "timeout"
    wait_for(lambda: len(srv.events("worker_unresponsive")) == 2, 15, what="the second kill")
    assert srv.events("worker_unresponsive")[1]["child_pid"] == second
    srv.wait_ready()
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]
    assert srv.stats()["retried"] == 0


def test_rss_margin_must_cover_the_process_overhead():
    with pytest.raises(ConfigError, match="workers.rss_margin_mb"):
        config_mod.load(None, env={}, overrides={"workers": {"rss_margin_mb": 100}})
    cfg = config_mod.load(None, env={}, overrides={"workers": {"rss_margin_mb": 0}})
    assert cfg.workers.rss_margin_mb == 0  # no cap
    assert config_mod.load(None, env={}).workers.rss_margin_mb == 512
