"""Bad input and the statement policy: a clear JSON error with the right status, every time,
and the server keeps serving."""

import pytest

FORBIDDEN = [
    "INSERT INTO t VALUES (1)", "UPDATE t SET a = 1", "DELETE FROM t", "CREATE TABLE t (a INT)",
    "CREATE VIEW v AS SELECT 1", "DROP VIEW cpu", "COPY (SELECT 1) TO '/tmp/duckfleet-x.csv'",
    "EXPORT DATABASE '/tmp/duckfleet-export'", "ATTACH '/tmp/x.duckdb' AS x", "DETACH x",
    "INSTALL httpfs", "LOAD httpfs", "SET threads = 4", "RESET memory_limit",
    "PRAGMA memory_limit = '1GB'", "CALL pragma_version()", "CHECKPOINT",
    "SELECT 1; SELECT 2", "SELECT 1; DROP VIEW cpu", "SELECT 1 /* hidden */; CREATE TABLE t (a INT)",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/duckfleet-y.csv'", "BEGIN TRANSACTION",
    "VACUUM", "USE memory", "PREPARE p AS SELECT 1", "CREATE SECRET s (TYPE s3)",
]


def error_of(resp, status, error_type):
    assert resp.status == status, resp
    doc = resp.json()
    assert doc["success"] is False
    assert doc["error_type"] == error_type
    assert doc["error"]
    assert "Traceback" not in doc["error"]
    return doc["error"]


@pytest.mark.parametrize("sql", FORBIDDEN)
def test_non_reads_are_forbidden(server, sql):
    message = error_of(server.query(sql), 403, "forbidden")
    assert "not allowed" in message or "one statement" in message


def test_forbidden_names_the_statement_type(server):
    assert "INSERT" in error_of(server.query("INSERT INTO t VALUES (1)"), 403, "forbidden")
    assert "COPY" in error_of(server.query("COPY (SELECT 1) TO 'x.csv'"), 403, "forbidden")


@pytest.mark.parametrize("sql", ["SELECT 42", "WITH a AS (SELECT 1 AS x) SELECT * FROM a",
                                 "FROM range(3)", "VALUES (1), (2)", "DESCRIBE cpu", "SHOW TABLES",
                                 "SUMMARIZE SELECT 1 AS a", "EXPLAIN SELECT 1", "PRAGMA version",
                                 "SELECT 1; -- trailing comment"])
def test_reads_pass(server, sql):
    assert server.query(sql).status == 200


def test_missing_empty_and_malformed(server):
    error_of(server.query(), 400, "bad_request")
    error_of(server.query(""), 400, "bad_request")
    error_of(server.query("   "), 400, "bad_request")
    error_of(server.request("POST", "/api/v1/query", b"{not json"), 400, "bad_request")
    error_of(server.request("POST", "/api/v1/query", b""), 400, "bad_request")
    error_of(server.query(123), 400, "bad_request")
    error_of(server.query("SELECT 1", format="xml"), 400, "bad_request")
    error_of(server.query("SELECT 1", timeout_ms=-5), 400, "bad_request")
    error_of(server.query("SELECT 1", priority="urgent"), 400, "bad_request")
    error_of(server.query("SELECT '\x00'"), 400, "bad_request")
    error_of(server.query("SELECT $1", params=[-83268221769148481536]), 400, "bad_request")


def test_sql_errors_carry_duckdb_message(server):
    assert "syntax error" in error_of(server.query("SELEC 1"), 400, "sql_error")
    assert "nope" in error_of(server.query("SELECT nope FROM cpu"), 400, "sql_error")
    assert "no_such_table" in error_of(server.query("SELECT * FROM no_such_table"), 400, "sql_error")
    error_of(server.query("SELECT 1/0::INTEGER AS x, 'a'::INTEGER"), 400, "sql_error")


def test_a_failed_query_leaves_its_worker_clean(make_server, demo_dir):
    """The same failing statements many times in a row on one worker, with idle ticks between:
    each fails for its own reason, never with an aborted transaction left by the one before
    (DuckDB aborts the next failing relation's transaction while a result is open)."""
    srv = make_server(workers=1, config="[workers]\nheartbeat_s = 0.05\n").start()
    failing = [(f"SELECT * FROM read_parquet('{demo_dir}/default/nope/*.parquet')", "file_missing"),
               ("SELECT nope FROM cpu", "sql_error"), ("SELECT 'a'::INTEGER", "sql_error")]
    for _ in range(3):
        for sql, kind in failing:
            error = error_of(srv.query(sql), 400, kind)
            assert "transaction" not in error.lower(), error
        assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]


def test_body_over_limit(server):
    big = b'{"sql": "SELECT 1 -- ' + b"x" * (1024 * 1024 + 10) + b'"}'
    error_of(server.request("POST", "/api/v1/query", big), 413, "too_large")


def test_unknown_route_is_json(server):
    error_of(server.get("/nope"), 404, "bad_request")
    error_of(server.get("/api/v1/query"), 405, "bad_request")


def test_ready_once_workers_are_connected(server):
    for path in ("/ready", "/health/ready"):
        resp = server.get(path)
        assert resp.status == 200 and resp.json() == {"ready": True, "workers_ready": 2}
    assert server.get("/health").json() == {"status": "ok", "workers_ready": 2}


def test_still_serving_after_errors(server):
    for sql in FORBIDDEN[:5] + ["SELEC", "SELECT nope"]:
        server.query(sql)
    assert server.query("SELECT 1 AS ok").json()["data"] == [[1]]
    assert server.stats()["crashed"] == 0


@pytest.mark.parametrize("fmt", ["json", "arrow", "csv", "ndjson", "parquet"])
def test_sql_error_after_the_first_batch_is_a_sql_error(server, fmt):
    """DuckDB's error in a later batch (pyarrow's reader raises it as an OSError) is still a
    400 sql_error with DuckDB's message, not an internal error. One segment holds the result,
    so the status can still say so."""
    sql = "SELECT CASE WHEN i = 200000 THEN error('late failure') ELSE i END AS x FROM range(200001) t(i)"
    message = error_of(server.query(sql, format=fmt), 400, "sql_error")
    assert "late failure" in message
    assert not server.events("query_failed")
