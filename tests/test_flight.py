"""Arrow Flight SQL through the real ADBC driver (Go, in adbc-driver-flightsql) against a real
fleet: results of every type compared with in-process DuckDB, parameters, catalog commands,
pandas and polars, auth, errors as gRPC statuses, cancellation, concurrency, the shared cache,
recycling, and the port surviving a gateway restart."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import subprocess
import threading

import adbc_driver_flightsql as flightsql
import adbc_driver_flightsql.dbapi as fsql
import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from engine import tokens
from gateway.flight import codec, metadata
from harness.server import Server, assert_no_leaks, wait_for, write_small_dataset

TYPES_SQL = """
SELECT
  CASE WHEN i = 1 THEN NULL ELSE 1::TINYINT END AS tiny,
  CASE WHEN i = 1 THEN NULL ELSE 2::SMALLINT END AS small,
  CASE WHEN i = 1 THEN NULL ELSE 3::INTEGER END AS int,
  CASE WHEN i = 1 THEN NULL ELSE 4::BIGINT END AS big,
  CASE WHEN i = 1 THEN NULL ELSE 170141183460469231731687303715884105727::HUGEINT END AS huge,
  CASE WHEN i = 1 THEN NULL ELSE 200::UTINYINT END AS utiny,
  CASE WHEN i = 1 THEN NULL ELSE 18446744073709551615::UBIGINT END AS ubig,
  CASE WHEN i = 1 THEN NULL ELSE 123.45::DECIMAL(10, 2) END AS dec,
  CASE WHEN i = 1 THEN NULL ELSE 0.1::FLOAT END AS flt,
  CASE WHEN i = 1 THEN 'NaN'::DOUBLE ELSE 'Infinity'::DOUBLE END AS dbl,
  CASE WHEN i = 1 THEN NULL ELSE TIMESTAMP '2025-11-01 08:00:00.123456' END AS ts,
  CASE WHEN i = 1 THEN NULL ELSE '2025-11-01 08:00:01'::TIMESTAMP_S END AS ts_s,
  CASE WHEN i = 1 THEN NULL ELSE '2025-11-01 08:00:01.5'::TIMESTAMP_MS END AS ts_ms,
  CASE WHEN i = 1 THEN NULL ELSE '2025-11-01 08:00:01.123456789'::TIMESTAMP_NS END AS ts_ns,
  CASE WHEN i = 1 THEN NULL ELSE TIMESTAMPTZ '2025-11-01 08:00:00+02' END AS tstz,
  CASE WHEN i = 1 THEN NULL ELSE DATE '2025-11-01' END AS dt,
  CASE WHEN i = 1 THEN NULL ELSE TIME '08:00:00.5' END AS tm,
  CASE WHEN i = 1 THEN INTERVAL 3 MONTH ELSE INTERVAL '1 day 2 hours' END AS iv,
  CASE WHEN i = 1 THEN NULL ELSE '\\xAA\\xBB'::BLOB END AS bl,
  CASE WHEN i = 1 THEN NULL ELSE [1, 2, NULL] END AS lst,
  [i::INTEGER, 2]::INTEGER[2] AS arr,
  CASE WHEN i = 1 THEN NULL ELSE {'a': 1, 'b': 'x'} END AS st,
  CASE WHEN i = 1 THEN NULL ELSE MAP {'k': 1} END AS mp,
  CASE WHEN i = 1 THEN NULL ELSE 'text' END AS txt,
  CASE WHEN i = 1 THEN NULL ELSE 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::UUID END AS id,
  CASE WHEN i = 1 THEN NULL ELSE 'b'::ENUM('a', 'b') END AS en,
  NULL AS nothing
