"""Arc's layout becomes tables; views and attached databases from the config."""

import hashlib
import shutil

import duckdb
import pytest

from engine import catalog, config as config_mod, instances, policy, sandbox
from engine.demo import write_history
from engine.errors import QueryError
from harness.server import Server, assert_no_leaks, wait_for, write_small_dataset

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
        # ...and so does the allowlist a SELECT that would advance a stored sequence. Were it
        # let through, DuckDB itself refuses it (the file is attached READ_ONLY): that is
        # test_attached_database_is_read_only_in_duckdb, with both checks out of the way.
        resp = srv.query("SELECT nextval('warehouse.main.visits') AS n")
        assert resp.status == 403 and "nextval() is not allowed" in resp.json()["error"], resp
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)
    assert digest(db) == before, "the attached file was written"


# --- the file index: new tables, vanishing files, restarts, identity ---

def _history(path, hours=48, **kwargs):
    from datetime import datetime, timezone
    end = datetime(2026, 1, 3, tzinfo=timezone.utc)
    write_history(path, end, hours, **kwargs)
    return path


def test_index_survives_a_restart(tmp_path):
    data = _history(tmp_path / "data")
    srv = Server(tmp_path / "srv", data).start()
    try:
        first = srv.event("index_ready")
        assert first["files"] == 48 and first["footers_read"] == 48
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)
    again = Server(tmp_path / "srv2", data).start()
    try:
        ready = again.event("index_ready")
        assert ready["loaded"] == 48 and ready["footers_read"] == 0
        assert again.query("SELECT count(*) FROM cpu").json()["data"] == [[48 * 360]]
    finally:
        assert again.stop() == 0
        assert_no_leaks(again)


def test_new_table_and_unknown_table(tmp_path):
    data = _history(tmp_path / "data", hours=4)
    srv = Server(tmp_path / "srv", data).start()
    try:
        missing = srv.query("SELECT * FROM mem").json()
        assert missing["error_type"] == "sql_error"
        assert "does not exist" in missing["error"] and "Tables here: cpu" in missing["error"]
        assert "duckdb_tables" not in missing["error"]
        _history(data, hours=2, measurement="mem", database="metrics")  # no SIGHUP
        assert srv.query("SELECT count(*) FROM metrics.mem").json()["data"] == [[720]]
        tables = srv.get("/api/v1/catalog").json()["databases"]
        assert sorted(db["name"] for db in tables) == ["default", "metrics"]
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)


def test_incompatible_schema_names_file_and_column(tmp_path):
    data = _history(tmp_path / "data", hours=3)
    bad = data / "default" / "cpu" / "2026" / "01" / "02" / "23" / "bad.parquet"
    con = duckdb.connect()
    con.execute(f"COPY (SELECT TIMESTAMP '2026-01-02 23:30:00' AS time, [1, 2] AS usage_user) "
                f"TO '{bad}' (FORMAT parquet)")
    con.close()
    srv = Server(tmp_path / "srv", data).start()
    try:
        doc = srv.query("SELECT sum(usage_user) FROM cpu").json()
        assert doc["error_type"] == "sql_error"
        assert "usage_user" in doc["error"] and "bad.parquet" in doc["error"], doc
        # Columns that did not change still answer.
        assert srv.query("SELECT count(host) FROM cpu").json()["data"] == [[3 * 360]]
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)


def test_files_appearing_vanishing_and_replaced_under_load(tmp_path):
    """Churn like Arc's writers and compaction while clients query: files rewritten in place
    (every answer stays exact), then files deleted and added (no answer is an error, and the
    first answer after the churn is exact: nothing stale, cached or not)."""
    import shutil
    import threading

    data = _history(tmp_path / "data", hours=24)
    srv = Server(tmp_path / "srv", data, config="[query_cache]\nenabled = true\n").start()
    sql = ["SELECT count(*), sum(CAST(usage_user * 100 AS BIGINT)) FROM cpu",
           "SELECT count(*) FROM cpu WHERE time >= TIMESTAMP '2026-01-02 12:00:00'"]
    want = [srv.query(q).json()["data"] for q in sql]
    files = sorted((data / "default" / "cpu").rglob("*.parquet"))
    stop, failures, answers = threading.Event(), [], [0]
    exact = threading.Event()
    exact.set()

    def load():
        while not stop.is_set():
            for q, w in zip(sql, want):
                response = srv.query(q)
                answers[0] += 1
                if response.status != 200 or (exact.is_set() and response.json()["data"] != w):
                    failures.append((q, response))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()

    def answered(more: int) -> None:  # the clients have seen the files as they are now
        goal = answers[0] + more
        wait_for(lambda: answers[0] >= goal or failures, 60, what=f"{more} more answers")

    try:
        for round_ in range(len(files)):  # rewritten in place (a new inode, same rows)
            victim = files[round_]
            tmp = victim.with_name(victim.name + ".tmp")  # as writers do: not *.parquet until whole
            shutil.copyfile(victim, tmp)
            tmp.replace(victim)
            answered(2)
        exact.clear()
        for victim in files[:6]:  # compaction removes hourly files...
            victim.unlink()
            answered(2)
        _history(data / "extra", hours=2)  # ...and writers add new ones
        (data / "extra" / "default" / "cpu" / "2026").rename(data / "default" / "cpu" / "2027")
        answered(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    try:
        assert answers[0] > 0 and not failures, failures[:3]
        assert srv.query(sql[1]).json()["data"] == [[(12 + 2) * 360]]  # 12 hours and the new 2
        assert srv.query(sql[0]).json()["data"][0][0] == (24 - 6 + 2) * 360
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)


