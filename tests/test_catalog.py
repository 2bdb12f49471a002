"""Arc's layout becomes tables; views and attached databases from the config."""

import duckdb

from tests.harness import Server, assert_no_leaks


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


def test_views_and_attached_databases(tmp_path, demo_dir):
    db = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE sites AS SELECT 'server01' AS host, 'Paris' AS city")
    con.close()
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
        # Read-only: even a statement the policy let through could not write to it.
        assert srv.query("INSERT INTO warehouse.sites VALUES ('x', 'y')").status == 403
    finally:
        assert srv.stop() == 0
        assert_no_leaks(srv)
