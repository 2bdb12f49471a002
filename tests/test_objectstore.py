"""Object storage as the data directory: an S3-compatible server (moto, its own process), the
demo dataset uploaded (and TPC-H SF0.1, in a slow test), and a fleet over `s3://arc/lake`
answering exactly what a fleet over the same files on local disk answers; remote paths that
could leave the prefix refused before DuckDB sees them; the credentials nowhere to be read;
new, rewritten and deleted objects seen after a listing.
"""

from __future__ import annotations

import shutil
import socket
from datetime import timedelta

import duckdb
import pytest

from bench.peers.dashboard import PANELS, WINDOWS, NOW0, panel_sql
from engine.errors import Kind, QueryError
from engine.extensions import load
from engine.objectstore import check_url
from harness.server import Server, assert_no_leaks, wait_for, write_small_dataset
from harness.s3server import KEY_ID, SECRET, S3Server

TPCH_TABLES = ("customer", "lineitem", "nation", "orders", "part", "partsupp", "region", "supplier")
MARKER = "planted-outside-the-prefix"


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def lake(tmp_path_factory, demo_dir, s3):
    """The demo dataset on local disk, the same files uploaded under s3://arc/lake, and objects
    planted outside the prefix."""
    root = tmp_path_factory.mktemp("lake")
    shutil.copytree(demo_dir, root, dirs_exist_ok=True)
    s3.upload_tree(root, "lake")
    planted = root.parent / "planted.parquet"
    duckdb.execute(f"COPY (SELECT '{MARKER}' AS marker) TO '{planted}' (FORMAT parquet)")
    body = planted.read_bytes()
    for key in ("secret/x.parquet", "lake2/default/cpu/x.parquet", "x.parquet"):
        s3.put(key, body)
    s3.client.create_bucket(Bucket="other")
    s3.client.put_object(Bucket="other", Key="x.parquet", Body=body)
    return root


@pytest.fixture(scope="module")
def fleets(tmp_path_factory, lake, s3):
    """(local fleet, object-storage fleet) over the same files, one worker each."""
    tmp = tmp_path_factory.mktemp("fleets")
    local = Server(tmp / "local", lake, workers=1).start()
    remote = Server(tmp / "s3", "s3://arc/lake", workers=1, config=s3.config(
        "lake", f'index_file = "{tmp / "s3-index"}"\nrefresh_s = 0.5')).start(wait_ready=False)
    try:
        remote.wait_ready(timeout=60)
        yield local, remote
    finally:
        for fleet in (local, remote):
            assert fleet.stop() == 0
            assert_no_leaks(fleet)


def answer(fleet: Server, sql: str) -> tuple:
    resp = fleet.query(sql)
    assert resp.status == 200, (sql, resp)
    doc = resp.json()
    return doc["columns"], doc["data"]


@pytest.mark.slow  # an S3 server process and two fleets: in CI's slow run
def test_answers_equal_local(fleets):
    local, remote = fleets
    live, explore = list(WINDOWS)[0], list(WINDOWS)[1]
    sqls = [sql for p in PANELS for sql in (panel_sql(p, NOW0, live),
                                            panel_sql(p, NOW0 - timedelta(days=3), explore))]
    sqls += ["SELECT count(*), min(time), max(time) FROM cpu", "SHOW TABLES", "DESCRIBE mem",
             "SELECT host, avg(used_percent) FROM mem GROUP BY host ORDER BY host"]
    for sql in sqls:
        assert answer(remote, sql) == answer(local, sql), sql
    pruned = [e for e in remote.events("access") if e.get("files_pruned")]
    assert pruned, "no query was pruned over object storage"
    catalogs = [f.get("/api/v1/catalog").json() for f in (local, remote)]
    assert catalogs[1].pop("listing")["failed"] is None
    assert catalogs[0] == catalogs[1]  # files, bytes, rows, columns and time ranges


