"""The gateway's SQL analysis under hostile input, and cache keys that cannot go stale.

Analysis (for the cache and for pruning) runs on the gateway's planning thread, bounded by
size and depth; every parse-tree value keeps its identity. Cache entries depend on every table
a query can read, whatever the spelling: a path, a CTE named like a table, a view.
"""

from __future__ import annotations

import threading

import psutil
import pytest

from engine.demo import write_history
from harness.server import Server, assert_no_leaks

CACHE_ON = "[query_cache]\nenabled = true\n"


def _data(tmp_path):
    from datetime import datetime, timezone
    write_history(tmp_path / "data", datetime(2026, 1, 3, tzinfo=timezone.utc), 4)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A fleet with the cache on, over four hours of data nobody changes."""
    tmp = tmp_path_factory.mktemp("analysis")
    srv = Server(tmp / "srv", _data(tmp), config=CACHE_ON).start()
    yield srv
    assert srv.stop() == 0
    assert_no_leaks(srv)


def test_huge_sql_is_not_analyzed_and_never_stalls_the_loop(cached: Server):
    srv = cached
    huge = "SELECT i," + "*," * 390000 + " FROM t"  # 780 KB, as a hostile client sent it
    gateway = psutil.Process(srv.gateway_pid())
    before = gateway.memory_info().rss
    bypassed = srv.get("/api/v1/cache/stats").json()["bypassed"]
    health, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            health.append(srv.get("/health").status)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(5):
            response = srv.query(huge)  # the worker's policy will not walk a tree that large
            assert response.status == 413 and b"too large to check" in response.body, response
    finally:
        stop.set()
        poller.join(60)
    assert health and set(health) == {200}
    assert srv.get("/api/v1/cache/stats").json()["bypassed"] == bypassed + 5
    # The analyzer kept nothing of them (it once kept ~65 MB a request).
    assert gateway.memory_info().rss - before < 100 * 2**20
    assert srv.stats()["worker_count"] == 2


def test_odd_values_and_deep_nesting(cached):
    srv = cached
    # Infinity in the parse tree: a key of its own, not NULL's and not -Infinity's.
    assert srv.query("SELECT 1e400 AS x", format="csv").body.split() == [b'"x"', b'"Infinity"']
    assert srv.query("SELECT -1e400 AS x", format="csv").body.split() == [b'"x"', b'"-Infinity"']
    assert srv.query("SELECT NULL::DOUBLE AS x").json()["data"] == [[None]]
    assert srv.query("SELECT 1e400 AS x").status == 200
    # As deep as a worker's DuckDB goes (max_expression_depth), analysed like any other;
    # deeper, DuckDB's parser refuses it at once: a clear 400.
    assert srv.query("SELECT " + "1+" * 250 + "1 AS x").json()["data"] == [[251]]
    doc = srv.query("SELECT " + "1+" * 400 + "1").json()
    assert doc["error_type"] == "sql_error" and "Max expression depth" in doc["error"]
    parens = "SELECT " + "(" * 250 + "1" + ")" * 250 + " AS x"
    assert srv.query(parens).json()["data"] == [[1]]


def _add_hour(data):
    from datetime import datetime, timezone
    write_history(data / "extra", datetime(2026, 1, 3, 1, tzinfo=timezone.utc), 1)
    (data / "extra" / "default" / "cpu" / "2026" / "01" / "03").rename(
        data / "default" / "cpu" / "2026" / "01" / "03")


def test_cache_never_serves_stale_rows(tmp_path):
    data = _data(tmp_path)
    srv = Server(tmp_path / "srv", data, config=CACHE_ON).start()
    try:
        queries = [
            f"SELECT count(*) FROM '{data}/default/cpu/**/*.parquet'",  # a table read as a path
            f"SELECT count(*) FROM read_parquet('{data}/default/cpu/*/*/*/*/*.parquet')",
            "SELECT count(*) FROM cpu, (WITH cpu AS (SELECT 1) SELECT * FROM cpu) s",  # CTE shadow
            "WITH x AS (SELECT * FROM CPU) SELECT count(*) FROM x",
        ]
        before = [srv.query(q).json()["data"][0][0] for q in queries]
        assert before == [4 * 360] * 4
        assert all(srv.query(q).headers["X-Cache"] == "hit" for q in queries)
        _add_hour(data)
        assert [srv.query(q).json()["data"][0][0] for q in queries] == [5 * 360] * 4
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)


def test_nondeterministic_queries_are_not_cached(cached):
    for sql in ["SELECT current_localtimestamp() AS t", "SELECT current_localtime() AS t",
                "SELECT count(*) FROM cpu USING SAMPLE 10%",
                "SELECT count(*) FROM cpu TABLESAMPLE 50%", "SELECT random() AS r",
                "SELECT uuid() AS u", "SELECT now() AS t"]:
        first = cached.query(sql)
        second = cached.query(sql)
        assert first.status == 200 and second.headers["X-Cache"] == "bypass", (sql, second)
