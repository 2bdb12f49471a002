"""What a query may call (engine/allowlist.py), against a real fleet, with a corpus generated from
DuckDB itself: every table function and system view DuckDB has is either allowed, and then runs
without revealing a server path, or refused with 403 naming it. Functions that change state or
reveal settings are refused wherever they hide in the statement, and the fleet keeps serving.
"""

import os

import duckdb
import pytest

from engine import allowlist
from harness.server import Server, assert_no_leaks, write_small_dataset

# Functions DuckDB marks as having side effects that are allowed: their effect is the answer.
SIDE_EFFECTS_OK = {"random", "uuid", "gen_random_uuid", "uuidv4", "uuidv7", "error", "stats",
                   "current_query", "current_query_id", "current_connection_id",
                   "current_transaction_id"}

# One call of every allowed table function ({data}: the data directory).
ALLOWED_CALLS = {
    "read_parquet": "read_parquet('{data}/default/cpu/**/*.parquet')",
    "parquet_scan": "parquet_scan('{data}/default/cpu/**/*.parquet', filename := true)",
    "range": "range(3)", "generate_series": "generate_series(1, 3)", "unnest": "unnest([1, 2])",
    "repeat": "repeat(1, 3)", "repeat_row": "repeat_row(1, 2, num_rows := 3)",
    "json_each": "json_each('{\"a\": 1}')", "json_tree": "json_tree('[1, [2]]')",
    "duckdb_tables": "duckdb_tables()", "duckdb_columns": "duckdb_columns()",
    "duckdb_schemas": "duckdb_schemas()", "duckdb_types": "duckdb_types()",
    "duckdb_constraints": "duckdb_constraints()", "duckdb_indexes": "duckdb_indexes()",
    "duckdb_functions": "duckdb_functions()", "duckdb_keywords": "duckdb_keywords()",
    "pragma_table_info": "pragma_table_info('cpu')", "pragma_version": "pragma_version()",
    "pragma_platform": "pragma_platform()", "pragma_collations": "pragma_collations()",
    "pg_timezone_names": "pg_timezone_names()", "icu_calendar_names": "icu_calendar_names()",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("allow")
    data = write_small_dataset(root / "data")
    warehouse = root / "warehouse.duckdb"
    con = duckdb.connect(str(warehouse))
    con.execute("CREATE TABLE sites AS SELECT 'Paris' AS city")
    con.close()
    return {"data": data, "warehouse": warehouse}


@pytest.fixture(scope="module")
def srv(site, tmp_path_factory):
    config = (f'[catalog.databases]\nwarehouse = "{site["warehouse"]}"\n'
              '[catalog.views]\nboth_dbs = "SELECT * FROM cpu UNION ALL SELECT * FROM other.cpu"\n')
    server = Server(tmp_path_factory.mktemp("srv"), site["data"], config=config).start()
    yield server
    assert server.stop() == 0
    assert_no_leaks(server)


def secrets_of(srv, site):
    """Strings no answer may hold: the server's absolute paths."""
    return [str(site["data"].resolve()), str(site["warehouse"].parent.resolve()),
            str(srv.runtime_dir), str(srv.runtime_base), os.path.expanduser("~") + "/"]


def table_functions():
    con = duckdb.connect()
    return {row[0] for row in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() "
        "WHERE function_type IN ('table', 'table_macro')").fetchall()}


def system_views():
    con = duckdb.connect()
    return {f"{s}.{v}" for s, v in con.execute(
        "SELECT schema_name, view_name FROM duckdb_views() WHERE internal").fetchall()}


def refused(resp, name):
    assert resp.status == 403, (name, resp)
    doc = resp.json()
    assert doc["error_type"] == "forbidden" and name in doc["error"], (name, doc)
    return doc["error"]


def test_every_table_function_is_classified():
    allowed, refused_ = allowlist.TABLE_FUNCTIONS, set(allowlist.REFUSED_TABLE_FUNCTIONS)
    assert not allowed & refused_
    assert table_functions() == allowed | refused_, "classify new table functions in engine/allowlist.py"
    assert set(ALLOWED_CALLS) == allowed


def test_every_side_effect_function_is_reviewed():
    con = duckdb.connect()
    marked = {row[0] for row in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE has_side_effects "
        "AND function_type IN ('scalar', 'aggregate', 'macro')").fetchall()}
    assert marked <= SIDE_EFFECTS_OK | set(allowlist.REFUSED_FUNCTIONS), \
        marked - SIDE_EFFECTS_OK - set(allowlist.REFUSED_FUNCTIONS)


def test_refused_table_functions_get_403_naming_them(srv):
    workers = sorted(srv.worker_pids())
    for name in sorted(allowlist.REFUSED_TABLE_FUNCTIONS):
        refused(srv.query(f"SELECT * FROM {name}()"), name)
        # also hidden in a subquery, a CTE, a lateral join, EXPLAIN ANALYZE, SUMMARIZE
        refused(srv.query(f"SELECT 1 WHERE EXISTS (SELECT * FROM {name}())"), name)
        refused(srv.query(f"WITH x AS (FROM {name}()) SELECT 1"), name)
    refused(srv.query("SELECT * FROM range(2) t(i), LATERAL (SELECT * FROM glob('*'))"), "glob")
    refused(srv.query("EXPLAIN SELECT * FROM enable_profiling()"), "enable_profiling")
    refused(srv.query("EXPLAIN ANALYZE SELECT * FROM cpu"), "EXPLAIN ANALYZE")  # shows file paths
    refused(srv.query("SUMMARIZE SELECT * FROM duckdb_settings()"), "duckdb_settings")
    refused(srv.query('SELECT * FROM system.main."DUCKDB_SETTINGS"()'), "duckdb_settings")
    assert sorted(srv.worker_pids()) == workers and srv.stats()["crashed"] == 0