@pytest.mark.slow
def test_tpch_answers_equal_local(fleets, lake, s3, tmp_path):
    """TPC-H SF0.1 arrives as new tables of the default database, on disk and in the bucket;
    both fleets see them (inotify, a listing) and answer the 22 queries alike."""
    local, remote = fleets
    con = duckdb.connect()
    load(con, "tpch")
    con.execute("CALL dbgen(sf=0.1)")
    staging = tmp_path / "tpch"
    for table in TPCH_TABLES:
        (staging / table).mkdir(parents=True)
        con.execute(f"COPY {table} TO '{staging / table / (table + '.parquet')}' (FORMAT parquet)")
    queries = dict(con.execute("SELECT query_nr, query FROM tpch_queries()").fetchall())
    con.close()
    s3.upload_tree(staging, "lake/default")
    hidden = lake / ".tpch"  # written whole, then renamed into place, as Arc's writers do
    shutil.copytree(staging, hidden)
    for table in TPCH_TABLES:
        (hidden / table).rename(lake / "default" / table)

    def tables(fleet: Server) -> set[str]:
        doc = fleet.get("/api/v1/catalog").json()
        return {t["name"] for db in doc["databases"] for t in db["tables"]}
    for fleet in fleets:
        wait_for(lambda: set(TPCH_TABLES) <= tables(fleet), 60, what="the TPC-H tables")
    for n in sorted(queries):
        assert answer(remote, queries[n]) == answer(local, queries[n]), f"TPC-H Q{n}"


@pytest.mark.slow  # an S3 server process and two fleets: in CI's slow run
def test_sandbox_is_the_prefix(fleets):
    _, remote = fleets
    ready = [e for e in remote.events("ready") if e.get("process") == "worker"]
    assert ready
    for event in ready:
        dirs = str(event["allowed_directories"])  # as DuckDB prints a list
        assert "s3://arc/lake/" in dirs and dirs.count("://") == 1 and dirs.count(",") == 1, dirs


POLICY = "only objects under the data directory"


def hostile(port: int) -> list[tuple[str, bool]]:
    """Remote paths that leave s3://arc/lake/ (or could), each as a query, and whether the
    remote-path guard must be what refuses it (else the allowlist or the statement policy)."""
    ok = "default/cpu/2025/11/01/00"
    paths = [
        "s3://arc/lake/../secret/x.parquet", "s3://arc/lake/../../other/x.parquet",
        "s3://arc/lake/default/../../secret/x.parquet", "s3://arc/lake/./../x.parquet",
        "s3://arc/lake/%2e%2e/secret/x.parquet", "s3://arc/lake/%2E%2E/secret/x.parquet",
        "s3://arc/lake/.%2e/secret/x.parquet", "s3://arc/lake/%252e%252e/secret/x.parquet",
        "s3://arc/lake/..%2fsecret/x.parquet", "s3://arc/lake/..\\secret\\x.parquet",
        "s3://arc/lake//../secret/x.parquet", "s3://arc/lake/./default/cpu/**/*.parquet",
        f"s3://arc/lake/{ok}/x.parquet?s3_endpoint=127.0.0.1:{port}",
        f"s3://arc/lake/{ok}/x.parquet?s3_url_style=vhost&s3_endpoint=127.0.0.1:{port}",
        f"s3://arc/lake/{ok}/x.parquet#frag", "s3://arc/lake2/default/cpu/x.parquet",
        "s3://arc/secret/x.parquet", "s3://other/x.parquet", "s3://arc/x.parquet",
        "s3://arc/lake", "s3://arc/lake*/**/*.parquet", "S3://arc/lake/../secret/x.parquet",
        "s3a://arc/lake/default/cpu/**/*.parquet", "s3n://arc/secret/x.parquet",
        "gcs://arc/secret/x.parquet", "gs://arc/secret/x.parquet", "r2://arc/secret/x.parquet",
        "az://arc/secret/x.parquet", "hf://datasets/x/x.parquet",
        f"http://127.0.0.1:{port}/arc/secret/x.parquet", f"https://127.0.0.1:{port}/x.parquet",
        "file:///etc/passwd", "//arc/secret/x.parquet",
    ]
    guarded = [f"SELECT * FROM read_parquet('{p}')" for p in paths]
    guarded += [f"SELECT * FROM parquet_scan('{paths[0]}')", f"SELECT * FROM '{paths[0]}'",
                f"SELECT * FROM '{paths[12]}'",
                f"SELECT * FROM read_parquet(['s3://arc/lake/{ok}/cpu.parquet', '{paths[0]}'])",
                "SELECT * FROM read_parquet('s3://arc/lake/' || '../secret/x.parquet')",
                "SELECT * FROM read_parquet(concat('s', '3:/', '/arc/secret/x.parquet'))",
                "SELECT * FROM read_parquet(lower('S3://ARC/SECRET/X.PARQUET'))",
                "EXPLAIN SELECT * FROM read_parquet('s3://arc/lake/../secret/x.parquet')",
                "WITH t AS (SELECT * FROM read_parquet('s3://other/x.parquet')) SELECT * FROM t",
                "SELECT (SELECT marker FROM read_parquet('s3://arc/secret/x.parquet'))"]
    others = ["SELECT * FROM read_parquet('/etc/passwd')", "SELECT * FROM duckdb_secrets()",
              "SELECT * FROM which_secret('s3://arc/lake/x', 's3')",
              "SELECT current_setting('s3_secret_access_key')", "SELECT * FROM duckdb_settings()",
              "SELECT * FROM glob('s3://arc/**')", "SET s3_endpoint = 'evil'",
              "CREATE SECRET x (TYPE s3, KEY_ID 'a', SECRET 'b')", "ATTACH 's3://other/x.db' AS x",
              "COPY (SELECT 1) TO 's3://arc/lake/x.parquet'", "LOAD httpfs"]
    return [(sql, True) for sql in guarded] + [(sql, False) for sql in others]


