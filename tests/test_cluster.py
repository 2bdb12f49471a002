"""Three nodes behind Caddy (`python -m engine.cluster`) under a closed loop of 16 clients:
a node SIGKILLed, a rolling restart, a node stopped with SIGTERM. Every answer is checked
against what the nodes answered before the load (the three nodes must agree on it); failures
must be clean (502/503). Caddy retries what a stopped or killed node could not answer
(deploy/caddy/balancing.caddy), so none is expected; the drain contract (readiness 503 while
the node serves on for server.drain_s) is checked on one node.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from datetime import timedelta

import pytest

from bench.peers.dashboard import NOW0, PANELS, WINDOWS, panel_sql
from harness.cluster import ClusterProcess, Load, expected_answers
from harness.server import REPO, wait_for

pytestmark = pytest.mark.slow
CLIENTS = 16


def node_ports(cluster) -> list[int]:
    return [int(m) for m in re.findall(r"^node \d+: http://127\.0\.0\.1:(\d+)",
                                       "\n".join(cluster.lines), re.M)]


def queries() -> list[str]:
    one, six = list(WINDOWS)[:2]
    return [sql for p in PANELS for sql in (panel_sql(p, NOW0, one),
                                            panel_sql(p, NOW0 - timedelta(days=2), six))]


@pytest.fixture(scope="module")
def cluster(demo_dir):
    running = ClusterProcess(3, str(demo_dir))
    try:
        answers = [expected_answers("127.0.0.1", port, queries()) for port in node_ports(running)]
        assert answers[0] == answers[1] == answers[2]  # the nodes agree: a reference
        running.answers = answers[0]
        yield running
    finally:
        assert running.stop() == 0


def under_load(cluster, action, settle: int = 200, port: int | None = None) -> dict:
    """Run `action` while 16 clients load the balancer (Caddy, or the one on `port`); keep
    loading for `settle` requests after it returned (so the restarted node takes traffic
    again), then stop the load."""
    load = Load(cluster.host, port or cluster.port, cluster.answers, CLIENTS)
    try:
        wait_for(lambda: load.total() >= 100, 60, what="load before the action")
        action()
        after = load.total()
        wait_for(lambda: load.total() >= after + settle, 120, what="load after the action")
    finally:
        result = load.stop()
    cluster.note_descendants()
    return result


def test_sigkill_one_node(cluster):
    def kill():
        mark = len(cluster.lines)
        pid = cluster.node_pids()[2]
        os.killpg(pid, signal.SIGKILL)  # the node's whole session: supervisor, gateway, workers
        wait_for(lambda: cluster.grep(r"^node 2: ready again", mark), 120, what="node 2 back")
    result = under_load(cluster, kill)
    assert result["wrong"] == 0, result
    assert result["unclean"] == {}, result
    assert result["failed"] < 0.01 * result["requests"], result


def test_rolling_restart(cluster):
    def roll():
        mark = len(cluster.lines)
        cluster.process.send_signal(signal.SIGHUP)
        wait_for(lambda: cluster.grep(r"^rolling restart done", mark), 300, what="the rolling restart")
    result = under_load(cluster, roll)
    assert result["wrong"] == 0, result
    assert result["failed"] == 0, result


def test_sigterm_one_node(cluster):
    def stop_one():
        mark = len(cluster.lines)
        os.kill(cluster.node_pids()[1], signal.SIGTERM)
        wait_for(lambda: cluster.grep(r"^node 1: ready again", mark), 120, what="node 1 back")
    result = under_load(cluster, stop_one)
    assert result["wrong"] == 0, result
    assert result["failed"] == 0, result


def test_haproxy_in_front(cluster, tmp_path):
    """deploy/haproxy/haproxy.cfg, its node addresses replaced by the cluster's, in front of
    the same three nodes: a node SIGKILLed under load."""
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    port, flight = _free_port(), _free_port()
    config = (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text() \
        .replace("bind :8080", f"bind 127.0.0.1:{port}").replace("bind :8815", f"bind 127.0.0.1:{flight}")
    for n, node in enumerate(node_ports(cluster), 1):
        config = config.replace(f"node{n}:8000", f"127.0.0.1:{node}") \
            .replace(f"node{n}:8815 proto h2 check port 8000", f"127.0.0.1:{node} proto h2 check")
    (tmp_path / "haproxy.cfg").write_text(config)
    with open(tmp_path / "haproxy.log", "wb") as log:
        balancer = subprocess.Popen([haproxy, "-f", str(tmp_path / "haproxy.cfg")], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def listening():
            assert balancer.poll() is None, (tmp_path / "haproxy.log").read_text()
            return _answers(port)
        wait_for(listening, 30, what="haproxy")

        def kill():
            mark = len(cluster.lines)
            os.killpg(cluster.node_pids()[3], signal.SIGKILL)
            wait_for(lambda: cluster.grep(r"^node 3: ready again", mark), 120, what="node 3 back")
        result = under_load(cluster, kill, port=port)
    finally:
        balancer.terminate()
        balancer.wait(30)
    assert result["wrong"] == 0, result
    assert result["unclean"] == {}, result
    assert result["failed"] < 0.01 * result["requests"], result


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_sigterm_drain_contract(make_server):
    """The drain the balancers rely on: on SIGTERM /health/ready turns 503 at once while the
    node keeps answering queries for server.drain_s, then it stops cleanly."""
    node = make_server(workers=1, config="[server]\ndrain_s = 5\n").start()
    node.send_signal(signal.SIGTERM)
    wait_for(lambda: node.get("/health/ready").status == 503, 5, what="readiness 503")
    resp = node.query("SELECT count(*) FROM cpu")
    assert resp.status == 200 and resp.json()["data"] == [[336000]], resp
    assert node.process.wait(60) == 0
