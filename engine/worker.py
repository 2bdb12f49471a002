"""A worker: one process, one DuckDB connection (threads=1), one query at a time.

Started by the supervisor with exec (`python -m engine.worker`). At boot it opens DuckDB with
its memory_limit and temp_directory, loads the catalog, reads every setting back and refuses
to serve (exit code BOOT_FAILED) if one differs. Then it connects to the gateway's worker
socket, says Hello, and serves Query messages in its main thread. A reader thread takes
messages off the socket so that a Cancel can interrupt the running query.

A result is encoded straight into the segment the gateway lent with the query; the worker
replies with its length and keeps nothing. Failures are replied as typed Failure messages;
only a broken gateway connection or SIGTERM ends the loop (after the current query).
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from engine import catalog, config as config_mod, log as log_mod, policy, protocol
from engine.encode import FORMATS, write_result
from engine.errors import Kind, QueryError
from engine.process import BOOT_FAILED, die_with_parent, malloc_trim
from engine.shm import ChunkWriter

log = log_mod.get()


def open_database(cfg: config_mod.Config, memory_limit: int, temp_dir: str) -> duckdb.DuckDBPyConnection:
    """The worker's connection: settings applied, catalog loaded, settings verified."""
    con = duckdb.connect(":memory:", config={
        "threads": cfg.duckdb.threads,
        "memory_limit": f"{memory_limit}B",
        "temp_directory": temp_dir,
    })
    con.execute("SET TimeZone = 'UTC'")
    for statement in catalog.boot_statements(cfg.catalog):
        con.execute(statement)
    verify_settings(con, {"threads": str(cfg.duckdb.threads), "memory_limit": memory_limit,
                          "temp_directory": temp_dir, "TimeZone": "UTC"})
    return con


def read_settings(con: duckdb.DuckDBPyConnection, names) -> dict[str, str]:
    return {name: str(con.execute("SELECT current_setting(?)", [name]).fetchone()[0])
            for name in names}


def verify_settings(con: duckdb.DuckDBPyConnection, expected: dict) -> dict[str, str]:
    actual = read_settings(con, expected)
    for name, want in expected.items():
        if isinstance(want, int):  # a size: DuckDB prints it as format_bytes does ("1.9 GiB")
            want = con.execute("SELECT format_bytes(?::BIGINT)", [want]).fetchone()[0]
        if actual[name] != want:
            raise RuntimeError(f"setting {name} reads back as {actual[name]!r}, expected {want!r}")
    return actual