@pytest.mark.slow  # an S3 server process and two fleets: in CI's slow run
def test_hostile_remote_paths_refused(fleets):
    _, remote = fleets
    trap = socket.create_server(("127.0.0.1", 0))  # where a redirected request would land
    trap.settimeout(0.01)
    try:
        for sql, guarded in hostile(trap.getsockname()[1]):
            resp = remote.query(sql)
            assert resp.status == 403 and resp.json()["error_type"] == "forbidden", (sql, resp)
            assert (POLICY in resp.json()["error"] or "string literals" in resp.json()["error"]) \
                == guarded, (sql, resp)
            assert MARKER.encode() not in resp.body and SECRET.encode() not in resp.body, sql
        params = remote.query("SELECT * FROM read_parquet($1)", params=["s3://arc/secret/x.parquet"])
        assert params.status == 403, params
        with pytest.raises(TimeoutError):
            trap.accept()  # nothing was sent to another endpoint
    finally:
        trap.close()
    assert answer(remote, "SELECT count(*) FROM cpu")[1] == [[336000]]  # the workers serve on


@pytest.mark.slow  # an S3 server process and two fleets: in CI's slow run
def test_secret_never_shown(fleets):
    _, remote = fleets
    for route in ("/api/v1/catalog", "/api/v1/stats/connections", "/api/v1/metrics", "/metrics",
                  "/api/v1/openapi.json", "/api/v1/cache/stats", "/health", "/health/ready"):
        body = remote.get(route).body
        assert SECRET.encode() not in body, route
    assert SECRET not in remote.log()
    assert KEY_ID not in remote.log()
    config = (remote.runtime_dir / "config.json")
    assert config.stat().st_mode & 0o077 == 0  # the children's copy: private to the user