FROM range(2) t(i) ORDER BY i
"""
SLOW_SQL = "SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b"


def connect(srv, **options) -> fsql.Connection:
    return fsql.connect(f"grpc://127.0.0.1:{srv.flight_port}", db_kwargs=options or None,
                        autocommit=True)


def fetch(con, sql, params=None):
    with con.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetch_arrow_table()


def raises(fragment: str, fn, *args):
    """The call fails, and its message carries the gRPC status (as the driver names it)."""
    with pytest.raises(Exception) as info:
        fn(*args)
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


def http_rows(srv, sql, **fields):
    response = srv.query(sql, **fields)
    assert response.status == 200, response
    return response.json()["data"]


def stats_busy(srv) -> int:
    return srv.stats()["busy"]


def local_duckdb():
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # as every worker
    return con


@pytest.fixture(scope="module")
def flight_server(tmp_path_factory, demo_dir):
    """One 2-worker fleet with the result cache on, for this module's tests."""
    srv = Server(tmp_path_factory.mktemp("flight"), demo_dir,
                 config="[query_cache]\nenabled = true\n").start()
    assert srv.flight_port, "the listening line names the Flight port"
    yield srv
    assert srv.stop() == 0
    assert_no_leaks(srv)


def test_results_of_every_type_match_in_process_duckdb(flight_server):
    with connect(flight_server) as con:
        got = fetch(con, TYPES_SQL)
    want = local_duckdb().execute(TYPES_SQL).to_arrow_table()
    assert got.schema.equals(want.schema), f"{got.schema}\n!=\n{want.schema}"
    # NaN is not equal to itself: that column is compared as text
    assert got.drop_columns(["dbl"]).equals(want.drop_columns(["dbl"]))
    assert [str(v) for v in got.column("dbl").to_pylist()] == ["inf", "nan"]
    assert [str(v) for v in want.column("dbl").to_pylist()] == ["inf", "nan"]


def test_a_large_result_streams_in_batches(flight_server):
    sql = "SELECT * FROM cpu ORDER BY time, host"
    with connect(flight_server) as con:
        got = fetch(con, sql)
    assert got.num_rows == http_rows(flight_server, "SELECT count(*) FROM cpu")[0][0]
    assert len(got.to_batches()) > 1  # the worker's batches, not one re-assembled table


def test_positional_parameters_across_executions(flight_server):
    sql = "SELECT host, count(*) AS n FROM cpu WHERE host = $1 GROUP BY host"
    with connect(flight_server) as con, con.cursor() as cur:
        for host in ("server01", "server07", "server03"):
            cur.execute(sql, [host])
            assert [list(r) for r in cur.fetchall()] == http_rows(flight_server, sql,
                                                                  params=[host])
        cur.execute("SELECT ? + 1 AS y, ? AS s", [41, "x"])
        assert cur.fetchall() == [(42, "x")]


def test_executemany_is_refused_clearly(flight_server):
    with connect(flight_server) as con, con.cursor() as cur:
        message = raises("PermissionDenied", cur.executemany, "SELECT $1::INT AS y", [[1], [2]])
    assert "executemany" in message


def test_catalog_commands(flight_server):
    described = flight_server.get("/api/v1/catalog").json()
    with connect(flight_server) as con:
        info = con.adbc_get_info()
        objects = con.adbc_get_objects().read_all().to_pylist()
        schema = con.adbc_get_table_schema("cpu", db_schema_filter="default")
        queried = fetch(con, 'SELECT * FROM "default".cpu LIMIT 0').schema
        types = con.adbc_get_table_types()
        raises("NOT_FOUND", con.adbc_get_table_schema, "no_such_table")
    assert info["vendor_name"] == "duckfleet"
    assert types == ["TABLE"]
    [catalog] = objects
    assert catalog["catalog_name"] == "memory"
    listed = {(s["db_schema_name"], t["table_name"]): [c["column_name"] for c in t["table_columns"]]
              for s in catalog["catalog_db_schemas"] for t in s["db_schema_tables"]}
    assert listed == {(db["name"], t["name"]): [c["name"] for c in t["columns"]]
                      for db in described["databases"] for t in db["tables"]}
    assert schema.equals(queried)  # what the catalog says is what a query gives


