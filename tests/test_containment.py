"""One request must not take the fleet down: a worker whose DuckDB reports an internal error is
replaced after it answers; a query that kills its worker is quarantined, not retried, and does
not push the slot into crash backoff; a worker killed from outside has its query retried; error
messages do not show the server's paths. Real fleets, real signals.
"""

import http.client
import json
import os
import signal
import threading

import psutil

from engine.redact import Redactor
from harness.server import wait_for, write_small_dataset

# A view the operator configured that breaks the connection it runs on (DuckDB 1.5.5: every
# later query on it fails with "INTERNAL Error: Attempted to dereference unique_ptr that is NULL").
BROKEN_VIEW = ('[catalog.views]\nboom = "SELECT * FROM enable_profiling(format := \'json\', '
               'save_location := \'/nonexistent/p.json\')"\n')
LONG = "SELECT count(*) FROM range(1000000) a, range(1000000) b"  # runs until it is stopped
MEDIUM = "SELECT count(*) FROM range(300000000) t(i) WHERE i % 7 = 3"  # a second or two


def in_background(srv, sql, **fields):
    out = {}
    thread = threading.Thread(target=lambda: out.update(resp=srv.query(sql, **fields)))
    thread.start()
    return thread, out


def busy_worker(srv) -> int:
    pid = wait_for(lambda: next((w["pid"] for w in srv.stats()["workers"] if w["state"] == "busy"),
                                None), 30, what="a busy worker")
    return executing(pid)


def executing(pid: int) -> int:
    """Wait until the worker is inside its query (it told the supervisor it is busy before it
    started), seen as CPU time spent since now: the gateway marks it busy on dispatch already."""
    process = psutil.Process(pid)
    spent = sum(process.cpu_times()[:2])
    wait_for(lambda: sum(process.cpu_times()[:2]) > spent + 0.2, 30, what="the query to run")
    return pid


def test_internal_error_retires_the_worker_after_it_answers(make_server, tmp_path):
    data = write_small_dataset(tmp_path / "data", ("default",))
    srv = make_server(data_dir=data, workers=1, config=BROKEN_VIEW).start()
    [broken] = srv.worker_pids()
    assert srv.query("SELECT * FROM boom").status == 200  # the connection is broken from now on
    resp = srv.query("SELECT 42 AS answer")
    assert resp.status == 500 and resp.json()["error_type"] == "internal", resp
    assert "INTERNAL Error" in resp.json()["error"] and "Stack Trace" not in resp.json()["error"]
    # It said Bye before it answered, and its replacement is spawned only after that answer.
    assert srv.get("/health").json()["workers_ready"] == 0
    assert srv.get("/health/ready").status == 503
    # The broken worker takes no other query: the next one waits for its replacement.
    assert srv.query("SELECT 42 AS answer").json()["data"] == [[42]]
    assert broken not in srv.worker_pids()
    wait_for(lambda: srv.stats()["recycled_by_reason"].get("internal_error") == 1, 10,
             what="the broken worker counted as recycled")
    assert [e["reason"] for e in srv.events("worker_recycling")] == ["internal_error"]
    left = [e for e in srv.events("worker_left") if e["worker_pid"] == broken]
    assert [e["reason"] for e in left] == ["internal_error"]
    assert not srv.events("crashed") and srv.stats()["crashed"] == 0
    assert srv.get("/health/ready").status == 200
    assert 'duckfleet_worker_recycles_total{reason="internal_error"} 1.0' in srv.get("/metrics").body.decode()