def test_allowed_table_functions_run_and_reveal_no_path(srv, site):
    hidden = secrets_of(srv, site)
    for name, call in sorted(ALLOWED_CALLS.items()):
        resp = srv.query(f"SELECT * FROM {call}".replace("{data}", str(site["data"])))
        assert resp.status == 200, (name, resp)
        if name in ("read_parquet", "parquet_scan"):
            continue  # the client named the path itself (and asked for it with filename)
        for secret in hidden:
            assert secret.encode() not in resp.body, (name, secret)


def test_refused_functions_get_403_naming_them(srv):
    for name in sorted(allowlist.REFUSED_FUNCTIONS):
        refused(srv.query(f"SELECT {name}('x')"), name)
        refused(srv.query(f"SELECT list_transform([1], x -> {name}(x)) FROM range(1)"), name)
    for name in ("enable_anything", "disable_something", "python_foo", "pandas_bar"):
        refused(srv.query(f"SELECT {name}(1)"), name)
    refused(srv.query("SELECT sum(i) FILTER (WHERE current_setting('threads') = '1') FROM range(3) t(i)"),
            "current_setting")


def test_system_views_are_allowed_or_refused(srv, site):
    hidden = secrets_of(srv, site)
    views = system_views()
    assert set(allowlist.REFUSED_VIEWS) <= views
    for view in sorted(views):
        schema, name = view.split(".")
        names = [view] if schema == "information_schema" else [view, name]
        for sql_name in names:
            resp = srv.query(f"SELECT * FROM {sql_name}")
            if view in allowlist.REFUSED_VIEWS:
                refused(resp, view)
            else:
                assert resp.status == 200, (sql_name, resp)
                for secret in hidden:
                    assert secret.encode() not in resp.body, (sql_name, secret)


def test_what_users_need_still_works(srv, site):
    for sql in ("SHOW TABLES", "SHOW ALL TABLES", "SHOW DATABASES", "DESCRIBE cpu", "SUMMARIZE cpu",
                "DESCRIBE SELECT * FROM range(3)", "PRAGMA version", "PRAGMA table_info('cpu')",
                "SELECT * FROM information_schema.tables", "SELECT * FROM information_schema.columns",
                "SELECT * FROM duckdb_columns WHERE table_name = 'cpu'", "SELECT count(*) FROM both_dbs",
                "SELECT * FROM warehouse.sites", f"FROM '{site['data']}/default/cpu/**/*.parquet'",
                "SELECT random(), uuid(), now()", "EXPLAIN SELECT * FROM cpu",
                "SELECT 1e400, -1e400",  # the syntax tree holds Infinity
                "SELECT " + "abs(" * 250 + "1" + ")" * 250):  # 250 deep, as in issue 17
        assert srv.query(sql).status == 200, sql
    assert srv.query(f"SELECT count(*) FROM '{site['data']}/default/cpu/**/*.parquet'").json()["data"] == [[10]]


def test_files_are_read_as_parquet_only(srv, site):
    data = site["data"]
    (data / "default" / "notes.csv").write_text("a\n1\n")
    try:
        for sql in (f"FROM '{data}/default/notes.csv'", f"FROM '{data}/default/notes.CSV'",
                    "FROM 'default/notes.csv.gz'", "FROM 'default/x.json'", "FROM 'x.duckdb'"):
            refused(srv.query(sql), "only Parquet files")
    finally:
        (data / "default" / "notes.csv").unlink()


def test_issue_reproductions_are_refused_and_change_nothing(srv, site):
    """enable_profiling sent to every worker, enable_logging into data_dir: refused, no file."""
    data = site["data"]
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for _ in range(2 * srv.workers):
        refused(srv.query("SELECT * FROM enable_profiling(format := 'json', "
                          "save_location := '/nonexistent/p.json')"), "enable_profiling")
        refused(srv.query(f"SELECT * FROM enable_logging(storage := 'file', storage_path := "
                          f"'{data}/evil/m/a.parquet', storage_buffer_size := 1)"), "enable_logging")
        refused(srv.query("SELECT * FROM pandas_scan(NULL)"), "pandas_scan")
    for sql, name in (("SELECT * FROM duckdb_settings()", "duckdb_settings"),
                      ("SELECT current_setting('temp_directory')", "current_setting"),
                      ("SELECT * FROM duckdb_views()", "duckdb_views"),
                      ("SELECT * FROM duckdb_external_file_cache()", "duckdb_external_file_cache"),
                      ("SELECT * FROM duckdb_databases()", "duckdb_databases"),
                      ("SELECT * FROM duckdb_temporary_files()", "duckdb_temporary_files"),
                      ("SELECT getenv('HOME')", "getenv")):
        refused(srv.query(sql), name)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    for _ in range(2 * srv.workers):  # every worker still answers every query
        assert srv.query("SELECT count(*) FROM cpu").json()["data"] == [[10]]
    assert srv.stats()["crashed"] == 0