@pytest.mark.slow  # an S3 server process and two fleets: in CI's slow run
def test_new_and_deleted_objects_seen_after_a_listing(tmp_path, make_server, s3):
    write_small_dataset(tmp_path / "small", databases=("default",))
    s3.upload_tree(tmp_path / "small", "fresh")
    fleet = make_server(data_dir="s3://arc/fresh", workers=1, config=s3.config(
        "fresh", f'index_file = "{tmp_path / "index"}"\nrefresh_s = 0.2\n'
        "[query_cache]\nenabled = true\n")).start(wait_ready=False)
    fleet.wait_ready(timeout=60)

    def files(table: str = "cpu", what: str = "files") -> int:
        doc = fleet.get("/api/v1/catalog").json()
        return sum(t[what] for db in doc["databases"] for t in db["tables"] if t["name"] == table)

    def count(table: str = "cpu") -> tuple[int, str]:
        resp = fleet.query(f"SELECT count(*) FROM {table}")
        assert resp.status == 200, resp
        return resp.json()["data"][0][0], resp.headers.get("X-Cache")

    assert files() == 1 and count() == (10, "miss") and count() == (10, "hit")
    body = (tmp_path / "small/default/cpu/2025/11/01/00/cpu.parquet").read_bytes()
    s3.put("fresh/default/cpu/2025/11/01/01/cpu.parquet", body)
    wait_for(lambda: files() == 2, 30, what="the new object in the catalog")
    assert count() == (20, "miss")  # the cached count died with the listing's change
    # Rewritten in place (not Arc's way, but possible): workers must not serve cached bytes.
    fewer = tmp_path / "fewer.parquet"
    duckdb.execute(f"COPY (SELECT 'default' AS db, i FROM range(5) t(i)) TO '{fewer}' (FORMAT parquet)")
    s3.put("fresh/default/cpu/2025/11/01/01/cpu.parquet", fewer.read_bytes())
    wait_for(lambda: files(what="rows") == 15, 30, what="the rewritten object in the catalog")
    assert count() == (15, "miss")
    s3.put("fresh/default/newtable/2025/11/01/00/x.parquet", body)
    wait_for(lambda: files("newtable") == 1, 30, what="the new table")
    assert count("newtable")[0] == 10
    s3.delete("fresh/default/cpu/2025/11/01/00/cpu.parquet")
    wait_for(lambda: files() == 1, 30, what="the deleted object gone from the catalog")
    assert count()[0] == 5
    assert fleet.stop() == 0


@pytest.mark.parametrize("path, allowed", [
    ("s3://arc/lake/default/cpu/2025/11/01/00/x.parquet", True),
    ("s3://arc/lake/default/cpu/**/*.parquet", True),
    ("s3://arc/lake/default/cpu/year=2025/x.parquet", True),  # hive-style partitions
    ("/srv/elsewhere/x.parquet", True),  # local: DuckDB's sandbox judges it
    ("s3://arc/lake/default/../x.parquet", False), ("s3://arc/lake/default/./x.parquet", False),
    ("s3://arc/lake/default/.hidden/x.parquet", False),  # dot names: neither indexed nor read
    ("s3://arc/lake/%2E%2E/x.parquet", False), ("s3://arc/lake/x.parquet?a=b", False),
    ("s3://arc/lake/x.parquet#a", False), ("s3://arc/lake/a\\b.parquet", False),
    ("s3://arc/lake//x.parquet", False), ("s3://arc/lake", False), ("s3://arc/lake/", False),
    ("s3://arc/lakeside/x.parquet", False), ("S3://arc/lake/x.parquet", False),
    ("https://arc.s3.amazonaws.com/lake/x.parquet", False), ("file:///etc/passwd", False),
    ("//arc/lake/x.parquet", False), ("s3:arc/lake/x.parquet", False),
])
def test_check_url(path, allowed):
    """The guard alone: what passes, and what is refused before DuckDB sees it."""
    if allowed:
        check_url(path, "s3://arc/lake")
    else:
        with pytest.raises(QueryError) as refused:
            check_url(path, "s3://arc/lake")
        assert refused.value.kind == Kind.FORBIDDEN