def test_keys_type_info_and_writes_with_a_plain_flight_client(flight_server):
    """What ADBC does not ask but JDBC does, through pyarrow's Flight client and the codec."""
    client = flight.connect(f"grpc://127.0.0.1:{flight_server.flight_port}")
    for command, schema in (("CommandGetPrimaryKeys", metadata.PRIMARY_KEYS),
                            ("CommandGetImportedKeys", metadata.FOREIGN_KEYS),
                            ("CommandGetExportedKeys", metadata.FOREIGN_KEYS),
                            ("CommandGetXdbcTypeInfo", metadata.XDBC_TYPE_INFO)):
        descriptor = flight.FlightDescriptor.for_command(codec.pack(command))
        info = client.get_flight_info(descriptor)
        assert info.schema == schema and len(info.endpoints) == 1
        assert info.endpoints[0].locations == []
        table = client.do_get(info.endpoints[0].ticket).read_all()
        assert table.schema == schema and table.num_rows == 0
    info = client.get_flight_info(flight.FlightDescriptor.for_command(codec.pack("CommandGetSqlInfo")))
    every = client.do_get(info.endpoints[0].ticket).read_all()
    assert every.schema == metadata.SQL_INFO and every.num_rows > 70  # what JDBC reads
    update = flight.FlightDescriptor.for_command(
        codec.pack("CommandStatementUpdate", query="DELETE FROM cpu"))
    with pytest.raises(flight.FlightUnauthorizedError, match="only reads"):
        client.get_flight_info(update)
    with pytest.raises(flight.FlightUnauthorizedError, match="only reads"):
        writer, _ = client.do_put(update, pa.schema([]))
        writer.close()
    client.close()


def test_pandas_and_polars_read_through_adbc(flight_server):
    pandas = pytest.importorskip("pandas")
    polars = pytest.importorskip("polars")
    sql = "SELECT host, avg(usage_user) AS usage FROM cpu GROUP BY host ORDER BY host"
    want = http_rows(flight_server, sql)
    with connect(flight_server) as con:
        frame = pandas.read_sql(sql, con)
        pl_frame = polars.read_database(sql, connection=con)
    assert frame.values.tolist() == want
    assert pl_frame.rows() == [tuple(r) for r in want]


def test_errors_become_grpc_statuses(flight_server):
    with connect(flight_server) as con, con.cursor() as cur:
        message = raises("InvalidArgument", cur.execute, "SELEC 1")
        assert "sql_error" in message and "syntax error" in message
        assert "/work" not in message and "gateway/flight" not in message  # no server paths
        raises("PermissionDenied", cur.execute, "COPY (SELECT 1) TO 'x.csv'")
        raises("PermissionDenied", cur.execute, "SELECT * FROM read_csv('x.csv')")
        cur.execute("SELECT 1 AS still_fine")  # the cursor serves on
        assert cur.fetchall() == [(1,)]


def test_a_cancelled_call_frees_its_worker(flight_server):
    pids = sorted(flight_server.worker_pids())
    options = {flightsql.ConnectionOptions.TIMEOUT_FETCH.value: "1"}
    with connect(flight_server, **options) as con, con.cursor() as cur:
        raises("DeadlineExceeded", cur.execute, SLOW_SQL)
    # query_timeout_s is 300 s: only the cancellation can have stopped the query
    wait_for(lambda: stats_busy(flight_server) == 0, 30, what="the worker free again")
    assert sorted(flight_server.worker_pids()) == pids  # interrupted, not killed


def test_listed_logged_and_cancellable_like_http(flight_server):
    srv = flight_server
    with connect(srv) as con:
        rows = fetch(con, "SELECT * FROM mem WHERE host = 'server04'").num_rows
        wait_for(lambda: [e for e in srv.events("access") if e["method"] == "DoGet"
                          and e.get("rows") == rows], 10, what="the DoGet's access line")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(fetch, con, SLOW_SQL)
            running = wait_for(lambda: [q for q in srv.get("/api/v1/queries").json()["queries"]
                                        if q["route"] == "flight" and "range(200000)" in
                                        q["sql"] and "LIMIT 0" not in q["sql"]],
                               20, what="the Flight query listed")
            srv.request("DELETE", f"/api/v1/queries/{running[0]['request_id']}")
            with pytest.raises(Exception, match="Cancelled"):
                slow.result(30)
    access = [e for e in srv.events("access") if e["request_id"] == running[0]["request_id"]]
    assert access and access[0]["error_type"] == "cancelled"
    assert 'route="flight"' in srv.get("/metrics").body.decode()


