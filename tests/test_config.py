"""Configuration: file, then environment, then flags; bad input named by key, before spawning."""

import socket
import subprocess
import sys

import pytest

from engine import config
from engine.config import ConfigError
from harness.server import REPO


def write(tmp_path, text):
    path = tmp_path / "engine.toml"
    path.write_text(text)
    return path


def test_repository_engine_toml_is_valid():
    cfg = config.load(REPO / "engine.toml", env={})
    assert cfg.duckdb.threads == 1
    assert cfg.catalog.data_dir == str(REPO / "data")


def test_precedence_file_env_flags(tmp_path):
    path = write(tmp_path, "[server]\nport = 9000\nhost = '0.0.0.0'\n[queue]\nqueue_timeout_s = 2\n")
    env = {"DUCKFLEET_SERVER_PORT": "9100", "DUCKFLEET_QUEUE_MAX_QUEUE_SIZE": "7",
           "DUCKFLEET_QUERY_CACHE_TTL_SECONDS": "5"}
    cfg = config.load(path, env=env, overrides={"server": {"port": 9200}})
    assert cfg.server.port == 9200          # flag beats environment and file
    assert cfg.queue.max_queue_size == 7    # environment beats the default
    assert cfg.server.host == "0.0.0.0"     # file beats the default
    assert cfg.queue.queue_timeout_s == 2.0
    assert cfg.query_cache.ttl_seconds == 5.0
    assert config.load(path, env=env).server.port == 9100


def test_config_round_trips_to_children(tmp_path):
    cfg = config.load(write(tmp_path, "[catalog.views]\nv = 'SELECT 1'\n"), env={})
    assert config.decode(config.encode(cfg)) == cfg
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # frozen


@pytest.mark.parametrize("text, key", [
    ("[server]\nport = 'eighty'\n", "server.port"),
    ("[server]\nport = 70000\n", "server.port"),
    ("[workers]\ncount = -1\n", "workers.count"),
    ("[duckdb]\nthreads = 4\n", "duckdb.threads"),
    ("[duckdb]\nmemory_limit = 'lots'\n", "duckdb.memory_limit"),
    ("[queue]\nqueue_timeout_s = 0\n", "queue.queue_timeout_s"),
    ("[server]\nprot = 8000\n", "prot"),
    ("[nonsense]\na = 1\n", "nonsense"),
    ("[query_cache]\nmax_total_mb = 0\n", "query_cache.max_total_mb"),
    ("[query_cache]\nvolatile_ttl_seconds = -1\n", "query_cache.volatile_ttl_seconds"),
    ("[server]\nrate_limit_per_s = -1\n", "server.rate_limit_per_s"),
    ("[server]\nrate_limit_burst = 0\n", "server.rate_limit_burst"),
    ("[server]\nslow_query_ms = -5\n", "server.slow_query_ms"),
    ("[auth]\nenabled = 'maybe'\n", "auth.enabled"),
    ("[flight]\nport = 70000\n", "flight.port"),
    ("[flight]\ntls_cert = 'cert.pem'\n", "flight.tls_key"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), env={})
    assert key in str(err.value)


def test_bad_env_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="server.port"):
        config.load(None, env={"DUCKFLEET_SERVER_PORT": "x"})
    with pytest.raises(ConfigError, match="DUCKFLEET_NOPE_X"):
        config.load(None, env={"DUCKFLEET_NOPE_X": "1"})


def test_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[server\n"), env={})


def test_supervisor_refuses_bad_config_before_spawning(tmp_path):
    path = write(tmp_path, "[server]\nport = 'eighty'\n")
    proc = subprocess.run([sys.executable, "-m", "engine.supervisor", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "server.port" in proc.stderr and "cannot_start" in proc.stderr
    assert "spawned" not in proc.stderr


def test_tokens_file_is_relative_to_the_config_file(tmp_path):
    cfg = config.load(write(tmp_path, "[auth]\nenabled = true\ntokens_file = 'secret/t.json'\n"), env={})
    assert cfg.auth.enabled and cfg.auth.tokens_file == str(tmp_path / "secret" / "t.json")


def test_object_storage_settings(tmp_path):
    path = write(tmp_path, '[catalog]\ndata_dir = "s3://arc-data/prod/"\n'
                           '[s3]\nendpoint = "http://127.0.0.1:9000"\n')
    env = {"AWS_ACCESS_KEY_ID": "kid", "AWS_SECRET_ACCESS_KEY": "never-shown",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cfg = config.load(path, env=env)
    assert cfg.catalog.data_dir == "s3://arc-data/prod"  # not made a local path
    assert (cfg.s3.endpoint, cfg.s3.use_ssl, cfg.s3.url_style) == ("127.0.0.1:9000", False, "path")
    assert (cfg.s3.key_id, cfg.s3.secret, cfg.s3.region) == ("kid", "never-shown", "us-east-1")
    assert cfg.catalog.index_file.startswith(str(tmp_path / "cache" / "duckfleet" / "index-"))
    assert "never-shown" not in repr(cfg) + str(cfg)
    assert config.decode(config.encode(cfg)) == cfg  # the children get the same settings


@pytest.mark.parametrize("data_dir", ["s3://arc/../other", "s3://arc/./x", "s3://Arc/x",
                                      "s3://arc/x?s3_endpoint=evil", "s3://a/x", "s3://arc/%2e%2e"])
def test_bad_object_storage_prefix(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="catalog.data_dir"):
        config.load(write(tmp_path, f'[catalog]\ndata_dir = "{data_dir}"\n'), env={})


def test_bad_object_storage_endpoint(tmp_path):
    path = write(tmp_path, '[catalog]\ndata_dir = "s3://arc/x"\n[s3]\nendpoint = "h:1/path"\n')
    with pytest.raises(ConfigError, match="s3.endpoint"):
        config.load(path, env={})


def test_flight_port_from_flag_and_environment(tmp_path):
    from engine.supervisor import parse_args

    _, overrides = parse_args(["--flight-port", "0"])
    assert config.load(None, env={}, overrides=overrides).flight.port == 0
    assert config.load(None, env={"DUCKFLEET_FLIGHT_PORT": "9815"}).flight.port == 9815
    assert config.load(None, env={}).flight.port == 8815


def test_supervisor_refuses_flight_tls_files_it_cannot_load(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    proc = subprocess.run([sys.executable, "-m", "engine.supervisor", "--config",
                           str(write(tmp_path, "[flight]\ntls_cert = 'cert.pem'\n"
                                               "tls_key = 'key.pem'\n")),
                           "--port", "0", "--flight-port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "flight.tls_cert" in proc.stderr and "spawned" not in proc.stderr


def test_supervisor_refuses_a_flight_port_in_use(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "engine.supervisor", "--config",
                               str(write(tmp_path, "")), "--port", "0", "--flight-port", str(port)],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "flight.port" in proc.stderr and "cannot_start" in proc.stderr
    assert "spawned" not in proc.stderr
