"""A local cluster under load, for tests and bench.cluster.

`ClusterProcess` runs `python -m engine.cluster` (N nodes behind Caddy) as a subprocess and
reads what it prints (the balancer's address, each node's pid, restarts) into `lines`, the
state tests synchronise on. It remembers every descendant it has seen, so a stop can check
that none is left, nor the cluster's directory, nor a shared-memory segment of its nodes.

`Load` is a closed loop of client threads, each with its own keep-alive connection to the
balancer, sending queries whose answers are known and checking every one: a reply is `ok`,
`wrong` (200 with other data), `clean` (a 502 or 503: the balancer or the node said it could
not serve) or `unclean` (anything else: a reset, a timeout, another status).
"""

from __future__ import annotations

import collections
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from harness.server import REPO, SHM, wait_for


class ClusterProcess:
    def __init__(self, nodes: int, data_dir: str, workers: int = 1, config: Path | None = None):
        command = [sys.executable, "-m", "engine.cluster", "--nodes", str(nodes), "--port", "0",
                   "--workers", str(workers), "--data-dir", data_dir]
        if config is not None:
            command += ["--config", str(config)]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.seen: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        found = wait_for(lambda: self._exited() or self.grep(r"^balancer: http://([\d.]+):(\d+)"),
                         180, what="the cluster's balancer")
        self.host, self.port = found.group(1), int(found.group(2))
        self.note_descendants()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def _exited(self):
        if self.process.poll() is not None:
            raise AssertionError(f"the cluster exited with {self.process.returncode}:\n"
                                 + "\n".join(self.lines[-50:]))

    def grep(self, pattern: str, after: int = 0):
        """The last match of pattern in the lines printed from index `after` on."""
        for line in reversed(self.lines[after:]):
            match = re.search(pattern, line)
            if match:
                return match
        return None

    def node_pids(self) -> dict[int, int]:
        """{node number: supervisor pid}, as the cluster last printed them."""
        pids = {}
        for line in self.lines:
            match = re.search(r"^node (\d+): .*\(pid (\d+)", line)
            if match:
                pids[int(match.group(1))] = int(match.group(2))
        return pids

    def note_descendants(self) -> None:
        try:
            self.seen |= {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def stop(self, timeout: float = 120) -> int:
        self.note_descendants()
        home = self.grep(r"log (/\S+)/node-1\.log")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout)
        self._reader.join(10)
        alive = [pid for pid in self.seen if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes left behind: {alive}"
        if home is not None:
            assert not Path(home.group(1)).exists(), "the cluster's directory was left behind"
        segments = [p.name for p in SHM.iterdir() if p.name.startswith("duckfleet.")
                    and int(p.name.split(".")[1]) in self.seen]
        assert not segments, f"segments left: {segments}"
        return code


class Load:
    """`clients` threads in a closed loop against host:port until stop()."""

    def __init__(self, host: str, port: int, queries: dict[str, list], clients: int = 16):
        self.host, self.port = host, port
        self.queries = list(queries.items())  # (sql, expected data)
        self.counts: collections.Counter = collections.Counter()
        self.unclean: collections.Counter = collections.Counter()
        self.details: collections.Counter = collections.Counter()  # every failure, by kind
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True)
                         for n in range(clients)]
        self.started = time.perf_counter()
        for thread in self._threads:
            thread.start()

    def _client(self, n: int) -> None:
        conn = None
        i = n
        while not self._stop.is_set():
            sql, expected = self.queries[i % len(self.queries)]
            i += 1
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            began = time.perf_counter()
            try:
                conn.request("POST", "/api/v1/query", json.dumps({"sql": sql}).encode(),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = None
                self._count("unclean", type(exc).__name__)
                continue
            if resp.status == 200:
                data = json.loads(body)["data"]
                self._count("ok" if data == expected else "wrong", latency=time.perf_counter() - began)
            elif resp.status in (502, 503):
                self._count("clean", f"http {resp.status}")
            else:
                self._count("unclean", f"http {resp.status}: {body[:200]!r}")
            if resp.will_close:
                conn.close()
                conn = None

    def _count(self, kind: str, detail: str | None = None, latency: float | None = None) -> None:
        with self._lock:
            self.counts[kind] += 1
            if detail is not None:
                self.details[detail] += 1
                if kind == "unclean":
                    self.unclean[detail] += 1
            if latency is not None:
                self.latencies.append(latency)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def stop(self) -> dict:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        wall = time.perf_counter() - self.started
        total = sum(self.counts.values())
        failed = total - self.counts["ok"] - self.counts["wrong"]
        return {"requests": total, "ok": self.counts["ok"], "wrong": self.counts["wrong"],
                "failed": failed, "clean": self.counts["clean"], "unclean": dict(self.unclean),
                "failures": dict(self.details),
                "seconds": wall, "qps": self.counts["ok"] / wall if wall else 0.0}


def expected_answers(host: str, port: int, sqls: list[str]) -> dict[str, list]:
    """Each query's data, asked once before any load (the reference the load checks against)."""
    found = {}
    for sql in sqls:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        conn.request("POST", "/api/v1/query", json.dumps({"sql": sql}).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200, (sql, body[:300])
        found[sql] = json.loads(body)["data"]
    return found
