"""Start and stop each peer, and sample the memory of its processes.

Every peer is a context manager that yields a Peer and always stops what it started: servers
run in their own session with PR_SET_PDEATHSIG (they die with this process even on SIGKILL),
are stopped with SIGTERM to the whole process group, then SIGKILL. Listening ports are free
loopback ports; nothing binds outside 127.0.0.1.

A Peer is "http" (duckfleet, the Arc-style tier: POST /api/v1/query[/arrow]), "duckdb"
(in-process DuckDB, Quack through a client DuckDB: `sql_for(query)` then wraps the query as
that client runs it) or "flight" (duckfleet's Arrow Flight SQL, through the ADBC driver: each
cursor is a connection of its own, as each dashboard client would have).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import psutil

from engine.extensions import load
from harness.server import REPO, Server

LOOPBACK = "127.0.0.1"


@dataclass
class Peer:
    name: str
    kind: str  # "http", "duckdb" or "flight"
    port: int = 0
    flight_port: int = 0  # duckfleet's Arrow Flight SQL port
    pids: list[int] = field(default_factory=list)  # roots of the process trees to sample
    con: duckdb.DuckDBPyConnection | None = None  # "duckdb" peers: the client connection;
    #                                               "flight" peers: FlightClients
    sql_for: Callable[[str], str] = lambda sql: sql
    cursor_setup: list[str] = field(default_factory=list)  # run on each client's new cursor
    notes: str = ""
    rss_before_mb: float | None = None  # in-process peers: the benchmark process alone, before

    def cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = self.con.cursor()
        for statement in self.cursor_setup:
            cursor.execute(statement)
        return cursor


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _subprocess(argv: list[str], env: dict, log: Path):
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
    try:
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    with contextlib.suppress(ProcessLookupError):  # workers a dead master left behind
        os.killpg(proc.pid, signal.SIGKILL)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode}\n"
                               + (log.read_text(errors="replace")[-3000:] if log else ""))
        with contextlib.suppress(OSError, http.client.HTTPException):
            if predicate():
                return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


# --- duckfleet ---

@contextlib.contextmanager
def duckfleet(name: str, tmp: Path, data_dir: Path, workers: int, config: str = "",
              env: dict | None = None, boot_timeout: float = 30):
    """boot_timeout: for the workers to be ready (a year of files takes minutes: every file's
    schema is read once)."""
    server = Server(tmp / name, data_dir, workers=workers, config=config, env=env)
    try:
        server.start(wait_ready=False)
        server.wait_ready(timeout=boot_timeout)
        yield Peer(name, "http", port=server.port, pids=[server.process.pid],
                   flight_port=server.flight_port or 0)
    finally:
        if server.process is not None:
            try:
                server.stop()
            except subprocess.TimeoutExpired:
                _stop_group(server.process, grace=0)
        shutil.rmtree(server.runtime_base, ignore_errors=True)


class FlightCursor:
    """An ADBC Flight SQL connection and its cursor, used as the load generator uses a DuckDB
    cursor: execute(sql).fetchall()."""

    def __init__(self, uri: str):
        import adbc_driver_flightsql.dbapi as flight_sql  # noqa: PLC0415 (the bench extra's)

        self._con = flight_sql.connect(uri, autocommit=True)
        self._cursor = self._con.cursor()

    def execute(self, sql: str) -> "FlightCursor":
        self._cursor.execute(sql)
        return self

    def fetchall(self) -> list:
        return self._cursor.fetchall()

    @property
    def description(self):
        return self._cursor.description

    def fetch_arrow_table(self):
        return self._cursor.fetch_arrow_table()

    def close(self) -> None:
        self._cursor.close()
        self._con.close()


@dataclass
class FlightClients:
    uri: str

    def cursor(self) -> FlightCursor:
        return FlightCursor(self.uri)


@contextlib.contextmanager
def duckfleet_flight(name: str, tmp: Path, data_dir: Path, workers: int, config: str = ""):
    """duckfleet, spoken to through Arrow Flight SQL (ADBC) instead of HTTP."""
    with duckfleet(name, tmp, data_dir, workers, config) as peer:
        yield Peer(name, "flight", port=peer.port, pids=peer.pids,
                   con=FlightClients(f"grpc://{LOOPBACK}:{peer.flight_port}"),
                   notes="Arrow Flight SQL through adbc-driver-flightsql, a connection a client")


# --- Arc-style tier: Gunicorn + Uvicorn workers + FastAPI + DuckDB pools ---

def arc_memory_limit(workers: int) -> str:
    """Arc's documented formula: memory_limit = RAM * 0.7 / workers."""
    return f"{int(psutil.virtual_memory().total * 0.7 / workers / 2**20)}MB"