def test_sixteen_concurrent_clients(flight_server):
    hosts = [f"server{n:02d}" for n in range(1, 17)]
    sql = "SELECT host, count(*) AS n, max(usage_user) AS top FROM cpu WHERE host = $1 GROUP BY host"
    want = {h: http_rows(flight_server, sql, params=[h]) for h in hosts}

    def client(host):
        with connect(flight_server) as con, con.cursor() as cur:
            got = []
            for _ in range(3):
                cur.execute(sql, [host])
                got.append([list(r) for r in cur.fetchall()])
            return host, got

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for host, got in pool.map(client, hosts):
            assert got == [want[host]] * 3


def test_auth_basic_bearer_scopes_and_read_only(make_server, tmp_path):
    data = write_small_dataset(tmp_path / "data")
    token_file = tmp_path / "tokens.json"
    full = tokens.create(token_file, "full")
    other = tokens.create(token_file, "other_only", databases=["other"])
    metrics = tokens.create(token_file, "metrics", read_only=True)
    srv = make_server(data_dir=data, config=f'[auth]\nenabled = true\ntokens_file = "{token_file}"\n')
    srv.start()
    bearer = flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value

    with connect(srv, username="anyone", password=full) as con:
        assert fetch(con, "SELECT count(*) AS n FROM other.cpu").to_pylist() == [{"n": 10}]
    with connect(srv, **{bearer: f"Bearer {full}"}) as con:
        assert fetch(con, 'SELECT db FROM "default".cpu LIMIT 1').to_pylist() == [{"db": "default"}]
    with connect(srv, **{bearer: f"Bearer {other}"}) as con:
        schemas = [s["db_schema_name"] for c in con.adbc_get_objects().read_all().to_pylist()
                   for s in c["catalog_db_schemas"]]
        assert schemas == ["other"]
        assert fetch(con, "SELECT db FROM other.cpu LIMIT 1").to_pylist() == [{"db": "other"}]
        with con.cursor() as cur:
            raises("PermissionDenied", cur.execute, 'SELECT * FROM "default".cpu')
    with connect(srv, **{bearer: f"Bearer {metrics}"}) as con:
        assert con.adbc_get_table_types() == ["TABLE"]  # metadata: yes
        with con.cursor() as cur:
            raises("PermissionDenied", cur.execute, "SELECT 1")  # queries: no
    tokens.revoke(token_file, "full")
    for options in ({}, {"username": "u", "password": "wrong"}, {bearer: f"Bearer {full}"}):
        def attempt():
            with connect(srv, **options) as con:
                fetch(con, "SELECT 1")
        raises("Unauthenticated", attempt)


def test_timeout_and_overload(make_server):
    srv = make_server(workers=1, config="[queue]\nquery_timeout_s = 1\nqueue_timeout_s = 0.3\n")
    srv.start()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(srv.query, SLOW_SQL)  # holds the one worker until its deadline
        wait_for(lambda: stats_busy(srv) == 1, 20, what="the worker busy")
        with connect(srv) as con, con.cursor() as cur:
            message = raises("Unavailable", cur.execute, "SELECT 42")
            assert "overloaded" in message
            assert busy.result(30).status == 504
            raises("DeadlineExceeded", cur.execute, SLOW_SQL)
            cur.execute("SELECT 42 AS answer")
            assert cur.fetchall() == [(42,)]


@pytest.mark.slow
def test_a_client_that_stops_reading_ends_its_query(make_server):
    srv = make_server(config="[results]\nsend_timeout_s = 1\n")
    srv.start()
    client = flight.connect(f"grpc://127.0.0.1:{srv.flight_port}")
    sql = "SELECT i, i * 2 AS j, i % 7 AS k FROM range(10000000) t(i)"  # 240 MB of Arrow
    info = client.get_flight_info(flight.FlightDescriptor.for_command(
        codec.pack("CommandStatementQuery", query=sql)))
    reader = client.do_get(info.endpoints[0].ticket)
    reader.read_chunk()  # then nothing: gRPC's window and the gateway's pipe fill up

    def listed():
        return [q for q in srv.get("/api/v1/queries").json()["queries"] if q["route"] == "flight"]
    wait_for(listed, 20, what="the query sending")
    wait_for(lambda: not listed(), 30, what="the query ended by send_timeout_s")
    wait_for(lambda: srv.stats()["shm_segments_in_use"] == 0, 20, what="its segments freed")
    client.close()


