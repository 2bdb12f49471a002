"""Tokens, route and database permissions, rate limits, file modes: over real HTTP, real files."""

import json
import os
import stat
import subprocess
import sys
import threading

import duckdb
import pytest

from engine import tokens
from gateway.ratelimit import TokenBuckets
from harness.server import (REPO, Server, assert_no_leaks, fleet_segments, wait_for,
                           write_small_dataset)

ROWS = 10  # rows per database in the small dataset


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two Arc databases, an attached DuckDB file outside the data dir, and a token file."""
    root = tmp_path_factory.mktemp("site")
    data = write_small_dataset(root / "data")
    warehouse = root / "warehouse.duckdb"
    con = duckdb.connect(str(warehouse))
    con.execute("CREATE TABLE sites AS SELECT 'server01' AS host, 'Paris' AS city")
    con.close()
    file = root / "tokens.json"
    made = {name: tokens.create(file, name, **kw) for name, kw in {
        "admin": {}, "monitor": {"read_only": True}, "other": {"databases": ["other"]},
        "warehouse": {"databases": ["warehouse"]},
        "both": {"databases": ["default", "other"]}}.items()}
    return {"root": root, "data": data, "warehouse": warehouse, "file": file, "tokens": made}


@pytest.fixture(scope="module")
def auth_server(site, tmp_path_factory):
    config = (f'[auth]\nenabled = true\ntokens_file = "{site["file"]}"\n'
              f'[catalog.databases]\nwarehouse = "{site["warehouse"]}"\n'
              '[catalog.views]\nother_count = "SELECT count(*) AS n FROM other.cpu"\n')
    srv = Server(tmp_path_factory.mktemp("auth"), site["data"], config=config).start()
    yield srv
    assert srv.stop() == 0
    assert_no_leaks(srv)


def ask(srv, sql, token=None, header="Bearer", **fields):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers.update({"x-api-key": token} if header == "x-api-key"
                       else {"Authorization": f"{header} {token}"})
    return srv.request("POST", "/api/v1/query", json.dumps({"sql": sql, **fields}).encode(), headers)


def get(srv, path, token=None):
    return srv.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})


def error_type(resp):
    return resp.json()["error_type"]


# --- the token file and its CLI ---

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine.tokens", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_tokens_cli_stores_hashes_only(tmp_path):
    file = tmp_path / "tokens.json"
    made = run_cli("--file", str(file), "create", "dash", "--database", "default")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith(tokens.PREFIX) and len(token) > 40 and "\n" not in token
    text = file.read_text()
    assert token not in text and token[len(tokens.PREFIX):] not in text
    assert tokens.digest(token) in text
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert run_cli("--file", str(file), "create", "dash").returncode == 2  # names are unique
    second = run_cli("--file", str(file), "create", "ops", "--read-only").stdout.strip()
    assert second != token
    listed = run_cli("--file", str(file), "list")
    assert "dash" in listed.stdout and "ops" in listed.stdout and "read-only" in listed.stdout
    assert token not in listed.stdout and second not in listed.stdout
    assert run_cli("--file", str(file), "revoke", "dash").returncode == 0
    assert run_cli("--file", str(file), "revoke", "dash").returncode == 1
    assert [t.name for t in tokens.load(file)] == ["ops"]
    assert tokens.find(tokens.load(file), second).name == "ops"
    assert tokens.find(tokens.load(file), token) is None
    assert run_cli("--file", str(file), "create", "bad name!").returncode == 2


def test_tokens_cli_uses_the_configured_file(tmp_path):
    (tmp_path / "engine.toml").write_text('[auth]\ntokens_file = "secrets/t.json"\n')
    (tmp_path / "secrets").mkdir()
    made = run_cli("--config", str(tmp_path / "engine.toml"), "create", "x")
    assert made.returncode == 0, made.stderr
    assert [t.name for t in tokens.load(tmp_path / "secrets" / "t.json")] == ["x"]


def test_malformed_token_file_is_refused(tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text('{"tokens": [{"name": "x"}]}')
    with pytest.raises(tokens.TokenFileError):
        tokens.load(bad)


def test_auth_on_without_tokens_refuses_to_start(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text(f'[auth]\nenabled = true\ntokens_file = "{tmp_path / "none.json"}"\n')
    proc = subprocess.run([sys.executable, "-m", "engine.supervisor", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "auth.tokens_file" in proc.stderr and "spawned" not in proc.stderr


# --- authentication over HTTP ---

def test_every_route_but_health_needs_a_token(auth_server):
    for path in ("/health", "/health/live", "/health/ready", "/ready"):
        assert get(auth_server, path).status == 200, path
    for path in ("/metrics", "/api/v1/metrics", "/api/v1/stats/connections",
                 "/api/v1/openapi.json", "/nope", "/health/../metrics", "/health/%2E%2E/metrics",
                 "/health%2F..%2Fmetrics", "//metrics", "/health/"):
        resp = get(auth_server, path)
        assert resp.status == 401 and error_type(resp) == "unauthorized", path
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/api/v1/query", "/api/v1/query/arrow"):
        resp = auth_server.request("POST", path, b'{"sql": "SELECT 1"}')
        assert resp.status == 401 and error_type(resp) == "unauthorized"


def test_the_three_header_forms(auth_server, site):
    token = site["tokens"]["admin"]
    for header in ("Bearer", "Token", "bearer", "x-api-key"):
        resp = ask(auth_server, "SELECT 1 AS x", token, header)
        assert resp.status == 200, (header, resp)
        assert resp.json()["data"] == [[1]]


@pytest.mark.parametrize("header, value", [
    ("Authorization", "Bearer wrong"), ("Authorization", "Basic YWRtaW46YWRtaW4="),
    ("Authorization", "Bearer"), ("Authorization", ""), ("x-api-key", "dft_nope"),
    ("Authorization", "Bearer {admin}x"), ("Authorization", "Bearer {admin_digest}"),
])
def test_wrong_tokens_get_401(auth_server, site, header, value):
    value = value.format(admin=site["tokens"]["admin"],
                         admin_digest=tokens.digest(site["tokens"]["admin"]))
    resp = auth_server.request("POST", "/api/v1/query", b'{"sql": "SELECT 1"}', {header: value})
    assert resp.status == 401 and error_type(resp) == "unauthorized"


def test_revoked_token_stops_working_without_restart(auth_server, site):
    token = tokens.create(site["file"], "temporary")
    assert ask(auth_server, "SELECT 1", token).status == 200
    result = run_cli("--file", str(site["file"]), "revoke", "temporary")
    assert result.returncode == 0, result.stderr
    resp = ask(auth_server, "SELECT 1", token)
    assert resp.status == 401 and "revoked" in resp.json()["error"]
    assert ask(auth_server, "SELECT 1", site["tokens"]["admin"]).status == 200
    reloads = auth_server.events("reloaded")
    assert reloads and reloads[-1]["what"] == "tokens"


def test_read_only_token_reads_metrics_but_runs_no_query(auth_server, site):
    token = site["tokens"]["monitor"]
    for path in ("/metrics", "/api/v1/metrics", "/api/v1/stats/connections", "/api/v1/openapi.json"):
        assert get(auth_server, path, token).status == 200, path
    resp = ask(auth_server, "SELECT 1", token)
    assert resp.status == 403 and "read-only" in resp.json()["error"]


# --- databases: decided by DuckDB in the worker, not by the SQL text ---

def test_database_limited_token_reads_its_database(auth_server, site):
    token = site["tokens"]["other"]
    resp = ask(auth_server, "SELECT db, count(*) FROM other.cpu GROUP BY db", token)
    assert resp.json()["data"] == [["other", ROWS]]
    assert ask(auth_server, "SELECT n FROM other_count", token).json()["data"] == [[ROWS]]
    direct = f"SELECT count(*) FROM read_parquet('{site['data']}/other/**/*.parquet')"
    assert ask(auth_server, direct, token).json()["data"] == [[ROWS]]
    both = ask(auth_server, 'SELECT count(*) FROM "default".cpu JOIN other.cpu USING (i)',
               site["tokens"]["both"])
    assert both.json()["data"] == [[ROWS]]
    assert ask(auth_server, "SELECT city FROM warehouse.sites",
               site["tokens"]["warehouse"]).json()["data"] == [["Paris"]]


def escapes(data):
    """Ways to reach the default database (and the attached one) from a token limited to other."""
    return [
        "SELECT * FROM cpu",
        'SELECT * FROM "default".cpu',
        'SELECT * FROM "DEFAULT"."CPU"',
        'SELECT * FROM memory."default".cpu',
        '/* other.cpu */ SELECT * FROM "default"."cpu" -- other',
        'WITH other AS (SELECT * FROM "default".cpu) SELECT * FROM other',
        'SELECT * FROM other.cpu UNION ALL SELECT * FROM "default".cpu',
        'SELECT (SELECT max(db) FROM "default".cpu) AS x FROM other.cpu',
        "SELECT * FROM query_table('\"default\".cpu')",
        "SELECT * FROM query('SELECT * FROM \"default\".cpu')",
        f"SELECT * FROM read_parquet('{data}/default/**/*.parquet')",
        f"SELECT * FROM read_parquet('{data}/other/../default/cpu/2025/11/01/00/cpu.parquet')",
        f"SELECT * FROM '{data}/default/cpu/2025/11/01/00/cpu.parquet'",
        f"SELECT * FROM glob('{data}/*')",
        f"SELECT * FROM read_blob('{data}/default/cpu/2025/11/01/00/cpu.parquet')",
        "SELECT * FROM warehouse.sites",
        "SELECT * FROM warehouse.main.sites",
        "DESCRIBE \"default\".cpu",
    ]


def test_database_limited_token_cannot_reach_other_databases(auth_server, site):
    token = site["tokens"]["other"]
    for sql in escapes(site["data"]):
        resp = ask(auth_server, sql, token)
        assert resp.status == 403, (sql, resp)
        assert error_type(resp) == "forbidden"
        assert b"Paris" not in resp.body
    # The token's view of the catalog holds its database only.
    tables = ask(auth_server, "SELECT table_catalog, table_schema, table_name FROM "
                              "information_schema.tables ORDER BY ALL", token).json()["data"]
    assert tables == [["memory", "main", "other_count"], ["memory", "other", "cpu"]]
    # A missing table is still a plain SQL error, and other tokens are unaffected.
    assert error_type(ask(auth_server, "SELECT * FROM nope", token)) == "sql_error"
    assert ask(auth_server, "SELECT count(*) FROM cpu", site["tokens"]["admin"]).json()["data"] == [[ROWS]]


# --- rate limits ---

def test_token_bucket_arithmetic():
    buckets = TokenBuckets(rate=2.0, burst=3, max_keys=2)
    assert [buckets.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", now=0.0) == pytest.approx(0.5)
    assert buckets.take("a", now=0.5) == 0.0  # one request refilled in half a second
    assert buckets.take("b", now=0.5) == 0.0  # each key has its own bucket
    buckets.take("c", now=0.5)  # over max_keys: the least recently used ("a") is dropped
    assert "a" not in buckets._buckets and len(buckets._buckets) == 2


def test_rate_limit_per_token_with_retry_after(make_server, site):
    config = (f'[auth]\nenabled = true\ntokens_file = "{site["file"]}"\n'
              '[server]\nrate_limit_per_s = 0.01\nrate_limit_burst = 3\n')  # one request per 100 s
    srv = make_server(data_dir=site["data"], workers=1, config=config).start()
    admin, other = site["tokens"]["admin"], site["tokens"]["other"]
    assert [ask(srv, "SELECT 1", admin).status for _ in range(3)] == [200] * 3
    limited = ask(srv, "SELECT 1", admin)
    assert limited.status == 429 and error_type(limited) == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 100
    assert get(srv, "/metrics", admin).status == 429  # every route but health counts
    assert get(srv, "/health").status == 200
    assert ask(srv, "SELECT 1", other, header="x-api-key").status == 200  # its own bucket


def test_rate_limit_per_client_without_auth(make_server, site):
    srv = make_server(data_dir=site["data"], workers=1,
                      config="[server]\nrate_limit_per_s = 0.01\nrate_limit_burst = 2\n").start()
    statuses = [srv.query("SELECT 1").status for _ in range(3)]
    assert statuses[:2] == [200, 200] and statuses[2] == 429


# --- files and sockets ---

def test_files_and_sockets_are_private(make_server, site, tmp_path):
    sock_path = tmp_path / "http.sock"
    srv = make_server(data_dir=site["data"], workers=1, config=(
        f'[server]\nunix_socket = "{sock_path}"\n[duckdb]\nmemory_limit = "64MB"\n')).start()
    runtime = srv.runtime_dir

    def private(path):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"

    # A sort larger than memory_limit spills; DuckDB deletes its temp files when the query
    # ends, so look at them while it runs.
    sort = "SELECT count(*) FROM (SELECT md5(i::VARCHAR) AS h FROM range(3000000) t(i) ORDER BY h OFFSET 1)"
    result = {}
    thread = threading.Thread(target=lambda: result.update(resp=srv.query(sort, format="arrow")))
    thread.start()
    spilled = wait_for(lambda: [p for p in runtime.glob("tmp-worker-*/all/*") if p.is_file()],
                       30, interval=0.005, what="DuckDB's spill files")
    for path in spilled:
        private(path)
    thread.join(60)
    assert result["resp"].status == 200, result
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    for path in [runtime, *runtime.rglob("*")]:
        private(path)
    segments = fleet_segments(srv.process.pid)
    assert segments
    for name in segments:
        assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
        random_part = name.rsplit(".", 1)[1]
        assert len(random_part) >= 24 and int(random_part, 16) >= 0  # 96 random bits, hex
    assert srv.stop() == 0
    assert not sock_path.exists()


# --- token scopes beyond a worker's open instances, and a token file broken at runtime ---

def test_more_scopes_than_a_worker_keeps_open(make_server, tmp_path):
    """Six tokens, each limited to its own database, on one worker that keeps at most four
    scoped DuckDB instances: every query still reads its own database and only that one."""
    names = [f"d{k}" for k in range(6)]
    data = write_small_dataset(tmp_path / "data", ("default", *names))
    file = tmp_path / "tokens.json"
    made = {name: tokens.create(file, name, databases=[name]) for name in names}
    srv = make_server(data_dir=data, workers=1, config=(
        f'[auth]\nenabled = true\ntokens_file = "{file}"\n')).start()
    for round_ in range(2):
        for k, name in enumerate(names):
            resp = ask(srv, f"SELECT db, count(*) FROM {name}.cpu GROUP BY db", made[name])
            assert resp.json()["data"] == [[name, ROWS]], (round_, name, resp)
            other = names[(k + 1) % len(names)]
            refused = ask(srv, f"SELECT * FROM {other}.cpu", made[name])
            assert refused.status == 403 and error_type(refused) == "forbidden", (name, other)
        scopes = [p for p in srv.runtime_dir.glob("tmp-worker-*/scope-*")]
        assert len(scopes) <= 4, scopes  # closed instances leave no temp directory behind
    opened = srv.events("scope_opened")
    assert len(opened) == 12, "round-robin over six scopes reopens each one (LRU of four)"
    assert {tuple(e["databases"]) for e in opened} == {(name,) for name in names}
    assert not srv.events("crashed")


def test_token_file_corrupted_at_runtime_refuses_every_token(make_server, site, tmp_path):
    file = tmp_path / "tokens.json"
    made = {name: tokens.create(file, name, **kw) for name, kw in
            {"admin": {}, "scoped": {"databases": ["other"]}}.items()}
    good = file.read_bytes()
    srv = make_server(data_dir=site["data"], workers=1, config=(
        f'[auth]\nenabled = true\ntokens_file = "{file}"\n')).start()
    assert ask(srv, "SELECT 1", made["admin"]).status == 200
    # Each corruption has a size of its own, so each is seen as a change of the file.
    for broken in (b"{not json", b"", b'{"tokens": [{"name": "admin"}]}', good[: len(good) // 2]):
        file.write_bytes(broken)
        for token in made.values():
            resp = ask(srv, "SELECT 1", token)
            assert resp.status == 401 and error_type(resp) == "unauthorized", (broken[:20], resp)
        assert get(srv, "/metrics", made["admin"]).status == 401
        assert get(srv, "/health").status == 200 and get(srv, "/ready").status == 200
    invalid = srv.events("tokens_file_invalid")
    assert len(invalid) == 4 and all(e["level"] == "error" for e in invalid)
    file.write_bytes(good)  # fixed: the same tokens work again, without a restart
    assert ask(srv, "SELECT 1 AS x", made["admin"]).json()["data"] == [[1]]
    assert ask(srv, "SELECT count(*) FROM other.cpu", made["scoped"]).json()["data"] == [[ROWS]]
    assert srv.events("reloaded")[-1]["tokens"] == 2