def test_query_that_kills_its_worker_is_quarantined_not_retried(make_server):
    srv = make_server(workers=2).start()
    thread, out = in_background(srv, LONG)
    os.kill(busy_worker(srv), signal.SIGSEGV)  # as DuckDB crashing inside this query would
    thread.join(60)
    resp = out["resp"]
    assert resp.status == 400 and resp.json()["error_type"] == "quarantined", resp
    assert "SIGSEGV" in resp.json()["error"]
    stats = srv.stats()
    assert stats["retried"] == 0 and stats["killed_by_query"] == 1 and stats["quarantined"] == 1
    # The same query (whitespace aside) is refused without reaching a worker; others run.
    served = stats["served"]
    again = srv.query("  " + LONG.replace(" FROM", "\n  FROM"))
    assert again.status == 400 and again.json()["error_type"] == "quarantined", again
    assert srv.query("SELECT 1 AS ok").json()["data"] == [[1]]
    assert srv.stats()["served"] == served + 1
    srv.wait_ready(2)
    assert [e["busy"] for e in srv.events("crashed")] == [True]


def test_queries_of_death_do_not_push_crash_backoff(make_server):
    """The issue's ten poison queries in a row: each replaced at once, the fleet stays whole."""
    srv = make_server(workers=2).start()
    for i in range(6):
        thread, out = in_background(srv, f"{LONG} WHERE a.range > {i}")
        os.kill(busy_worker(srv), signal.SIGSEGV)
        thread.join(60)
        assert out["resp"].json()["error_type"] == "quarantined", out["resp"]
        srv.wait_ready(2)
        assert srv.query("SELECT 1 AS ok").status == 200
    assert len(srv.events("crashed")) == 6
    assert not srv.events("crash_backoff")
    assert srv.stats()["retried"] == 0 and srv.stats()["killed_by_query"] == 6
    assert srv.stop() == 0  # and a restart afterwards serves as usual
    again = make_server(workers=2).start()
    assert again.query("SELECT count(*) FROM cpu").status == 200


def test_worker_killed_from_outside_has_its_query_retried(make_server):
    srv = make_server(workers=2).start()
    thread, out = in_background(srv, MEDIUM)
    victim = busy_worker(srv)
    os.kill(victim, signal.SIGKILL)  # not the query's doing: the OOM killer, an operator
    thread.join(120)
    resp = out["resp"]
    assert resp.status == 200, resp
    assert resp.json()["data"] == [[42857143]]
    stats = srv.stats()
    assert stats["retried"] == 1 and stats["killed_by_query"] == 0 and stats["quarantined"] == 0
    assert srv.event("query_retried") is not None
    srv.wait_ready(2)
    assert victim not in srv.worker_pids() and not srv.events("crash_backoff")


def test_error_messages_do_not_show_server_paths(make_server, tmp_path):
    data = write_small_dataset(tmp_path / "data", ("default",))
    srv = make_server(data_dir=data, workers=1).start()
    resp = srv.query(f"SELECT * FROM read_parquet('{data}/default/nope/*.parquet')")
    error = resp.json()["error"]
    assert resp.status == 400 and "default/nope/*.parquet" in error, resp
    assert str(data) not in error and str(data.resolve()) not in error
    (data / "default" / "bad.parquet").write_text("not parquet")
    resp = srv.query(f"SELECT * FROM read_parquet('{data}/default/bad.parquet')")
    error = resp.json()["error"]
    assert resp.status == 400 and "default/bad.parquet" in error and str(data) not in error, resp


def test_redactor_takes_out_runtime_home_and_data_paths():
    redact = Redactor("/srv/data", "/run/duckfleet-123-abc", home="/home/ops")
    assert redact('No files match "/srv/data/default/x/*.parquet"') == 'No files match "default/x/*.parquet"'
    assert redact("/srv/data2/secret /srv/data") == "/srv/data2/secret ."
    assert redact("temp /run/duckfleet-123-abc/tmp-worker-0-9/all") == "temp <runtime>/tmp-worker-0-9/all"
    assert redact("/home/ops/.duckdb/extensions and /home/opsx") == "~/.duckdb/extensions and /home/opsx"


