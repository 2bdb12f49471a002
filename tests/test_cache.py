"""The fleet's result cache: hits, keys, TTL, budgets, single-flight, invalidation, scopes,
and its shared-memory segments, over real HTTP against a real fleet."""

import json
import shutil
import socket
import threading

import duckdb
import pyarrow as pa
import pytest

from engine import tokens
from harness.server import (Server, assert_no_leaks, fleet_segments, http_post,
                           http_post_closing, server_has_read, wait_for, write_small_dataset)

CACHE_ON = "[query_cache]\nenabled = true\n"
AGG = "SELECT host, avg(usage_user) AS u FROM cpu GROUP BY host ORDER BY host"
SLOW = "SELECT sum(i) AS s FROM range(400000000) t(i)"  # most of a second on one thread
# Fails only at its last row, so identical requests overlap while it runs.
SLOW_FAILURE = ("SELECT sum(CAST(CASE WHEN i = 299999999 THEN 'x' ELSE '1' END AS INTEGER)) "
                "FROM range(300000000) t(i)")


def cache_stats(srv) -> dict:
    return srv.get("/api/v1/cache/stats").json()


def concurrently(n: int, fn) -> list:
    results = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn())) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.fixture(scope="module")
def cached(tmp_path_factory, demo_dir):
    srv = Server(tmp_path_factory.mktemp("cache"), demo_dir,
                 config=CACHE_ON + "volatile_ttl_seconds = 0\n").start()
    yield srv
    assert srv.stop() == 0
    assert_no_leaks(srv)


def test_miss_then_hit_with_the_same_bytes(cached):
    first = cached.query(AGG, format="csv")
    again = cached.query(AGG, format="csv")
    assert first.status == again.status == 200
    assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "hit")
    assert first.body == again.body
    assert again.headers["X-Row-Count"] == "10" and "Age" in again.headers
    # DuckDB's parse tree is the key: whitespace, case and comments do not matter...
    same = cached.query("select host,AVG(usage_user) as u -- the panel\nfrom cpu "
                        "group by host order by host", format="csv")
    assert same.headers["X-Cache"] == "hit" and same.body == first.body
    # ...but the format and the parameters do.
    assert cached.query(AGG, format="json").headers["X-Cache"] == "miss"
    by_host = "SELECT count(*) AS n FROM cpu WHERE host = $1"
    one = cached.query(by_host, params=["server01"])
    two = cached.query(by_host, params=["server02"])
    assert one.headers["X-Cache"] == two.headers["X-Cache"] == "miss"
    assert cached.query(by_host, params=["server01"]).headers["X-Cache"] == "hit"


def test_json_hit_is_arcs_shape_with_fresh_timing(cached):
    cached.query("SELECT 42 AS answer")
    hit = cached.query("SELECT 42 AS answer")
    assert hit.headers["X-Cache"] == "hit"
    body = hit.json()
    assert body["data"] == [[42]] and body["row_count"] == 1 and body["success"] is True
    assert body["wait_time_ms"] == 0


def test_opt_out_and_volatile_queries_are_not_cached(cached):
    for _ in range(2):
        out = cached.query("SELECT count(*) FROM mem", cache=False)
        assert out.status == 200 and out.headers["X-Cache"] == "bypass"
    assert cached.query("SELECT count(*) FROM mem").headers["X-Cache"] == "miss"
    for sql in ("SELECT now() AS t", "SELECT current_timestamp AS t", "SELECT random() AS r",
                "SELECT ago(INTERVAL 1 HOUR) AS t", "EXPLAIN SELECT 1",
                "SELECT * FROM duckdb_tables()"):
        assert [cached.query(sql).headers["X-Cache"] for _ in range(2)] == ["bypass"] * 2, sql


def test_errors_are_not_cached(cached):
    for _ in range(2):
        out = cached.query("SELECT * FROM no_such_table")
        assert out.status == 400 and out.headers.get("X-Cache") is None


