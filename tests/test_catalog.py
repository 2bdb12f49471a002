"""Arc's layout becomes tables; views and attached databases from the config."""

import hashlib
import shutil

import duckdb
import pytest

from engine import catalog, config as config_mod, policy, sandbox, worker
from engine.errors import QueryError
from tests.harness import Server, assert_no_leaks, write_small_dataset

READ_ONLY_REFUSAL = 'which is attached in read-only mode'


def test_demo_tables(server):
    doc = server.query('SELECT (SELECT count(*) FROM cpu) + (SELECT count(*) FROM mem) '
                       '+ (SELECT count(*) FROM disk) AS n').json()
    assert doc["data"][0][0] >= 1_000_000
    qualified = server.query('SELECT count(*) FROM "default".cpu').json()["data"]
    assert qualified == server.query("SELECT count(*) FROM cpu").json()["data"]
    doc = server.query("DESCRIBE cpu").json()
    names = [row[0] for row in doc["data"]]
    types = dict((row[0], row[1]) for row in doc["data"])
    assert names[:3] == ["time", "host", "region"] and types["time"] == "TIMESTAMP"
    span = server.query("SELECT min(time), max(time), count(DISTINCT host) FROM cpu").json()["data"]
    assert span == [["2025-11-01T00:00:00.000000", "2025-11-07T23:59:42.000000", 10]]


def test_dashboard_query(server):
    sql = """SELECT time_bucket(INTERVAL 1 hour, time) AS hour, host, avg(usage_user) AS usage
             FROM cpu WHERE time >= '2025-11-03' AND time < '2025-11-04' AND host = 'server03'
             GROUP BY ALL ORDER BY hour"""
    doc = server.query(sql).json()
    assert doc["row_count"] == 24


def make_warehouse(path):
    """A DuckDB file with a table and a sequence: nextval() is a write that parses as SELECT."""
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE sites AS SELECT 'server01' AS host, 'Paris' AS city")
    con.execute("CREATE SEQUENCE visits")
    con.close()
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_views_and_attached_databases(tmp_path, demo_dir):
    db = make_warehouse(tmp_path / "warehouse.duckdb")
    before = digest(db)
    config = f"""
[catalog.views]
busiest = "SELECT host, max(usage_user) AS peak FROM cpu GROUP BY host ORDER BY peak DESC LIMIT 1"

[catalog.databases]
warehouse = "{db}"
"""
    srv = Server(tmp_path / "srv", demo_dir, config=config).start()
    try:
        assert srv.query("SELECT count(*) FROM busiest").json()["data"] == [[1]]
        assert srv.query("SELECT city FROM warehouse.sites").json()["data"] == [["Paris"]]
        # The statement policy refuses a plain write...
        assert srv.query("INSERT INTO warehouse.sites VALUES ('x', 'y')").status == 403
        # ...and a write it lets through (a SELECT that advances a stored sequence) is refused
        # by DuckDB itself, because the file is attached READ_ONLY.
        resp = srv.query("SELECT nextval('warehouse.main.visits') AS n")
        assert resp.status == 400 and resp.json()["error_type"] == "sql_error", resp
        assert READ_ONLY_REFUSAL in resp.json()["error"]
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)
    assert digest(db) == before, "the attached file was written"


WRITES = ["INSERT INTO warehouse.sites VALUES ('x', 'y')", "UPDATE warehouse.sites SET city = 'x'",
          "DELETE FROM warehouse.sites", "DROP TABLE warehouse.sites",
          "CREATE TABLE warehouse.t AS SELECT 1 AS a", "SELECT nextval('warehouse.main.visits')"]


def test_attached_database_is_read_only_in_duckdb(tmp_path):
    """The worker's own DuckDB instance (worker.open_database: catalog.boot_statements, then
    the sandbox, read back) refuses every write to an attached file, with the statement
    policy out of the way; the same statements attached without READ_ONLY do write."""
    data = write_small_dataset(tmp_path / "data", ("default",))
    db = make_warehouse(tmp_path / "warehouse.duckdb")
    before = digest(db)
    cfg = config_mod.load(None, env={}, overrides={"catalog": {
        "data_dir": str(data), "databases": {"warehouse": str(db)}}})
    con = worker.open_database(cfg, 256 * 2**20, str(tmp_path / "tmp"))
    try:
        assert con.execute("SELECT city FROM warehouse.sites").fetchall() == [("Paris",)]
        for sql in WRITES:
            if not sql.startswith("SELECT"):
                with pytest.raises(QueryError):
                    policy.check(con, sql)  # the first line of defence...
            with pytest.raises(duckdb.Error, match=READ_ONLY_REFUSAL):
                con.execute(sql)  # ...and the second, without the first
    finally:
        con.close()
    assert digest(db) == before

    # The control: the boot statements without READ_ONLY, on a copy, let the same writes in,
    # and the sandbox's read-back refuses such an instance.
    copy = shutil.copy(db, tmp_path / "copy.duckdb")
    temp = str(tmp_path / "tmp-control")
    writable = duckdb.connect(config={"temp_directory": temp})
    for statement in catalog.boot_statements(cfg.catalog):
        writable.execute(statement.replace(str(db), str(copy)).replace(" (READ_ONLY)", ""))
    assert writable.execute("SELECT nextval('warehouse.main.visits')").fetchall() == [(1,)]
    writable.execute(WRITES[0])
    sandbox.apply(writable, [str(data), temp])
    with pytest.raises(sandbox.SandboxError, match="attached databases are writable"):
        sandbox.verify(writable, [str(data), temp], [str(copy)])
    writable.close()
