"""What deploy/ ships is valid where its tool is installed (each test skips cleanly otherwise):
the Caddyfile by `caddy validate`, the HAProxy configuration by `haproxy -c`, the systemd unit
by `systemd-analyze verify`, the Kubernetes pod as YAML, the sidecar's engine.toml by our own
loader; and the sidecar's socket mode takes effect on a live server.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from engine import config
from harness.server import REPO

DEPLOY = REPO / "deploy"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_caddyfile_validates(tmp_path):
    caddy = tool("caddy")
    env = {**os.environ, "DUCKFLEET_NODES": "127.0.0.1:18001 127.0.0.1:18002",
           "DUCKFLEET_FLIGHT_NODES": "h2c://127.0.0.1:18815", "XDG_CONFIG_HOME": str(tmp_path),
           "XDG_DATA_HOME": str(tmp_path)}
    done = subprocess.run([caddy, "validate", "--config", str(DEPLOY / "caddy" / "Caddyfile"),
                           "--adapter", "caddyfile"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "Valid configuration" in done.stdout + done.stderr, done.stderr


def test_haproxy_config_checks():
    haproxy = tool("haproxy")
    done = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # The example's node names do not resolve here; nothing else may be warned about.
    warnings = [line for line in (done.stdout + done.stderr).splitlines()
                if "[WARNING]" in line and "could not resolve address" not in line]
    assert not warnings, warnings


def test_systemd_unit_verifies(tmp_path):
    analyze = tool("systemd-analyze")
    unit = (DEPLOY / "sidecar" / "duckfleet.service").read_text()
    # Where this machine differs from a real install: the interpreter, the user, the env file.
    unit = unit.replace("/opt/duckfleet/.venv/bin/python", sys.executable) \
        .replace("User=duckfleet", "User=root").replace("Group=duckfleet", "Group=root") \
        .replace("EnvironmentFile=/etc/duckfleet/storage.env", f"EnvironmentFile=-{tmp_path}/none")
    path = tmp_path / "duckfleet.service"
    path.write_text(unit)
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_pod_is_yaml():
    yaml = pytest.importorskip("yaml")
    pod = yaml.safe_load((DEPLOY / "sidecar" / "pod.yaml").read_text())
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["dashboard", "duckfleet"]


def test_sidecar_engine_toml_loads():
    cfg = config.load(DEPLOY / "sidecar" / "engine.toml",
                      env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "sekrit-value"})
    assert cfg.catalog.data_dir == "s3://arc-data/prod" and cfg.s3.key_id == "k"
    assert cfg.s3.secret == "sekrit-value" and "sekrit" not in repr(cfg) + str(cfg)
    assert cfg.server.unix_socket == "/run/duckfleet/http.sock"


def test_unix_socket_mode(make_server, tmp_path):
    path = tmp_path / "http.sock"
    srv = make_server(workers=1, config=f'[server]\nunix_socket = "{path}"\n'
                                        'unix_socket_mode = "0660"\n').start()
    assert stat.S_IMODE(path.stat().st_mode) == 0o660

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(path))

    conn = UnixConnection("localhost", timeout=30)
    conn.request("GET", "/health/ready")
    assert conn.getresponse().status == 200
    conn.close()
    assert srv.stop() == 0