def test_stats_and_metrics_count_what_happened(cached):
    before = cache_stats(cached)
    sql = "SELECT max(usage_idle) FROM cpu"
    cached.query(sql), cached.query(sql), cached.query(sql, cache=False)
    after = cache_stats(cached)
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 1
    assert after["bypassed"] - before["bypassed"] == 1
    assert after["hit_bytes"] > before["hit_bytes"] and after["entries"] >= 1
    metrics = cached.get("/metrics").body.decode()
    assert f'duckfleet_cache_requests_total{{result="hit"}} {after["hits"]}.0' in metrics
    assert "duckfleet_cache_bytes " in metrics and "duckfleet_cache_evictions_total" in metrics
    as_json = cached.get("/api/v1/metrics").json()
    assert {"labels": {"result": "miss"}, "value": after["misses"]} in \
        as_json["duckfleet_cache_requests_total"]


def test_operator_clear(cached):
    cached.query("SELECT min(usage_idle) FROM cpu")
    assert cache_stats(cached)["entries"] >= 1
    cleared = cached.request("POST", "/api/v1/cache/clear").json()["cleared"]
    assert cleared >= 1 and cache_stats(cached)["entries"] == 0
    assert cached.query("SELECT min(usage_idle) FROM cpu").headers["X-Cache"] == "miss"


def test_single_flight_runs_fifty_identical_requests_once(cached):
    served = cached.stats()["served"]
    before = cache_stats(cached)
    answers = concurrently(50, lambda: cached.query(SLOW))
    assert all(a.status == 200 for a in answers), answers
    assert len({a.body.split(b',"execution_time_ms"')[0] for a in answers}) == 1
    states = [a.headers["X-Cache"] for a in answers]
    after = cache_stats(cached)
    assert states.count("miss") == 1 and after["misses"] - before["misses"] == 1
    assert after["coalesced"] - before["coalesced"] == states.count("coalesced") >= 1
    assert states.count("coalesced") + states.count("hit") == 49
    assert cached.stats()["served"] - served == 1  # one execution in the whole fleet


def test_a_failure_reaches_every_waiter_once_and_is_not_cached(cached):
    served = cached.stats()["served"]
    answers = concurrently(20, lambda: cached.query(SLOW_FAILURE))
    assert [a.status for a in answers] == [400] * 20
    assert len({a.json()["error"] for a in answers}) == 1
    assert cached.stats()["served"] - served == 1
    assert cached.query(SLOW_FAILURE).status == 400
    assert cached.stats()["served"] - served == 2  # not cached: it ran again