def test_a_statement_prepared_and_executed_runs_once(flight_server):
    """ADBC prepares each statement it executes: the query the prepare starts (its first bytes
    tell the schema) is taken over by the DoGet that follows. A statement with parameters is
    described, then run."""
    srv = flight_server
    tag = int.from_bytes(os.urandom(4), "big")  # a text no earlier test sent: no cached answer
    count = http_rows(srv, "SELECT count(*) FROM cpu")[0][0]
    with connect(srv) as con:
        served, logged = srv.stats()["served"], len(srv.events("access"))
        assert fetch(con, f"SELECT count(*) AS n, {tag} AS tag FROM cpu").to_pylist() == \
            [{"n": count, "tag": tag}]
        assert srv.stats()["served"] - served == 1
        # the DoGet's access line is the query's: its rows, though its prepare started it
        gets = wait_for(lambda: [e for e in srv.events("access")[logged:]
                                 if e["method"] == "DoGet"], 10, what="the DoGet's access line")
        assert (gets[0]["status"], gets[0]["rows"]) == (200, 1)
        served = srv.stats()["served"]
        assert fetch(con, f"SELECT ? + count(*) AS n, {tag} AS tag FROM cpu", [1]).to_pylist() \
            == [{"n": count + 1, "tag": tag}]
        assert srv.stats()["served"] - served == 2


def test_a_query_started_by_a_prepare_never_executed_is_ended(flight_server):
    """A prepared statement closed before it is executed: the query it started stops."""
    with connect(flight_server) as con:
        cur = con.cursor()
        tag = int.from_bytes(os.urandom(4), "big")  # a statement whose schema is not known yet
        # its first bytes do not come in time: it is described as well
        cur.adbc_prepare(f"SELECT {tag} AS tag, sum(a.range * b.range) "
                         "FROM range(200000) a, range(200000) b")
        assert stats_busy(flight_server) == 1  # the started query, waiting for its DoGet
        cur.close()  # ClosePreparedStatement
        # sooner than prepared.KEEP_S, after which a query not taken ends anyway
        wait_for(lambda: stats_busy(flight_server) == 0, 3, what="the started query ended")


def test_started_queries_are_bounded_taken_once_and_fresh():
    from gateway.flight import prepared

    class Pipe:  # what StartedQueries asks of a bridge.Pipe
        cancelled = False

        def cancel(self):
            self.cancelled = True

    loop = asyncio.new_event_loop()
    try:
        queries = prepared.StartedQueries(loop)
        one = prepared.Started(Pipe(), None, 7)
        queries.put(("a", None), "q1", one)
        assert queries.take(("b", None), "q1", 7) is None  # another caller
        assert queries.take(("a", None), "q1", 7) is one
        assert queries.take(("a", None), "q1", 7) is None  # once
        stale = prepared.Started(Pipe(), None, 7)
        queries.put(("a", None), "q1", stale)
        assert queries.take(("a", None), "q1", 8) is None and stale.pipe.cancelled  # files changed
        mine = [prepared.Started(Pipe(), None, 7) for _ in range(prepared.PER_CALLER + 1)]
        for n, started in enumerate(mine):
            queries.put(("a", None), f"q{n}", started)
        assert mine[0].pipe.cancelled and not mine[-1].pipe.cancelled  # a caller's oldest ended
        others = [prepared.Started(Pipe(), None, 7) for _ in range(prepared.KEPT)]
        for n, started in enumerate(others):
            queries.put((f"c{n}", None), "q", started)
        assert all(s.pipe.cancelled for s in mine) and not any(s.pipe.cancelled for s in others)
        queries.drop(("c0", None), "q")
        assert others[0].pipe.cancelled
        queries.close()
        assert all(s.pipe.cancelled for s in others)
    finally:
        loop.close()