def test_query_that_kills_its_worker_mid_stream_is_quarantined(make_server):
    """After the first byte there is no retry anyway: the stream is cut, and the query is kept out."""
    srv = make_server(workers=2).start()
    sql = "SELECT * FROM range(400000000) t(i)"  # streams segment after segment
    started, outcome = threading.Event(), {}

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/api/v1/query/arrow", json.dumps({"sql": sql}).encode())
        resp = conn.getresponse()  # the headers leave with the first segment
        outcome["status"] = resp.status
        started.set()
        try:
            resp.read()
            outcome["whole"] = True
        except (http.client.IncompleteRead, ConnectionError):
            outcome["whole"] = False
        conn.close()

    thread = threading.Thread(target=client)
    thread.start()
    assert started.wait(60)
    os.kill(busy_worker(srv), signal.SIGSEGV)
    thread.join(60)
    assert outcome == {"status": 200, "whole": False}
    wait_for(lambda: srv.stats()["killed_by_query"] == 1, 10, what="the query to be quarantined")
    again = srv.query(sql, path="/api/v1/query/arrow")
    assert again.status == 400 and again.json()["error_type"] == "quarantined", again
    assert srv.stats()["retried"] == 0


def test_other_clients_get_right_answers_while_queries_kill_workers(make_server):
    """A steady client next to a hostile one: every answer right, none refused."""
    srv = make_server(workers=2, config="[queue]\nqueue_timeout_s = 60\n").start()
    normal = "SELECT count(*), sum(usage_user)::BIGINT FROM cpu"
    want = srv.query(normal).json()["data"]
    stop, answers = threading.Event(), []

    def steady():
        while not stop.is_set():
            resp = srv.query(normal)
            answers.append((resp.status, resp.json().get("data")))

    client = threading.Thread(target=steady)
    client.start()
    try:
        for i in range(4):
            thread, out = in_background(srv, f"{LONG} WHERE b.range <> {i}")
            os.kill(poison_worker(srv), signal.SIGSEGV)
            thread.join(60)
            assert out["resp"].json()["error_type"] == "quarantined", out["resp"]
            srv.wait_ready(2)
    finally:
        stop.set()
        client.join(60)
    assert answers and all(answer == (200, want) for answer in answers), \
        [a for a in answers if a != (200, want)][:5]
    assert not srv.events("crash_backoff") and srv.stats()["killed_by_query"] == 4


def poison_worker(srv) -> int:
    """The worker that stays busy while the other one serves the steady client's queries."""
    def served(workers, pids):
        return sum(w["served"] for w in workers if w["pid"] in pids)

    def stuck():
        before = {w["pid"]: w for w in srv.stats()["workers"]}
        wait_for(lambda: served(srv.stats()["workers"], before) >= served(before.values(), before) + 2,
                 30, what="the steady client to be served twice")
        after = {w["pid"]: w for w in srv.stats()["workers"]}
        return next((pid for pid, w in after.items() if w["state"] == "busy" and pid in before
                     and before[pid]["state"] == "busy" and w["served"] == before[pid]["served"]),
                    None)
    return executing(wait_for(stuck, 60, what="the worker running the poison query"))


def test_sql_error_found_mid_result_is_a_400_and_the_worker_serves_on(make_server):
    """DuckDB's error found while a result is read surfaces through pyarrow as an OSError: it is
    still the query's SQL error, not an internal one, so the worker is not replaced."""
    srv = make_server(workers=1).start()
    [worker] = srv.worker_pids()
    sql = "SELECT CASE WHEN i = 250000 THEN 'x'::INT ELSE i END AS v FROM range(300000) t(i)"
    for fmt in ("json", "arrow", "csv", "ndjson", "parquet"):
        resp = srv.query(sql, format=fmt)
        assert resp.status == 400 and resp.json()["error_type"] == "sql_error", (fmt, resp)
        assert "Conversion Error" in resp.json()["error"]
    assert srv.worker_pids() == [worker] and not srv.events("worker_recycling")
    assert srv.query("SELECT 1 AS ok").json()["data"] == [[1]]