def test_cache_identity_any_spelling_and_views(tmp_path):
    data = _history(tmp_path / "data", hours=2)
    config = ('[query_cache]\nenabled = true\n\n[catalog.views]\n'
              'busy = "SELECT host, count(*) AS n FROM cpu GROUP BY host"\n')
    srv = Server(tmp_path / "srv", data, config=config).start()
    try:
        spellings = ["SELECT count(*) FROM CPU", 'SELECT count(*) FROM "cpu"',
                     'SELECT count(*) FROM "default".cpu', "SELECT count(*) FROM cpu"]
        view = "SELECT sum(n) FROM busy"
        for q in [*spellings, view]:
            assert srv.query(q).json()["data"] == [[720]]
        assert srv.query(view).headers["X-Cache"] == "hit"
        _history(data / "extra", hours=1)
        (data / "extra" / "default" / "cpu" / "2026").rename(data / "default" / "cpu" / "2027")
        # Every spelling is one table: none is stale. Spellings that differ only in case or
        # quotes share one entry (the first asker after the change runs it again).
        states = []
        for q in [*spellings, view]:
            response = srv.query(q)
            assert response.json()["data"] == [[1080]], q
            states.append(response.headers["X-Cache"])
        assert states == ["miss", "hit", "miss", "hit", "miss"]  # "default".cpu: its own key
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)


def test_sighup_brings_a_new_catalog_to_the_gateway(tmp_path):
    """A view added to engine.toml and SIGHUP: the workers serve it, and the gateway's cache
    knows it reads cpu, so a new cpu file invalidates its cached answer."""
    import signal

    data = _history(tmp_path / "data", hours=2)
    srv = Server(tmp_path / "srv", data, config="[query_cache]\nenabled = true\n").start()
    try:
        srv.config_path.write_text('[query_cache]\nenabled = true\n\n[catalog.views]\n'
                                   'counted = "SELECT count(*) AS n FROM cpu"\n')
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.event("catalog_reloaded") and srv.event("reloaded"), 60,
                 what="the gateway and the workers reloaded")
        view = "SELECT n FROM counted"  # names no table: only the view's definition tells
        assert srv.query(view).json()["data"] == [[720]]
        assert srv.query(view).headers["X-Cache"] == "hit"
        _history(data / "extra", hours=1)
        (data / "extra" / "default" / "cpu" / "2026").rename(data / "default" / "cpu" / "2027")
        fresh = srv.query(view)
        assert fresh.json()["data"] == [[1080]] and fresh.headers["X-Cache"] == "miss"
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)


WRITES = ["INSERT INTO warehouse.sites VALUES ('x', 'y')", "UPDATE warehouse.sites SET city = 'x'",
          "DELETE FROM warehouse.sites", "DROP TABLE warehouse.sites",
          "CREATE TABLE warehouse.t AS SELECT 1 AS a", "SELECT nextval('warehouse.main.visits')"]


def test_attached_database_is_read_only_in_duckdb(tmp_path):
    """The worker's own DuckDB instance (instances.open_database: catalog.boot_statements, then
    the sandbox, read back) refuses every write to an attached file, with the statement
    policy out of the way; the same statements attached without READ_ONLY do write."""
    data = write_small_dataset(tmp_path / "data", ("default",))
    db = make_warehouse(tmp_path / "warehouse.duckdb")
    before = digest(db)
    cfg = config_mod.load(None, env={}, overrides={"catalog": {
        "data_dir": str(data), "databases": {"warehouse": str(db)}}})
    con = instances.open_database(cfg, 256 * 2**20, str(tmp_path / "tmp"))
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