def test_the_cache_answers_flight_and_http_alike(flight_server):
    srv = flight_server
    first = "SELECT host, max(usage_user) AS top FROM cpu GROUP BY host ORDER BY host"
    second = "SELECT host, min(usage_user) AS low FROM cpu GROUP BY host ORDER BY host"

    def http_arrow(sql):
        response = srv.query(sql, path="/api/v1/query/arrow")
        assert response.status == 200, response
        return response.headers["X-Cache"], pa.ipc.open_stream(response.body).read_all()

    with connect(srv) as con:
        from_flight = fetch(con, first)
        assert http_arrow(first) == ("hit", from_flight)  # Flight's result answers HTTP
        state, from_http = http_arrow(second)
        assert state == "miss"
        hits = srv.get("/api/v1/cache/stats").json()["hits"]
        assert fetch(con, second) == from_http
    # HTTP's result answered Flight
    assert srv.get("/api/v1/cache/stats").json()["hits"] > hits


def test_the_port_survives_a_gateway_restart(make_server):
    srv = make_server()
    srv.start()
    assert srv.event("flight_listening")["port"] == srv.flight_port
    with connect(srv) as con:
        assert fetch(con, "SELECT 1 AS one").to_pylist() == [{"one": 1}]
    os.kill(srv.gateway_pid(), signal.SIGKILL)
    wait_for(lambda: len(srv.events("flight_listening")) == 2, 30, what="a new gateway's Flight")
    srv.wait_ready()
    with connect(srv) as con:
        assert fetch(con, "SELECT 2 AS two").to_pylist() == [{"two": 2}]
    assert srv.events("flight_listening")[1]["port"] == srv.flight_port


@pytest.mark.slow
def test_tls(make_server, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    srv = make_server(config=f'[flight]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    srv.start()
    assert srv.event("flight_listening")["tls"] is True
    roots = {flightsql.DatabaseOptions.TLS_ROOT_CERTS.value: cert.read_text()}
    with fsql.connect(f"grpc+tls://127.0.0.1:{srv.flight_port}", db_kwargs=roots,
                      autocommit=True) as con:
        assert fetch(con, "SELECT 7 AS seven").to_pylist() == [{"seven": 7}]
    with pytest.raises(Exception):  # plain gRPC is not served beside it
        with connect(srv, **{flightsql.ConnectionOptions.TIMEOUT_QUERY.value: "5"}) as con:
            fetch(con, "SELECT 1")


def test_readme_adbc_snippet(flight_server):
    from tests.test_readme import code_block_after

    snippet = code_block_after("From Python (ADBC)", "python")
    namespace: dict = {}
    exec(compile(snippet.replace("127.0.0.1:8815", f"127.0.0.1:{flight_server.flight_port}"),  # noqa: S102
                 "README.md", "exec"), namespace)
    assert namespace["table"].to_pylist() == [
        dict(zip(("host", "usage"), row)) for row in http_rows(
            flight_server, "SELECT host, avg(usage_user) AS usage FROM cpu WHERE host = $1 "
                           "GROUP BY host", params=["server07"])]
    assert namespace["tables"].num_rows == 1  # one catalog


@pytest.mark.slow
def test_recycling_under_flight_load_fails_no_call(make_server):
    srv = make_server(config="[workers]\nmax_queries = 5\n")
    srv.start()
    sql = "SELECT count(*) AS n FROM cpu WHERE host = $1"
    want = http_rows(srv, sql, params=["server02"])[0][0]
    enough = threading.Event()

    def client(_):
        answered = 0
        with connect(srv) as con, con.cursor() as cur:
            while not enough.is_set() and answered < 1000:
                cur.execute(sql, ["server02"])
                assert cur.fetchall() == [(want,)]
                answered += 1
        return answered

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, n) for n in range(4)]
        try:
            wait_for(lambda: srv.stats()["recycled"] >= 4 or any(c.done() for c in clients),
                     120, what="4 workers recycled under load")
        finally:
            enough.set()
        answered = [c.result(60) for c in clients]  # a failed call raises here
    assert srv.stats()["recycled"] >= 4, answered
