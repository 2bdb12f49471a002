"""Hostile input: SQL and HTTP that try to escape the sandbox or take the server down.

One fleet with small limits serves a tiny dataset whose directory also holds traps: symlinks
to a secret file and to a directory outside it, and a database directory that is a symlink
out of the data directory. Every input must be refused with a clear JSON error (4xx; or 504
for the query that only a timeout can stop), the secret must never appear in a response,
no file may appear where COPY or EXPORT would have written, the data directory must be
unchanged, and afterwards the same workers still answer.
"""

import json
import os
import secrets
import socket

import duckdb
import pytest

from tests.harness import Server, assert_no_leaks, write_small_dataset

SECRET = "DUCKFLEET-SECRET-" + secrets.token_hex(8)
LIMITS = """
[duckdb]
memory_limit = "256MB"
[queue]
query_timeout_s = 3
[results]
max_result_mb = 8
"""


@pytest.fixture(scope="module")
def trap(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = write_small_dataset(root / "data", ("default",))
    secret = root / "secret.csv"
    secret.write_text(f"secret\n{SECRET}\n")
    os.symlink(secret, data / "default" / "leak.csv")
    os.symlink(secret, data / "default" / "leak.txt")
    os.symlink(root, data / "escape")
    outside_db = root / "outside_db" / "cpu" / "2025"
    outside_db.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"COPY (SELECT '{SECRET}' AS secret) TO '{outside_db / 'x.parquet'}' (FORMAT parquet)")
    con.close()
    os.symlink(root / "outside_db", data / "evil")  # a database directory pointing out
    sibling = root / "data2"  # shares the data directory's name as a prefix
    sibling.mkdir()
    (sibling / "secret.csv").write_text(secret.read_text())
    (root / "outside").mkdir()
    return {"root": root, "data": data, "secret": secret, "outside": root / "outside"}


@pytest.fixture(scope="module")
def srv(trap, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("srv"), trap["data"], config=LIMITS).start()
    yield server
    assert server.stop() == 0
    assert_no_leaks(server)