def test_waiters_take_over_when_the_leader_leaves(cached):
    sql = "SELECT sum(i) + 1 AS s FROM range(400000000) t(i)"
    before = cache_stats(cached)
    leader = socket.create_connection(("127.0.0.1", cached.port), timeout=30)
    leader.sendall(http_post({"sql": sql}))
    wait_for(lambda: cache_stats(cached)["in_flight"] == 1, 10, what="the leader's flight")
    follower = socket.create_connection(("127.0.0.1", cached.port), timeout=60)
    follower.sendall(http_post_closing({"sql": sql}))
    # The gateway has read the follower's request (and, on its event loop, put it on the
    # flight before it can see the leader's disconnect, which comes later), while the
    # leader's query still runs: the follower waits, it does not lead.
    wait_for(lambda: server_has_read(follower), 10, what="the gateway to read the follower")
    now = cache_stats(cached)
    assert now["in_flight"] == 1 and now["misses"] - before["misses"] == 1
    assert cached.stats()["busy"] == 1, "the leader's query must still be running"
    leader.close()  # the leader's query is cancelled; the follower must still be answered
    reply = b""
    while chunk := follower.recv(65536):
        reply += chunk
    follower.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b"X-Cache: miss" in head  # it ran the query itself, as the new leader
    assert json.loads(body)["data"] == [[399_999_999 * 400_000_000 // 2 + 1]]
    after = cache_stats(cached)
    assert after["misses"] - before["misses"] == 2 and after["coalesced"] == before["coalesced"]


def test_ttl_expiry(make_server, demo_dir):
    srv = make_server(config=CACHE_ON + "ttl_seconds = 1\n").start()
    assert srv.query(AGG).headers["X-Cache"] == "miss"
    assert srv.query(AGG).headers["X-Cache"] == "hit"
    wait_for(lambda: cache_stats(srv)["evicted_by_reason"]["ttl"] == 1, 10,
             what="the sweeper to expire the entry")
    assert cache_stats(srv)["entries"] == 0
    assert srv.query(AGG).headers["X-Cache"] == "miss"


def test_lru_eviction_within_entries_and_bytes(make_server):
    # Each result is ~300 KB of CSV: above render.SMALL, so it keeps its 1 MiB segment.
    srv = make_server(config=CACHE_ON + "max_size = 3\nmax_total_mb = 2\n"
                      "[results]\nchunk_mb = 1\n").start()
    sqls = [f"SELECT i, i * {k} AS v FROM range(30000) t(i)" for k in range(4)]
    for sql in sqls[:2]:
        assert srv.query(sql, format="csv").headers["X-Cache"] == "miss"
    stats = cache_stats(srv)
    assert stats["entries"] == 2 and stats["bytes"] == 2 * 2**20
    assert srv.stats()["shm_segments_cached"] == 2
    srv.query(sqls[0], format="csv")  # now the most recently used
    assert srv.query(sqls[2], format="csv").headers["X-Cache"] == "miss"  # over 2 MiB: LRU goes
    stats = cache_stats(srv)
    assert stats["entries"] == 2 and stats["evicted_by_reason"]["lru"] == 1
    assert srv.query(sqls[0], format="csv").headers["X-Cache"] == "hit"
    assert srv.query(sqls[1], format="csv").headers["X-Cache"] == "miss"
    # Small entries are charged their bytes: max_size bounds their number.
    for k in range(5):
        srv.query(f"SELECT {k} AS k")
    assert cache_stats(srv)["entries"] == 3
    # Evicted segments went back to the pool or were unlinked: none is lent, none is lost.
    stats = srv.stats()
    assert stats["shm_segments_in_use"] == 0
    assert stats["shm_segments_cached"] == 0
    on_disk = len(fleet_segments(srv.process.pid))
    assert on_disk == stats["shm_segments_idle"]
    assert srv.stop() == 0
    assert not fleet_segments(srv.process.pid)


def test_streamed_result_is_cached_across_segments_and_sent_whole(make_server):
    srv = make_server(config=CACHE_ON + "max_result_mb = 20\n[results]\nchunk_mb = 1\n").start()
    sql = "SELECT i, i * 2 AS j FROM range(300000) t(i)"
    miss = srv.query(sql, path="/api/v1/query/arrow")
    hit = srv.query(sql, path="/api/v1/query/arrow")
    assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("miss", "hit")
    assert "Content-Length" not in miss.headers  # streamed as the worker wrote it
    assert int(hit.headers["Content-Length"]) == len(hit.body) == len(miss.body) > 3 * 2**20
    assert hit.body == miss.body
    table = pa.ipc.open_stream(hit.body).read_all()
    assert table.equals(duckdb.sql(sql).arrow().read_all())
    assert srv.stats()["shm_segments_cached"] >= 4
    # Larger than max_result_mb: streamed and not kept.
    big = "SELECT i, i * 2 AS j FROM range(2000000) t(i)"
    assert [srv.query(big, path="/api/v1/query/arrow").headers["X-Cache"]
            for _ in range(2)] == ["miss", "miss"]


def test_a_new_file_is_visible_to_the_next_query(make_server, demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    srv = make_server(data_dir=data, config=CACHE_ON).start()
    count = "SELECT count(*) AS n FROM cpu"
    other = "SELECT count(*) AS n FROM mem"
    n = srv.query(count).json()["data"][0][0]
    assert srv.query(count).headers["X-Cache"] == "hit"
    srv.query(other)
    # A new file in an existing hourly partition.
    hour = next((data / "default" / "cpu").rglob("*.parquet"))
    shutil.copy(hour, hour.with_name("late-arrival.parquet"))
    after = srv.query(count)
    assert after.headers["X-Cache"] == "miss"
    assert after.json()["data"][0][0] > n
    assert srv.query(other).headers["X-Cache"] == "hit"  # another table: untouched
    assert srv.query(count).headers["X-Cache"] == "hit"
    # A new partition directory with a file in it; then both files removed.
    new_hour = hour.parent.parent / "99"
    new_hour.mkdir()
    shutil.copy(hour, new_hour / "part.parquet")
    assert srv.query(count).json()["data"][0][0] == 2 * after.json()["data"][0][0] - n
    hour.with_name("late-arrival.parquet").unlink()
    (new_hour / "part.parquet").unlink()
    final = srv.query(count)
    assert final.headers["X-Cache"] == "miss" and final.json()["data"][0][0] == n
    assert cache_stats(srv)["evicted_by_reason"]["invalidated"] >= 3


def test_two_tokens_never_share_rows(make_server, tmp_path):
    data = write_small_dataset(tmp_path / "data")
    file = tmp_path / "tokens.json"
    made = {name: tokens.create(file, name, **kw) for name, kw in {
        "admin": {}, "just_default": {"databases": ["default"]},
        "just_other": {"databases": ["other"]}}.items()}
    srv = make_server(data_dir=data, config=CACHE_ON + f'[auth]\nenabled = true\n'
                                                       f'tokens_file = "{file}"\n').start()

    def ask(token, sql):
        return srv.request("POST", "/api/v1/query", json.dumps({"sql": sql}).encode(),
                           {"Authorization": f"Bearer {made[token]}"})

    schemas = "SELECT DISTINCT table_schema FROM information_schema.tables ORDER BY 1"
    seen = {name: ask(name, schemas) for name in ("just_default", "just_other", "admin")}
    assert [r.headers["X-Cache"] for r in seen.values()] == ["miss"] * 3
    assert seen["just_default"].json()["data"] == [["default"]]
    assert seen["just_other"].json()["data"] == [["other"]]
    assert ask("just_other", schemas).headers["X-Cache"] == "hit"
    cpu = 'SELECT db, count(*) FROM "default".cpu GROUP BY db'
    assert ask("admin", cpu).status == 200
    assert ask("admin", cpu).headers["X-Cache"] == "hit"
    refused = ask("just_other", cpu)  # cached for admin, never served to a narrower scope
    assert refused.status == 403 and "default" in refused.json()["error"]
    # Clearing the cache is for unrestricted tokens.
    clear = srv.request("POST", "/api/v1/cache/clear",
                        headers={"Authorization": f"Bearer {made['just_other']}"})
    assert clear.status == 403


def test_volatile_results_live_volatile_ttl_seconds(make_server):
    srv = make_server(config=CACHE_ON + "ttl_seconds = 600\nvolatile_ttl_seconds = 1\n").start()
    clock = "SELECT now() AS t, random() AS r"
    first = srv.query(clock)
    again = srv.query(clock)
    assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "hit")
    assert again.json()["data"] == first.json()["data"]  # the same instant and the same draw
    assert srv.query(AGG).headers["X-Cache"] == "miss"
    wait_for(lambda: cache_stats(srv)["evicted_by_reason"]["ttl"] == 1, 10,
             what="the volatile entry to expire")
    later = srv.query(clock)
    assert later.headers["X-Cache"] == "miss" and later.json()["data"] != first.json()["data"]
    # Only the volatile entry went: the other one keeps its ttl_seconds.
    assert srv.query(AGG).headers["X-Cache"] == "hit"
    assert cache_stats(srv)["volatile_ttl_seconds"] == 1
