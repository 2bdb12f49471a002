"""A duckfleet server for tests and benchmarks: a real supervisor in a subprocess, spoken to
over real HTTP.

Each Server gets its own runtime base directory and log file. Leak checks compare the
processes, runtime files and /dev/shm segments against what was there before.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")


def fleet_segments(supervisor_pid: int | None = None) -> set[str]:
    prefix = "duckfleet." + (f"{supervisor_pid}." if supervisor_pid else "")
    return {p.name for p in SHM.iterdir() if p.name.startswith(prefix)}


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


class Server:
    def __init__(self, tmp: Path, data_dir: Path, workers: int = 2, config: str = "",
                 env: dict[str, str] | None = None, args: list[str] | None = None):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        # Short, outside pytest's deep tmp paths: a Unix socket path has at most 107 bytes.
        self.runtime_base = Path(tempfile.mkdtemp(prefix="dft-"))
        self.log_path = tmp / "supervisor.log"
        self.config_path = tmp / "engine.toml"
        self.config_path.write_text(config)
        self.data_dir = data_dir
        self.workers = workers
        # Flight on a free port (the default, 8815, would collide between fleets)
        self.env = {**os.environ, "DUCKFLEET_SERVER_RUNTIME_DIR": str(self.runtime_base),
                    "DUCKFLEET_FLIGHT_PORT": "0", **(env or {})}
        self.args = args or []
        self.process: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.flight_port: int | None = None
        self.descendants: set[int] = set()

    # --- lifecycle ---

    def start(self, wait_ready: bool = True) -> "Server":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.supervisor", "--config", str(self.config_path),
             "--port", "0", "--workers", str(self.workers), "--data-dir", str(self.data_dir),
             *self.args],
            cwd=REPO, env=self.env, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL)
        listening = wait_for(lambda: self.event("listening") or self._exited(), 60, what="listening")
        if isinstance(listening, dict):
            self.port = listening["port"]
            self.flight_port = listening.get("flight_port")
            self.runtime_dir = Path(listening["runtime_dir"])
        if wait_ready:
            self.wait_ready()
        return self

    def _exited(self):
        if self.process.poll() is not None:
            raise AssertionError(f"supervisor exited with {self.process.returncode}:\n{self.log()}")

    def wait_ready(self, workers: int | None = None, timeout: float = 30) -> None:
        want = self.workers if workers is None else workers

        def ready():
            self._exited()
            try:
                return self.get("/health").json()["workers_ready"] >= want  # open with auth on too
            except OSError:
                return False
        wait_for(ready, timeout, what=f"{want} workers ready")
        self.descendants |= {p.pid for p in self.children()}

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def processes(self, module: str) -> list[int]:
        """Live (not zombie) descendants running `python -m module`."""
        found = []
        for proc in self.children():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and module in proc.cmdline():
                    found.append(proc.pid)
            except psutil.Error:
                pass
        return found

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"]]

    def gateway_pid(self) -> int:
        return self.processes("gateway.app")[0]

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.descendants |= {p.pid for p in self.children()}
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        finally:
            self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
        return found

    def event(self, name: str) -> dict | None:
        events = self.events(name)
        return events[0] if events else None

    # --- HTTP ---

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 60) -> Response:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def query(self, sql: str | None = None, path: str = "/api/v1/query", timeout: float = 60,
              **fields) -> Response:
        body = dict(fields)
        if sql is not None:
            body["sql"] = sql
        return self.request("POST", path, json.dumps(body).encode(),
                            {"Content-Type": "application/json"}, timeout)

    def stats(self) -> dict:
        return self.get("/api/v1/stats/connections").json()


def assert_no_leaks(server: Server) -> None:
    """After a stop: no descendant alive, no runtime dir, no segment of this fleet."""
    alive = [pid for pid in server.descendants if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {alive}"
    if server.runtime_base.exists():  # shared by two servers in one test: checked once
        left = list(server.runtime_base.iterdir())
        assert not left, f"runtime files left: {left}"
        server.runtime_base.rmdir()
    assert not fleet_segments(server.process.pid), f"segments left: {fleet_segments(server.process.pid)}"


def raw_socket_request(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(payload)
    return sock


def server_has_read(sock: socket.socket) -> bool:
    """Whether the server side of this loopback TCP connection has read every byte we sent
    (its receive queue in /proc/net/tcp is empty): the request is in the gateway's hands."""
    client_port = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            if int(local.split(":")[1], 16) == server_port and \
                    int(remote.split(":")[1], 16) == client_port:
                return int(queues.split(":")[1], 16) == 0
    return False


def http_post(sql_body: dict) -> bytes:
    body = json.dumps(sql_body).encode()
    return (b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def http_post_closing(sql_body: dict) -> bytes:
    """http_post with Connection: close: the reply ends when the server closes."""
    return http_post(sql_body).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")


def write_small_dataset(data_dir: Path, databases=("default", "other")) -> Path:
    """A tiny Arc layout: <db>/cpu/2025/11/01/00/cpu.parquet with 10 rows naming their database."""
    import duckdb

    con = duckdb.connect()
    for db in databases:
        folder = data_dir / db / "cpu" / "2025" / "11" / "01" / "00"
        folder.mkdir(parents=True, exist_ok=True)
        con.execute(f"COPY (SELECT '{db}' AS db, i FROM range(10) t(i)) "
                    f"TO '{folder / 'cpu.parquet'}' (FORMAT parquet)")
    con.close()
    return data_dir