@contextlib.contextmanager
def arc_tier(name: str, tmp: Path, boot: list[str], workers: int, pool_size: int, threads: int,
             memory_limit: str = "", prune_dir: Path | None = None, cache_ttl: float = 0):
    """cache_ttl > 0: each worker's query cache as Arc's production guide sets it (arc_tier.py)."""
    folder = tmp / name
    folder.mkdir(parents=True)
    (folder / "boot.sql").write_text("\n".join(boot) + "\n")
    port = free_port()
    env = {"ARC_BOOT_SQL": str(folder / "boot.sql"), "ARC_POOL_SIZE": str(pool_size),
           "ARC_THREADS": str(threads), "ARC_MEMORY_LIMIT": memory_limit,
           "ARC_PRUNE_DIR": str(prune_dir or ""), "ARC_CACHE_TTL": str(cache_ttl)}
    # Arc's workaround for its leak: recycle each worker after about 1000 requests.
    argv = [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker",
            "-w", str(workers), "-b", f"{LOOPBACK}:{port}", "--timeout", "600",
            "--graceful-timeout", "5", "--max-requests", "1000", "--max-requests-jitter", "100",
            "bench.peers.arc_tier:app"]
    log = folder / "gunicorn.log"
    with _subprocess(argv, env, log) as proc:
        seen: set[int] = set()

        def every_worker_answers():
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
            try:
                conn.request("GET", "/health")
                seen.add(int(__import__("json").loads(conn.getresponse().read())["pid"]))
            finally:
                conn.close()
            return len(seen) >= workers
        _wait(every_worker_answers, 120, f"{name} workers", proc, log)
        yield Peer(name, "http", port=port, pids=[proc.pid],
                   notes=f"{workers} workers x pool {pool_size}, threads={threads}, "
                         f"memory_limit={memory_limit or 'DuckDB default (80% RAM)'}"
                         + (", Arc's regex partition pruning" if prune_dir else "")
                         + (f", query cache in each worker (TTL {cache_ttl:g} s, 100 entries, 10 MB)"
                            if cache_ttl else ""))


# --- Quack: DuckDB's remote protocol ---

QUACK_TOKEN = "bench-token"


@contextlib.contextmanager
def quack(name: str, tmp: Path, boot: list[str], threads: int):
    folder = tmp / name
    folder.mkdir(parents=True)
    (folder / "boot.sql").write_text("\n".join(boot) + "\n")
    uri = f"quack:{LOOPBACK}:{free_port()}"
    log = folder / "quack.log"
    argv = [sys.executable, "-m", "bench.peers.quack_server", uri, QUACK_TOKEN,
            str(folder / "boot.sql"), str(threads)]
    with _subprocess(argv, {}, log) as proc:
        _wait(lambda: "ready" in log.read_text(), 60, f"{name} ready", proc, log)
        client = duckdb.connect()
        try:
            load(client, "httpfs", "quack")

            def remote(sql: str) -> str:
                text = sql.replace("'", "''")
                return (f"SELECT * FROM quack_query('{uri}', '{text}', "
                        f"token := '{QUACK_TOKEN}', disable_ssl := true)")
            yield Peer(name, "duckdb", pids=[proc.pid], con=client, sql_for=remote,
                       notes=f"quack_serve, threads={threads}; client: quack_query() in DuckDB")
        finally:
            client.close()