def corpus(data, outside, secret, runtime):
    """(sql, error_type): each an attempt to read, write or run something it must not."""
    s, o, d = secret, outside, data
    forbidden, sql_error = "forbidden", "sql_error"
    return [
        # reading files outside the allowed directories
        ("SELECT * FROM read_csv('/etc/passwd')", forbidden),
        ("SELECT * FROM read_csv_auto('/etc/passwd')", forbidden),
        ("SELECT * FROM read_text('/etc/passwd')", forbidden),
        ("SELECT * FROM read_blob('/etc/passwd')", forbidden),
        ("SELECT * FROM read_json('/etc/passwd')", forbidden),
        ("SELECT * FROM read_ndjson_objects('/etc/passwd')", forbidden),
        ("SELECT * FROM read_parquet('/etc/passwd')", forbidden),
        ("SELECT * FROM sniff_csv('/etc/passwd')", forbidden),
        ("SELECT * FROM glob('/*')", forbidden),
        ("SELECT * FROM glob('/etc/*')", forbidden),
        ("FROM '/etc/passwd'", forbidden),  # a path: read only if it is Parquet
        (f"FROM '{s}'", forbidden),
        (f"SELECT * FROM '{s}'", forbidden),
        (f"SELECT * FROM read_text('{s}')", forbidden),
        (f"SELECT * FROM read_text('file://{s}')", forbidden),
        (f"SELECT * FROM parquet_metadata('{s}')", forbidden),
        ("SELECT * FROM read_text('/proc/self/environ')", forbidden),
        ("SELECT * FROM read_blob('/proc/self/cmdline')", forbidden),
        (f"SELECT * FROM read_text('{runtime}/config.json')", forbidden),
        (f"SELECT * FROM glob('{runtime}/*')", forbidden),
        (f"SELECT * FROM read_text(['{d}/default/cpu/2025/11/01/00/cpu.parquet', '{s}'])", forbidden),
        # '..' and symlinks out of the data directory
        (f"SELECT * FROM read_text('{d}/../secret.csv')", forbidden),
        (f"SELECT * FROM read_text('{d}/default/cpu/../../../secret.csv')", forbidden),
        (f"SELECT * FROM read_csv('{d}/default/leak.csv')", forbidden),
        (f"SELECT * FROM read_text('{d}/default/leak.txt')", forbidden),
        (f"SELECT * FROM '{d}/default/leak.csv'", forbidden),
        (f"SELECT * FROM read_text('{d}/escape/secret.csv')", forbidden),
        (f"SELECT * FROM glob('{d}/escape/*')", forbidden),
        (f"SELECT * FROM read_text('{d}/**/*.csv')", forbidden),
        (f"SELECT * FROM read_csv('{d}2/secret.csv')", forbidden),  # a prefix, not a directory
        ("SELECT * FROM evil.cpu", forbidden),  # the catalog's view over the symlinked database
        # table names with traversal
        ('SELECT * FROM "../secret.csv"', forbidden),  # a file name: DuckDB tries to read it
        ('SELECT * FROM "default"."../../secret"', sql_error),
        ('SELECT * FROM "default"."../cpu"', sql_error),
        ('SELECT * FROM "default/../evil".cpu', sql_error),
        # the environment
        ("SELECT getenv('HOME')", forbidden),
        ("SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')", forbidden),
        ("SELECT * FROM query_table('/etc/passwd')", forbidden),
        ("EXPLAIN ANALYZE SELECT * FROM read_text('/etc/passwd')", forbidden),
        ("SUMMARIZE SELECT * FROM read_csv('/etc/passwd')", forbidden),
        ("DESCRIBE SELECT * FROM read_csv('/etc/passwd')", forbidden),
        ("SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')", forbidden),
        ("SELECT * FROM read_csv('s3://bucket/x.csv')", forbidden),
        # writing, attaching, extensions, settings, secrets
        (f"COPY (SELECT 1) TO '{o}/copy.csv'", forbidden),
        (f"COPY (SELECT 1) TO '{d}/default/copy.csv'", forbidden),
        (f"COPY cpu TO '{o}/cpu.parquet' (FORMAT parquet)", forbidden),
        (f"COPY cpu FROM '{s}'", forbidden),
        (f"EXPORT DATABASE '{o}/export'", forbidden),
        (f"ATTACH '{o}/new.duckdb' AS x", forbidden),
        ("ATTACH ':memory:' AS m", forbidden),
        ("DETACH \"default\"", forbidden),
        ("INSTALL httpfs", forbidden),
        ("FORCE INSTALL httpfs", forbidden),
        ("LOAD httpfs", forbidden),
        ("SET enable_external_access = true", forbidden),
        ("SET allowed_directories = ['/']", forbidden),
        ("SET lock_configuration = false", forbidden),
        ("RESET memory_limit", forbidden),
        ("SET VARIABLE x = 1", forbidden),
        ("PRAGMA enable_profiling", forbidden),
        (f"PRAGMA profiling_output = '{o}/profile.json'", forbidden),
        ("PRAGMA threads = 8", forbidden),
        ("CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", forbidden),
        ("CREATE PERSISTENT SECRET p (TYPE s3, KEY_ID 'a', SECRET 'b')", forbidden),
        ("CREATE TABLE t AS SELECT * FROM read_text('/etc/passwd')", forbidden),
        ("CREATE MACRO m() AS 1", forbidden),
        ("DROP VIEW cpu", forbidden),
        ("USE memory", forbidden),
        (f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{o}/explain.csv'", forbidden),
        # several statements, hidden behind comments and quotes
        (f"SELECT 1; COPY (SELECT 1) TO '{o}/second.csv'", forbidden),
        (f"SELECT 1 /* ; */; COPY (SELECT 1) TO '{o}/hidden.csv'", forbidden),
        (f"SELECT 1 -- ;\n; EXPORT DATABASE '{o}/hidden-export'", forbidden),
        (f"/* SELECT */ COPY (SELECT 1) TO '{o}/comment.csv' /* ; SELECT 1 */", forbidden),
        ("SELECT ';'; INSTALL httpfs", forbidden),
        (f"SELECT $$;$$; ATTACH '{o}/dollar.duckdb' AS a", forbidden),
        # deeply nested expressions
        ("SELECT " + "(" * 100_000 + "1" + ")" * 100_000, sql_error),
        ("SELECT " + "abs(" * 5_000 + "1" + ")" * 5_000, sql_error),
        ("SELECT x FROM " + "(SELECT x FROM " * 3_000 + "(SELECT 1 AS x) t" + ") t" * 3_000, sql_error),
        ("SELECT " + "+".join(["1"] * 50_000), sql_error),
        # more than the limits allow
        ("SELECT list(i) FROM range(300000000) t(i)", "out_of_memory"),
        ("SELECT string_agg(i::VARCHAR, ',') FROM range(200000000) t(i)", "out_of_memory"),
        ("SELECT * FROM range(100000000) t(i)", "too_large"),
        ("SELECT count(*) FROM range(1000000) a, range(1000000) b, range(1000000) c", "timeout"),
    ]


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_hostile_sql_corpus(srv, trap):
    cases = corpus(trap["data"], trap["outside"], trap["secret"], srv.runtime_dir)
    assert len(cases) >= 40
    workers = sorted(srv.worker_pids())
    data_before = files_under(trap["data"])
    wrong = []
    for sql, want in cases:
        resp = srv.query(sql)
        assert SECRET.encode() not in resp.body, sql
        doc = resp.json()
        assert doc["success"] is False and doc["error"] and "Traceback" not in doc["error"], sql
        status = {"timeout": 504}.get(want, 403 if want == "forbidden" else
                                      413 if want == "too_large" else 400)
        if (resp.status, doc["error_type"]) != (status, want):
            wrong.append((sql[:120], resp.status, doc["error_type"], doc["error"][:200]))
    assert not wrong, "\n".join(map(str, wrong))
    print(f"{len(cases)} hostile statements refused")
    assert files_under(trap["outside"]) == []
    assert files_under(trap["data"]) == data_before
    assert sorted(srv.worker_pids()) == workers, "a worker was replaced"
    assert srv.stats()["crashed"] == 0 and not srv.events("crashed")
    assert srv.query("SELECT count(*) AS n FROM cpu").json()["data"] == [[10]]


def test_tiny_deadlines_time_out_cleanly(srv):
    """A deadline can expire anywhere, also while pyarrow reads DuckDB's batches: 200 or 504."""
    outcomes = set()
    for fmt in ("json", "csv", "ndjson", "arrow", "parquet"):
        for timeout_ms in (1, 2, 3, 5) * 5:
            resp = srv.query("SELECT 42 AS answer, 'duck' AS name", format=fmt, timeout_ms=timeout_ms)
            outcomes.add(resp.status if resp.status == 200 else (resp.status, resp.json()["error_type"]))
    assert outcomes <= {200, (504, "timeout")}, outcomes
    assert srv.stats()["crashed"] == 0


BAD_BODIES = [
    b"{not json", b"", b"null", b"[]", b'"SELECT 1"', b"42", b'{"sql": null}', b'{"sql": 1}',
    b'{"sql": ["SELECT 1"]}', b'{"sql": {"a": 1}}', b'{"sql": "SELECT 1", "format": 1}',
    b'{"sql": "SELECT 1", "format": ["json"]}', b'{"sql": "SELECT 1", "params": "x"}',
    b'{"sql": "SELECT 1", "params": {"a": 1}}', b'{"sql": "SELECT 1", "timeout_ms": "10"}',
    b'{"sql": "SELECT 1", "timeout_ms": 0}', b'{"sql": "SELECT 1", "timeout_ms": 1.5}',
    b'{"sql": "SELECT 1", "timeout_ms": 1e400}',
    b'{"sql": "SELECT 1", "priority": 1}', b'{"sql": "SELECT \\u0000"}',
    b'{"sql": "SELECT 1 AS \\ud800"}', b'{"sql": "SELECT \xff\xfe"}', b'\xef\xbb\xbf{"sql": "SELECT 1"}',
    b'{"sql": "SELECT 1", "params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"sql": "' + b"x" * (10 * 1024 * 1024) + b'"}',  # 10 MB of SQL
    b'{"sql": "SELECT 1"' + b" " * (2 * 1024 * 1024) + b"}",
]


def test_malformed_bodies(srv):
    for body in BAD_BODIES:
        resp = srv.request("POST", "/api/v1/query", body, {"Content-Type": "application/json"})
        assert 400 <= resp.status < 500, (body[:60], resp)
        doc = resp.json()
        assert doc["success"] is False and doc["error_type"] in ("bad_request", "too_large"), body[:60]
        assert (resp.status == 413) == (len(body) > 1024 * 1024), body[:60]


def raw(srv, payload: bytes) -> bytes:
    """Send payload, read until the server closes (requests say Connection: close)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_malformed_http(srv):
    body = b'{"sql": "SELECT 1"}'
    post = (b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\n")
    cases = {
        "header line over 8 KB": post + b"X-Big: " + b"a" * 100_000 + b"\r\n"
                                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
        "request line over 8 KB": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "thousands of headers": post + b"".join(b"X-%d: 1\r\n" % i for i in range(5000))
                                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
        "garbage": b"\x00\x01\x02 not http\r\n\r\n",
        "bad content length": post + b"Content-Length: -5\r\n\r\n" + body,
        "two content lengths": post + b"Content-Length: 19\r\nContent-Length: 5\r\n\r\n" + body,
        "chunked body over the limit": post + b"Transfer-Encoding: chunked\r\n\r\n"
                                       + b"".join(b"100000\r\n" + b" " * 0x100000 + b"\r\n" for _ in range(3))
                                       + b"0\r\n\r\n",
        "bad chunk size": post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body + b"\r\n0\r\n\r\n",
    }
    for name, payload in cases.items():
        reply = raw(srv, payload)
        assert reply.startswith(b"HTTP/1."), name
        assert 400 <= status_of(reply) < 500, (name, reply[:200])
    resp = srv.request("GET", "/api/v1/query")
    assert resp.status == 405 and resp.json()["error_type"] == "bad_request"
    assert "POST" in resp.headers["Allow"]
    assert srv.query("SELECT 1 AS ok").json()["data"] == [[1]]
    assert srv.stats()["crashed"] == 0
    # aiohttp's own reports of unparsable requests are JSON lines too, without tracebacks.
    assert all(line.startswith("{") for line in srv.log().splitlines())
    assert srv.events("bad_http_request")


def test_sandbox_settings_read_back_from_a_live_worker(srv, trap):
    # Settings are not for clients (they hold the server's paths): the worker's own read-back,
    # logged when it became ready, is what is checked here.
    assert srv.query("SELECT * FROM duckdb_settings()").status == 403
    settings = next(e for e in srv.events("ready") if e.get("process") == "worker")
    print(json.dumps(settings, indent=2))
    assert settings["enable_external_access"] == "false"
    assert settings["autoinstall_known_extensions"] == "false"
    assert settings["autoload_known_extensions"] == "false"
    assert settings["allow_community_extensions"] == "false"
    assert settings["python_enable_replacements"] == "false"
    assert settings["lock_configuration"] == "true"
    assert settings["allowed_paths"] == "[]"
    temp = settings["temp_directory"]
    assert temp.startswith(str(srv.runtime_dir.resolve()) + "/tmp-worker-")
    def directories(text):  # DuckDB lists them sorted, whatever the order they were set in
        return set(text.strip("[]").split(", "))
    assert directories(settings["allowed_directories"]) == {f"{trap['data'].resolve()}/", f"{temp}/"}
    # Every worker said the same when it became ready.
    ready = [e for e in srv.events("ready") if e.get("process") == "worker"]
    assert len(ready) == srv.workers
    for event in ready:
        assert event["lock_configuration"] == "true" and event["enable_external_access"] == "false"
        assert f"{trap['data'].resolve()}/" in directories(event["allowed_directories"])
