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

from harness.server import Server, assert_no_leaks, write_small_dataset

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


class Refusal(tuple):
    """What a hostile statement must get: status, error_type, and the start of the message,
    which says who refused it (DuckDB's sandbox, the statement policy, the parser...)."""

    def __new__(cls, status: int, error_type: str, message: str):
        return super().__new__(cls, (status, error_type, message))


SANDBOX = Refusal(403, "forbidden", "Permission Error: Cannot access file")  # DuckDB's file check
ONE_STATEMENT = Refusal(403, "forbidden", "one statement per request, got 2")  # the policy


def policy(statement_type: str) -> Refusal:
    """Refused by the statement policy, which names the type DuckDB's parser gave it."""
    return Refusal(403, "forbidden", f"{statement_type} statements are not allowed")


def refused(what: str) -> Refusal:
    """Refused by the allowlist of what a query may call (engine/allowlist.py), named."""
    return Refusal(403, "forbidden", f"{what} is not allowed")


NO_TABLE = Refusal(400, "sql_error", "Catalog Error: Table with name")
READING = Refusal(403, "forbidden", "reading '")  # a path in FROM that is not Parquet
PARSER = Refusal(400, "sql_error", "Parser Error")
OUT_OF_MEMORY = Refusal(400, "out_of_memory", "Out of Memory Error")
TOO_LARGE = Refusal(413, "too_large", "result is larger than max_result_mb (8 MiB)")
TIMEOUT = Refusal(504, "timeout", "query ran past its 3 s deadline")
CORPUS_SIZE = 83  # the README says so


