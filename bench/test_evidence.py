"""Tests of the benchmarks' own evidence: the answer check, the mix's plan and sample, what
fails a peers run, TPC-H's accounting of errors, and the Arc-style tier's query cache.

    python -m pytest bench/test_evidence.py

A benchmark that cannot fail proves nothing: each test here feeds the check a wrong answer, an
error or an unforeseen query and asserts that it is caught. Not collected by the default
`python -m pytest` (testpaths = ["tests"]); CI runs it with bench/test_micro.py.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from bench.answers import Reference, check_answer, wrong_answer
from bench.peers import mixcheck, tpch, verdict
from bench.peers.arc_tier import QueryCache
from bench.peers.datasets import DEMO_TABLES
from bench.peers.loadgen import Reply, closed_loop
from bench.peers.servers import Peer


def test_wrong_answer_catches_what_differs_and_forgives_what_does_not():
    want = [("a", 1.0, datetime(2025, 11, 7, 11)), ("b", 2.0, datetime(2025, 11, 7, 12))]
    as_json = [["a", 1.0000000001, "2025-11-07T11:00:00.000000"], ["b", 2.0, "2025-11-07 12:00:00"]]
    assert wrong_answer(as_json, want) is None
    assert wrong_answer(list(reversed(as_json)), want) is None  # ties in ORDER BY: a multiset
    assert "1 rows, expected 2" in wrong_answer(as_json[:1], want)
    assert wrong_answer([["a", 1.1, "2025-11-07T11:00:00"], as_json[1]], want) is not None
    assert wrong_answer([["a", 1.0, "2025-11-07T11:00:01"], as_json[1]], want) is not None
    assert wrong_answer([], []) is None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """Every demo table: 6 rows, hosts h0..h5, usage 1, 2, 2, 2, 5, 6 (a tie at the cut of a top 2)."""
    data = tmp_path_factory.mktemp("data")
    con = duckdb.connect()
    for table in DEMO_TABLES:
        folder = data / "default" / table
        folder.mkdir(parents=True)
        con.execute(f"COPY (SELECT TIMESTAMP '2025-11-07 11:00:00' + INTERVAL (i) MINUTE AS time, "
                    f"'h' || i AS host, [1, 2, 2, 2, 5, 6][i + 1]::DOUBLE AS usage_user FROM range(6) t(i)) "
                    f"TO '{folder / 'x.parquet'}' (FORMAT parquet)")
    con.close()
    ref = Reference(Path(data))
    yield ref
    ref.close()


def test_top_n_cut_in_a_tie_accepts_any_tied_row_and_nothing_else(reference):
    sql = "SELECT host, usage_user AS v FROM cpu ORDER BY v LIMIT 2"
    assert check_answer(reference, sql, [["h0", 1.0], ["h3", 2.0]], ["host", "v"]) is None
    assert check_answer(reference, sql, [["h0", 1.0], ["h4", 5.0]], ["host", "v"]) is not None
    assert check_answer(reference, sql, [["h0", 1.0], ["h9", 2.0]], ["host", "v"]) is not None


def test_plan_is_the_same_every_time_and_every_client_has_its_share():
    a, b = mixcheck.plan([1, 4], 2, 0.1), mixcheck.plan([1, 4], 2, 0.1)
    assert a == b and [s.concurrency for s in a] == [1, 4, 1, 4]
    assert all(len(seq) == math.ceil(0.1 * mixcheck.MAX_QPS / s.concurrency)
               for s in a for seq in s.sequences)
    assert len({s.now for s in a}) == 4  # a "now" a segment
    feed = a[0].feeder()
    assert [feed(0) for _ in a[0].sequences[0]] == list(a[0].sequences[0]) and feed(0) is None


def test_keeper_keeps_a_tenth_and_every_cache_served_answer():
    keeper = mixcheck.Keeper()
    for k in range(30):
        keeper.on_reply(Reply(0, f"q{k}", 200, cache="hit" if k == 5 else "miss", body=b"{}"))
    keeper.on_reply(Reply(0, "q30", 503, body=b"{}"))
    assert [r.sql for r in keeper.kept] == ["q0", "q5", "q10", "q20"]
    assert keeper.cache_served == 1 and keeper.replies == 31


def test_a_request_without_answer_keeps_its_place_in_the_plan():
    """A request that fails without an answer (an exception, a timeout) still reaches
    on_reply, so the sampled positions stay the planned ones (else a later, unplanned query is
    kept and the peer is refused)."""
    sequence = [f"SELECT {k} AS k" for k in range(11)]
    sequence[3] = "SELECT no_such_column"  # fails in the client: no status, no rows
    con = duckdb.connect()
    keeper = mixcheck.Keeper()
    feed = iter(sequence)
    closed_loop(Peer("local", "duckdb", con=con), lambda n: next(feed, None), 1, 30,
                on_reply=keeper.on_reply)
    assert [r.sql for r in keeper.kept] == ["SELECT 0 AS k", "SELECT 10 AS k"]
    assert keeper.replies == 11


def test_check_catches_a_wrong_body_and_an_unplanned_query(reference):
    sql = "SELECT count(*) AS n FROM cpu"
    reference.expect([sql])
    keeper = mixcheck.Keeper()
    keeper.on_reply(Reply(0, sql, 200, cache="hit", body=b'{"columns": ["n"], "data": [[6]]}'))
    assert mixcheck.check(keeper, reference)["wrong"] == 0
    keeper.on_reply(Reply(1, sql, 200, cache="hit", body=b'{"columns": ["n"], "data": [[7]]}'))
    assert mixcheck.check(keeper, reference)["wrong"] == 1
    keeper.on_reply(Reply(2, "SELECT 42", 200, rows=[(42,)], columns=["x"]))
    with pytest.raises(RuntimeError, match="no expected answer"):
        mixcheck.check(keeper, reference)


def _run(dashboard: dict, tpch_peers: dict | None = None) -> dict:
    return {"unavailable": {}, "dashboard": dashboard, "large": {},
            "tpch": {"peers": tpch_peers or {}}, "history": {}}


def _row(errors=0, wrong=0) -> dict:
    return {"requests": 10, "errors": errors, "error_kinds": {"http 503": errors} if errors else {},
            "first_errors": {}, "answers": {"wrong": wrong, "checked": 2, "wrong_examples": []}}


def test_verdict_fails_on_ours_reports_theirs_and_refuses_an_empty_run():
    ok = {"duckfleet-w2": {"1": _row(), "warm_up_wrong": []}, "quack": {"1": _row(errors=3, wrong=1)}}
    assert verdict.failures(_run(ok), {"dashboard"}) == []
    assert len(verdict.failures(_run({**ok, "duckfleet-w2-cache": {"1": _row(errors=1)}}), {"dashboard"})) == 1
    assert len(verdict.failures(_run({**ok, "duckfleet-w4": {"1": _row(wrong=1)}}), {"dashboard"})) == 1
    assert verdict.failures(_run({"quack": {"1": _row()}}), {"dashboard"}) == ["dashboard: no duckfleet result"]
    assert verdict.failures(_run(ok), {"dashboard", "tpch"}) == ["tpch: no duckfleet result"]
    out = _run(ok)
    out["unavailable"]["tpch duckfleet-w2"] = "boot failed"
    assert verdict.failures(out, {"dashboard"}) == ["tpch duckfleet-w2: unavailable: boot failed"]


def test_tpch_error_fails_its_pass_instead_of_shortening_it():
    queries = {1: "SELECT 1 AS x", 2: "SELECT 2 AS y"}
    con = duckdb.connect()
    try:
        good = Peer("good", "duckdb", con=con)
        reference = tpch.reference_tables(good, queries)
        bad = Peer("bad", "duckdb", con=con, sql_for=lambda sql: sql.replace("2 AS y", "no_such_column"))
        run = tpch.run(bad, queries, reference, runs=2)
        assert run["sequential_total_s"] is None and run["sequential_runs"] == [None, None]
        assert run["concurrent_wall_s"] is None and not run["complete"]
        assert {e["phase"] for e in run["errors"]} == {"warm", "run 1", "run 2", "c=4"}
        fine = tpch.run(good, queries, reference, runs=2)
        assert fine["sequential_total_s"] is not None and fine["complete"] and not fine["mismatches"]
        wrong = tpch.run(Peer("wrong", "duckdb", con=con, sql_for=lambda sql: sql.replace("1 AS", "3 AS")),
                         queries, reference, runs=1)
        assert len(wrong["mismatches"]) == 3  # warm, the timed pass, c=4
    finally:
        con.close()


def test_arc_cache_evicts_the_least_recent_and_keeps_no_large_body():
    cache = QueryCache(ttl=600, max_size=2, max_bytes=10)
    cache.put("a", b"1")
    cache.put("b", b"2")
    assert cache.get("a") == b"1"  # now b is the least recent
    cache.put("c", b"3")
    assert cache.get("b") is None and cache.get("a") == b"1" and cache.get("c") == b"3"
    cache.put("d", b"x" * 11)
    assert cache.get("d") is None
    expired = QueryCache(ttl=-1, max_size=2, max_bytes=10)
    expired.put("a", b"1")
    assert expired.get("a") is None


def test_tpch_side_by_side_interleaves_the_timed_passes_query_by_query():
    """A ratio of two peers' totals holds on a machine that drifts: each query runs on both in
    turn, in every timed pass."""
    queries = {1: "SELECT 1 AS x", 2: "SELECT 2 AS y"}
    con, seen = duckdb.connect(), []
    try:
        def peer(name):
            return Peer(name, "duckdb", con=con, sql_for=lambda sql: seen.append((name, sql)) or sql)
        reference = tpch.reference_tables(Peer("ref", "duckdb", con=con), queries)
        a, b = tpch.side_by_side([peer("a"), peer("b")], queries, reference, runs=2, warm=False)
        timed = seen[:8]  # the concurrent passes follow
        assert timed == [(name, sql) for _ in range(2) for sql in queries.values() for name in "ab"]
        assert a["complete"] and b["complete"] and len(a["sequential_runs"]) == 2
    finally:
        con.close()