WAKE = object()  # inbox sentinel: look at `leaving` again


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Worker:
    """The work loop. Main thread: queries, hygiene, heartbeats. Reader thread: the socket."""

    def __init__(self, worker_id: int, cfg: config_mod.Config, con: duckdb.DuckDBPyConnection,
                 sock: socket.socket, reopen, status_fd: int):
        self.worker_id = worker_id
        self.cfg = cfg
        self.con = con
        self.sock = sock
        self._reopen = reopen  # () -> a fresh connection, settings applied and verified
        self._status_fd = status_fd
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # Query, WAKE, or None: stop
        self.grants: queue.SimpleQueue = queue.SimpleQueue()  # segment name, or None: cancelled
        self._running_id: int | None = None
        self._lock = threading.Lock()  # guards _running_id against the reader thread
        workers = cfg.workers
        jitter = random.randint(0, workers.max_queries_jitter) if workers.max_queries else 0
        self.max_queries = workers.max_queries + jitter  # fixed at spawn, like max_requests_jitter
        self.born = time.monotonic()
        self.queries = 0
        self.connections = 1
        self.rss_at_connect = self.rss_at_trim = current_rss()
        self.leaving: str | None = None  # set by SIGTERM: say Bye, finish, exit
        self.retiring: str | None = None  # a limit was reached and the supervisor was told

    # --- talking to the supervisor: one line per event on a pipe ---

    def status(self, line: str) -> None:
        try:
            os.write(self._status_fd, (line + "\n").encode())
        except OSError:
            pass  # the supervisor is gone; PR_SET_PDEATHSIG ends us

    def leave(self) -> None:
        """SIGTERM: stop taking queries (handler-safe: only sets a flag and wakes the loop).

        At shutdown the gateway is gone before workers get SIGTERM, so a gateway that hears
        this Bye is seeing a planned replacement (a recycling limit, a reload, a scale-down).
        """
        self.leaving = self.retiring or "replaced"
        self.inbox.put(WAKE)

    # --- the socket ---

    def read_loop(self) -> None:
        """Reader thread: queue queries and grants, interrupt on Cancel, stop on EOF."""
        try:
            while (message := protocol.recv(self.sock)) is not None:
                if isinstance(message, protocol.Query):
                    self.inbox.put(message)
                elif isinstance(message, protocol.Grant):
                    with self._lock:
                        if self._running_id == message.id:
                            self.grants.put(message.segment)
                elif isinstance(message, protocol.Cancel):
                    self._cancel(message.id)
        except (OSError, protocol.ProtocolError) as exc:
            log.warning("gateway_connection_failed", error=str(exc))
        self._cancel(None)
        self.inbox.put(None)

    def _cancel(self, query_id: int | None) -> None:
        with self._lock:
            if self._running_id is not None and query_id in (None, self._running_id):
                self.con.interrupt()
                self.grants.put(None)  # wakes a writer waiting for a segment

    # --- the work loop ---

    def serve(self) -> None:
        said_bye = False
        self.status("ready")
        while True:
            if self.leaving and not said_bye:
                protocol.send(self.sock, protocol.Bye(self.leaving))
                said_bye = True
            try:
                query = self.inbox.get(timeout=self.cfg.workers.heartbeat_s)
            except queue.Empty:
                self.idle_tick()
                continue
            if query is None:
                return
            if query is WAKE:
                continue
            self.status(f"busy {query.timeout_s}")
            reply = self.run(query)
            try:
                protocol.send(self.sock, reply)
            except OSError:
                return
            self.after_query(reply.rows if isinstance(reply, protocol.Result) else 0)
            self.status("idle")

    def idle_tick(self) -> None:
        """A heartbeat, memory figures for the gateway, and the age limit."""
        self.status("idle")
        self.report_memory()
        self.check_limits(current_rss())

    def report_memory(self) -> None:
        memory = self.con.execute("SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT "
                                  "FROM duckdb_memory()").fetchone()[0]
        protocol.send(self.sock, protocol.Status(current_rss(), memory, self.queries, self.connections))

    def after_query(self, rows: int) -> None:
        self.queries += 1
        workers = self.cfg.workers
        rss = current_rss()
        if workers.hygiene:
            gc.collect(0 if self.queries % workers.gc_full_every else 2)
            if (rss - self.rss_at_connect > workers.reconnect_growth_mb * 2**20
                    or 0 < workers.reconnect_after_rows < rows):
                self.reconnect(rss)
                rss = current_rss()
            elif rss - self.rss_at_trim > workers.trim_growth_mb * 2**20:
                malloc_trim()
                rss = self.rss_at_trim = current_rss()
        if self.queries % workers.gc_full_every == 0:
            self.report_memory()  # a busy worker is never idle long enough to report
        self.check_limits(rss)

    def reconnect(self, rss: int) -> None:
        """A fresh DuckDB connection: what the old one cached or fragmented goes with it."""
        self.con.close()
        self.con = self._reopen()
        self.connections += 1
        malloc_trim()
        self.rss_at_connect = self.rss_at_trim = current_rss()
        log.info("duckdb_reconnected", worker=self.worker_id, rss_before=rss,
                 rss_after=self.rss_at_connect)
        self.report_memory()

    def check_limits(self, rss: int) -> None:
        if self.retiring:
            return
        workers = self.cfg.workers
        if self.max_queries and self.queries >= self.max_queries:
            self.retiring = "max_queries"
        elif workers.max_rss_mb and rss > workers.max_rss_mb * 2**20:
            self.retiring = "max_rss"
        elif workers.max_age_s and time.monotonic() - self.born > workers.max_age_s:
            self.retiring = "max_age"
        if self.retiring:
            log.info("worker_retiring", worker=self.worker_id, reason=self.retiring,
                     queries=self.queries, rss=rss)
            self.status(f"retire {self.retiring}")

    def _next_segment(self) -> str:
        name = self.grants.get()
        if name is None:
            raise QueryError(Kind.TIMEOUT, "query cancelled")
        return name

    def run(self, query: protocol.Query) -> protocol.Result | protocol.Failure:
        started = time.perf_counter()
        with self._lock:
            self._running_id = query.id
            while not self.grants.empty():  # grants of an earlier query, reclaimed by the gateway
                self.grants.get_nowait()

        def hand_over(segment: str, length: int) -> None:
            protocol.send(self.sock, protocol.Chunk(query.id, segment, length))

        try:
            if query.format not in FORMATS:
                raise QueryError(Kind.BAD_REQUEST, f"unknown format {query.format!r}")
            policy.check(self.con, query.sql)
            with ChunkWriter(query.segment, query.chunk_bytes, query.max_result_bytes,
                             hand_over, self._next_segment) as sink:
                rel = self.con.sql(query.sql, params=query.params) if query.params else self.con.sql(query.sql)
                if rel is None:
                    raise QueryError(Kind.BAD_REQUEST, "the statement returns no result")
                rows = write_result(rel, query.format, sink, query.batch_rows)
                del rel
                return protocol.Result(query.id, sink.segment, sink.position, rows,
                                       (time.perf_counter() - started) * 1000)
        except QueryError as exc:
            return protocol.Failure(query.id, exc.kind, exc.message)
        except duckdb.InterruptException:
            return protocol.Failure(query.id, Kind.TIMEOUT, "query interrupted")
        except duckdb.OutOfMemoryException as exc:
            return protocol.Failure(query.id, Kind.OUT_OF_MEMORY,
                                    f"{exc} (this worker's memory_limit is "
                                    f"{read_settings(self.con, ['memory_limit'])['memory_limit']})")
        except duckdb.PermissionException as exc:
            return protocol.Failure(query.id, Kind.FORBIDDEN, str(exc))
        except duckdb.Error as exc:
            return protocol.Failure(query.id, Kind.SQL_ERROR, str(exc))
        except pa.ArrowNotImplementedError as exc:
            return protocol.Failure(query.id, Kind.BAD_REQUEST,
                                    f"format {query.format!r} cannot encode this result: {exc}")
        except Exception as exc:  # a bug here must not take the worker down with it
            log.error("query_failed", exc_info=True, query_id=query.id)
            return protocol.Failure(query.id, Kind.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            with self._lock:
                self._running_id = None


def connect_gateway(path: str, timeout: float, give_up=lambda: False) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline or give_up():
                raise
            time.sleep(0.02)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="duckfleet worker (started by the supervisor)")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--memory-limit", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.supervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    runtime = Path(args.runtime_dir)
    cfg = config_mod.decode((runtime / "config.json").read_bytes())
    global log
    log = log_mod.setup(f"worker-{args.id}", cfg.server.log_level, cfg.server.log_file)
    signal.signal(signal.SIGUSR1, lambda *_: log_mod.reopen(cfg.server.log_file))

    temp_dir = runtime / f"tmp-worker-{args.id}-{os.getpid()}"
    reopen = lambda: open_database(cfg, args.memory_limit, str(temp_dir))  # noqa: E731
    try:
        con = reopen()
        settings = read_settings(con, ["threads", "memory_limit", "temp_directory", "TimeZone"])
        sock = connect_gateway(str(runtime / "workers.sock"), cfg.workers.boot_timeout_s)
    except Exception as exc:
        log.error("worker_boot_failed", worker=args.id, error=str(exc))
        return BOOT_FAILED
    malloc_trim()
    worker = Worker(args.id, cfg, con, sock, reopen, args.status_fd)
    signal.signal(signal.SIGTERM, lambda *_: worker.leave())
    log.info("worker_ready", worker=args.id, **settings)
    while True:
        protocol.send(worker.sock, protocol.Hello(args.id, os.getpid(), args.memory_limit, settings))
        threading.Thread(target=worker.read_loop, name="socket-reader", daemon=True).start()
        worker.serve()
        worker.sock.close()
        if worker.leaving:
            break
        # The gateway went away (it is being replaced): keep DuckDB warm and rejoin the new one.
        log.warning("gateway_lost", worker=args.id)
        try:
            worker.sock = connect_gateway(str(runtime / "workers.sock"), cfg.workers.boot_timeout_s,
                                          give_up=lambda: worker.leaving)
        except OSError:
            break
    worker.con.close()
    _remove_tree(temp_dir)
    return 0


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink(missing_ok=True)
        path.rmdir()


if __name__ == "__main__":
    sys.exit(main())