def corpus(data, outside, secret, runtime):
    """(sql, Refusal): each an attempt to read, write or run something it must not."""
    s, o, d = secret, outside, data
    return [
        # reading files outside the allowed directories
        ("SELECT * FROM read_csv('/etc/passwd')", refused("table function read_csv()")),
        ("SELECT * FROM read_csv_auto('/etc/passwd')", refused("table function read_csv_auto()")),
        ("SELECT * FROM read_text('/etc/passwd')", refused("table function read_text()")),
        ("SELECT * FROM read_blob('/etc/passwd')", refused("table function read_blob()")),
        ("SELECT * FROM read_json('/etc/passwd')", refused("table function read_json()")),
        ("SELECT * FROM read_ndjson_objects('/etc/passwd')", refused("table function read_ndjson_objects()")),
        ("SELECT * FROM read_parquet('/etc/passwd')", SANDBOX),
        ("SELECT * FROM sniff_csv('/etc/passwd')", refused("table function sniff_csv()")),
        ("SELECT * FROM glob('/*')", refused("table function glob()")),
        ("SELECT * FROM glob('/etc/*')", refused("table function glob()")),
        ("FROM '/etc/passwd'", READING),  # a path: read only if it is Parquet
        (f"FROM '{s}'", READING),
        (f"SELECT * FROM '{s}'", READING),
        (f"SELECT * FROM read_text('{s}')", refused("table function read_text()")),
        (f"SELECT * FROM read_text('file://{s}')", refused("table function read_text()")),
        (f"SELECT * FROM parquet_metadata('{s}')", refused("table function parquet_metadata()")),
        ("SELECT * FROM read_text('/proc/self/environ')", refused("table function read_text()")),
        ("SELECT * FROM read_blob('/proc/self/cmdline')", refused("table function read_blob()")),
        (f"SELECT * FROM read_text('{runtime}/config.json')", refused("table function read_text()")),
        (f"SELECT * FROM glob('{runtime}/*')", refused("table function glob()")),
        (f"SELECT * FROM read_text(['{d}/default/cpu/2025/11/01/00/cpu.parquet', '{s}'])", refused("table function read_text()")),
        # '..' and symlinks out of the data directory
        (f"SELECT * FROM read_text('{d}/../secret.csv')", refused("table function read_text()")),
        (f"SELECT * FROM read_text('{d}/default/cpu/../../../secret.csv')", refused("table function read_text()")),
        (f"SELECT * FROM read_csv('{d}/default/leak.csv')", refused("table function read_csv()")),
        (f"SELECT * FROM read_text('{d}/default/leak.txt')", refused("table function read_text()")),
        (f"SELECT * FROM '{d}/default/leak.csv'", READING),
        (f"SELECT * FROM read_text('{d}/escape/secret.csv')", refused("table function read_text()")),
        (f"SELECT * FROM glob('{d}/escape/*')", refused("table function glob()")),
        (f"SELECT * FROM read_text('{d}/**/*.csv')", refused("table function read_text()")),
        (f"SELECT * FROM read_csv('{d}2/secret.csv')", refused("table function read_csv()")),  # a prefix, not a directory
        # A symlinked database directory is not followed: it is no table at all.
        ("SELECT * FROM evil.cpu", Refusal(400, "sql_error", 'Catalog Error: Table with name "evil.cpu" does not exist')),
        # table names with traversal
        ('SELECT * FROM "../secret.csv"', READING),  # a file name: DuckDB would try to read it
        ('SELECT * FROM "default"."../../secret"', NO_TABLE),
        ('SELECT * FROM "default"."../cpu"', NO_TABLE),
        ('SELECT * FROM "default/../evil".cpu', NO_TABLE),
        # the environment
        ("SELECT getenv('HOME')", refused("function getenv()")),
        ("SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')", refused("table function query()")),
        ("SELECT * FROM query_table('/etc/passwd')", refused("table function query_table()")),
        ("EXPLAIN ANALYZE SELECT * FROM read_text('/etc/passwd')", refused("EXPLAIN ANALYZE")),
        ("SUMMARIZE SELECT * FROM read_csv('/etc/passwd')", refused("table function read_csv()")),
        ("DESCRIBE SELECT * FROM read_csv('/etc/passwd')", refused("table function read_csv()")),
        ("SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')", SANDBOX),
        ("SELECT * FROM read_csv('s3://bucket/x.csv')", refused("table function read_csv()")),
        # writing, attaching, extensions, settings, secrets
        (f"COPY (SELECT 1) TO '{o}/copy.csv'", policy("COPY")),
        (f"COPY (SELECT 1) TO '{d}/default/copy.csv'", policy("COPY")),
        (f"COPY cpu TO '{o}/cpu.parquet' (FORMAT parquet)", policy("COPY")),
        (f"COPY cpu FROM '{s}'", policy("COPY")),
        (f"EXPORT DATABASE '{o}/export'", policy("EXPORT")),
        (f"ATTACH '{o}/new.duckdb' AS x", policy("ATTACH")),
        ("ATTACH ':memory:' AS m", policy("ATTACH")),
        ("DETACH \"default\"", policy("DETACH")),
        ("INSTALL httpfs", policy("LOAD")),
        ("FORCE INSTALL httpfs", policy("LOAD")),
        ("LOAD httpfs", policy("LOAD")),
        ("SET enable_external_access = true", policy("SET")),
        ("SET allowed_directories = ['/']", policy("SET")),
        ("SET lock_configuration = false", policy("SET")),
        ("RESET memory_limit", policy("SET")),
        ("SET VARIABLE x = 1", policy("SET")),
        ("PRAGMA enable_profiling", policy("PRAGMA")),
        (f"PRAGMA profiling_output = '{o}/profile.json'", policy("SET")),
        ("PRAGMA threads = 8", policy("SET")),
        ("CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", policy("CREATE")),
        ("CREATE PERSISTENT SECRET p (TYPE s3, KEY_ID 'a', SECRET 'b')", policy("CREATE")),
        ("CREATE TABLE t AS SELECT * FROM read_text('/etc/passwd')", policy("CREATE")),
        ("CREATE MACRO m() AS 1", policy("CREATE")),
        ("DROP VIEW cpu", policy("DROP")),
        ("USE memory", policy("SET")),
        (f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{o}/explain.csv'", refused("EXPLAIN ANALYZE")),
        # several statements, hidden behind comments and quotes
        (f"SELECT 1; COPY (SELECT 1) TO '{o}/second.csv'", ONE_STATEMENT),
        (f"SELECT 1 /* ; */; COPY (SELECT 1) TO '{o}/hidden.csv'", ONE_STATEMENT),
        (f"SELECT 1 -- ;\n; EXPORT DATABASE '{o}/hidden-export'", ONE_STATEMENT),
        (f"/* SELECT */ COPY (SELECT 1) TO '{o}/comment.csv' /* ; SELECT 1 */", policy("COPY")),
        ("SELECT ';'; INSTALL httpfs", ONE_STATEMENT),
        (f"SELECT $$;$$; ATTACH '{o}/dollar.duckdb' AS a", ONE_STATEMENT),
        # deeply nested expressions
        ("SELECT " + "(" * 100_000 + "1" + ")" * 100_000, PARSER),
        ("SELECT " + "abs(" * 5_000 + "1" + ")" * 5_000, PARSER),
        ("SELECT x FROM " + "(SELECT x FROM " * 3_000 + "(SELECT 1 AS x) t" + ") t" * 3_000, PARSER),
        ("SELECT " + "+".join(["1"] * 50_000), PARSER),
        # more than the limits allow
        ("SELECT list(i) FROM range(300000000) t(i)", OUT_OF_MEMORY),
        ("SELECT string_agg(i::VARCHAR, ',') FROM range(200000000) t(i)", OUT_OF_MEMORY),
        ("SELECT * FROM range(100000000) t(i)", TOO_LARGE),
        ("SELECT count(*) FROM range(1000000) a, range(1000000) b, range(1000000) c", TIMEOUT),
    ]


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_hostile_sql_corpus(srv, trap):
    cases = corpus(trap["data"], trap["outside"], trap["secret"], srv.runtime_dir)
    assert len(cases) == CORPUS_SIZE
    workers = sorted(srv.worker_pids())
    data_before = files_under(trap["data"])
    wrong = []
    for sql, (status, error_type, message) in cases:
        resp = srv.query(sql)
        assert SECRET.encode() not in resp.body, sql
        doc = resp.json()
        assert doc["success"] is False and doc["error"] and "Traceback" not in doc["error"], sql
        if (resp.status, doc["error_type"]) != (status, error_type) \
                or not doc["error"].startswith(message):
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
    assert len(BAD_BODIES) == 26  # the README says so
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
    assert len(cases) == 8  # the README says so
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