def quack_uri(peer: Peer) -> str:
    return peer.sql_for("").split("'")[1]


# --- in-process DuckDB ---

@contextlib.contextmanager
def in_process(name: str, boot: list[str], threads: int):
    """Its RSS is this benchmark process's: `rss_before_mb` is what the process held before
    the peer's database opened (the harness, the client, the answers it keeps)."""
    before = psutil.Process().memory_info().rss
    con = duckdb.connect(config={"threads": threads})
    try:
        for statement in boot:
            con.execute(statement)
        yield Peer(name, "duckdb", pids=[os.getpid()], con=con, rss_before_mb=round(before / 2**20, 1),
                   notes=f"this process, threads={threads}, one cursor per client thread; its RSS "
                         f"includes the benchmark process ({before / 2**20:.0f} MB before the peer)")
    finally:
        con.close()


# --- hygiene ---

def measure_peer(name: str, start: Callable, out: dict, measure: Callable[[Peer], None],
                 workload: str = "") -> None:
    """Start one peer (`start()`: a context manager giving the Peer) and measure it. A duckfleet
    fleet's processes are kept in out["fleet_pids"] for the leftover check; a peer that cannot
    start or be measured is reported in out["unavailable"] under "<workload> <name>"
    (verdict.py), not raised."""
    label = f"{workload} {name}".strip()
    print(f"[peers] {label}", flush=True)
    try:
        with start() as peer:
            if name.startswith("duckfleet"):
                out["fleet_pids"] += peer.pids
            measure(peer)
    except Exception as exc:
        out["unavailable"][label] = first_error_line(exc)
        print(f"[peers] {label}: unavailable: {out['unavailable'][label]}", flush=True)


def first_error_line(exc: Exception) -> str:
    """The error a server logged as it refused to start (a JSON log line), else the first line."""
    text = str(exc)
    for line in text.splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(line)
            if record.get("error"):
                return str(record["error"])[:300]
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def leftovers(fleet_pids: list[int]) -> dict:
    """What a run left behind: live descendants of this process, and segments of the fleets
    it started (named duckfleet.<supervisor pid>.*)."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(proc.cmdline()):
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
    segments = [p.name for pid in fleet_pids for p in Path("/dev/shm").glob(f"duckfleet.{pid}.*")]
    return {"processes": alive, "segments": segments}


# --- memory ---

def _label(proc: psutil.Process, root: int) -> str:
    cmd = proc.cmdline()
    if "-m" in cmd and cmd.index("-m") + 1 < len(cmd):
        what = cmd[cmd.index("-m") + 1]
        if what == "gunicorn":
            what = "gunicorn master" if proc.pid == root else "gunicorn worker"
    elif proc.pid == os.getpid():
        what = "bench (client)"
    else:
        what = Path(cmd[0]).name if cmd else proc.name()
    return f"{what} [{proc.pid}]"


class RssSampler:
    """Peak RSS of every process in the trees under `roots`, sampled on a thread."""

    def __init__(self, roots: list[int], interval: float = 0.2):
        self.roots = roots
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        total = 0
        for root in self.roots:
            try:
                top = psutil.Process(root)
                procs = [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    rss = proc.memory_info().rss
                    label = _label(proc, root)
                    self.peaks[label] = max(self.peaks.get(label, 0), rss)
                    total += rss
        self.peak_total = max(self.peak_total, total)

    def summary(self) -> dict:
        mb = 2 ** 20
        return {"peak_total_mb": round(self.peak_total / mb, 1),
                "peak_by_process_mb": {k: round(v / mb, 1) for k, v in sorted(self.peaks.items())}}
