"""A worker: one process, one DuckDB connection (threads=1), one query at a time.

Started by the supervisor with exec (`python -m engine.worker`). At boot it opens DuckDB with
its memory_limit and temp_directory, loads the catalog, locks it into the sandbox
(engine/sandbox.py), reads every setting back and refuses to serve (exit code BOOT_FAILED) if
one differs. Then it connects to the gateway's worker socket, says Hello, and serves Query
messages in its main thread. A reader thread takes messages off the socket so that a Cancel
can interrupt the running query.

A query from a token limited to some databases runs in a DuckDB instance of its own that holds
only those databases and whose sandbox admits only their directories (`Instances`): what the
token may read is decided by DuckDB's catalog and file system checks, not by reading the SQL.

A result is encoded straight into the segment the gateway lent with the query; the worker
replies with its length and keeps nothing. Failures are replied as typed Failure messages,
with the server's paths taken out (engine/redact.py: paths under data_dir are shown relative
to it). A gateway that went away is rejoined when it is replaced, unless the supervisor has
said the fleet is stopping (SIGUSR2): then the worker leaves, quietly. Only SIGTERM (after
the current query: the supervisor retires the worker) ends the loop otherwise, and an
internal error: DuckDB's internal and fatal errors (also as pyarrow's OSError) mean
this instance can no longer be trusted, so the worker says Bye before it answers (the gateway
sends it nothing more and readiness no longer counts it), tells the supervisor to start its
replacement (`recycle internal_error`), and leaves.

Memory: while a query runs a watch thread (engine/memwatch.py) reads RSS; past memory_limit +
workers.rss_margin_mb the worker says Bye and fails the query with OUT_OF_MEMORY, then exits at
once with OVER_MEMORY (no cleanup: the memory is the problem), and the supervisor replaces it.
Every message to the gateway goes through Worker.send, whose lock keeps frames whole across the
main, reader and watch threads.
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
import msgspec
import pyarrow as pa

from engine import config as config_mod, log as log_mod, policy, protocol, sandbox
from engine.encode import Encoder, Tally
from engine.formats import FORMATS
from engine.errors import Kind, QueryError, duckdb_kind
from engine.instances import Instances, read_settings
from engine.memwatch import MemoryWatch, current_rss
from engine.progress import ProgressReporter
from engine.process import BOOT_FAILED, OVER_MEMORY, die_with_parent, malloc_trim
from engine.redact import Redactor, first_line
from engine.shm import ChunkWriter
from engine.sqltree import fill, scalar

log = log_mod.get()


WAKE = object()  # inbox sentinel: look at `leaving` again
SEND_LOCK_WAIT_S = 1.0  # the watch thread's wait for a frame in flight before it exits anyway


class Worker:
    """The work loop. Main thread: queries, hygiene, heartbeats. Reader thread: the socket."""

    def __init__(self, worker_id: int, cfg: config_mod.Config, instances: Instances,
                 sock: socket.socket, reopen, status_fd: int, redact=lambda text: text,
                 fleet_stopping: threading.Event | None = None):
        self.worker_id = worker_id
        # SIGUSR2 from the supervisor: the fleet stops, so the gateway letting go is no loss.
        self.fleet_stopping = fleet_stopping or threading.Event()
        self.redact = redact  # takes the server's paths out of error messages
        self.cfg = cfg
        # Object storage: the prefix every file a query names must be under (engine/policy.py).
        self.remote = cfg.catalog.data_dir if config_mod.is_remote(cfg.catalog.data_dir) else None
        self.instances = instances
        self.sock = sock
        self._reopen = reopen  # () -> fresh Instances, settings applied and verified
        self._status_fd = status_fd
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # Query, WAKE, or None: stop
        self.grants: queue.SimpleQueue = queue.SimpleQueue()  # segment name, or None: cancelled
        # The running query's id and DuckDB connection (None until chosen), and the id of the
        # query a Cancel interrupted; the lock guards both against the reader thread.
        self._running: tuple[int, duckdb.DuckDBPyConnection | None] | None = None
        self._interrupted: int | None = None
        self._lock = threading.Lock()
        workers = cfg.workers
        jitter = random.randint(0, workers.max_queries_jitter) if workers.max_queries else 0
        self.max_queries = workers.max_queries + jitter  # fixed at spawn, like max_requests_jitter
        self.born = time.monotonic()
        self.queries = 0
        self.connections = 1
        self.rss_at_connect = self.rss_at_trim = current_rss()
        self.leaving: str | None = None  # set by SIGTERM: say Bye, finish, exit
        self.recycling: str | None = None  # a limit was reached and the supervisor was told
        self.broken = False  # DuckDB reported an internal error: answer, then leave at once
        self._send_lock = threading.Lock()
        self.rss_cap = (instances.memory_limit + workers.rss_margin_mb * 2**20
                        if workers.rss_margin_mb else 0)
        self.watch = MemoryWatch(self.rss_cap, workers.rss_check_ms / 1000, self.over_memory)
        self.watch.start()
        self.checked = policy.Checked(self.remote)  # statements found allowed, checked once each
        self.encoder = Encoder()  # results' shapes, remembered per statement
        self.progress = ProgressReporter(workers.progress_ms / 1000, self.send)
        self.progress.start()

    def send(self, message: protocol.Message) -> None:
        with self._send_lock:
            protocol.send(self.sock, message)

    def over_memory(self, query_id: int, rss: int) -> None:
        """Watch thread: the running query took RSS past the cap. Tell the gateway (Bye, so it
        sends nothing more here, then the query's failure) and exit at once."""
        limit, margin = self.instances.memory_limit, self.cfg.workers.rss_margin_mb
        message = (f"the query took its worker's memory to {rss / 2**20:.0f} MiB, past the "
                   f"worker's cap of {self.rss_cap / 2**20:.0f} MiB (memory_limit is "
                   f"{limit / 2**20:.1f} MiB, plus workers.rss_margin_mb = {margin}); the worker "
                   "was stopped and replaced")
        log.warning("worker_over_memory", worker=self.worker_id, query_id=query_id, rss=rss,
                    cap=self.rss_cap, memory_limit=limit)
        # Holding the lock, the main thread cannot send this query's Result in between.
        if self._send_lock.acquire(timeout=SEND_LOCK_WAIT_S):
            try:
                if self.watch.armed_for() == query_id:
                    protocol.send(self.sock, protocol.Bye("out_of_memory"))
                    protocol.send(self.sock, protocol.Failure(query_id, Kind.OUT_OF_MEMORY, message))
            except OSError:
                pass
        os._exit(OVER_MEMORY)

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
        self.leaving = self.recycling or "replaced"
        self.inbox.put(WAKE)

    # --- the socket ---

    def read_loop(self) -> None:
        """Reader thread: queue queries and grants, interrupt on Cancel, stop on EOF."""
        try:
            while (message := protocol.recv(self.sock)) is not None:
                if isinstance(message, protocol.Query):
                    self.inbox.put(message)
                elif isinstance(message, protocol.Welcome):
                    self.status("ready")  # the gateway dispatches to us from now on
                elif isinstance(message, protocol.Grant):
                    with self._lock:
                        if self._running is not None and self._running[0] == message.id:
                            self.grants.put(message.segment)
                elif isinstance(message, protocol.Cancel):
                    self._cancel(message.id, tell_supervisor=True)
        except (OSError, protocol.ProtocolError) as exc:
            if self.fleet_stopping.is_set():  # a gateway that exits may reset its sockets
                log.info("gateway_connection_closed", error=str(exc))
            else:
                log.warning("gateway_connection_failed", error=str(exc))
        self._cancel(None)
        self.inbox.put(None)

    def _cancel(self, query_id: int | None, tell_supervisor: bool = False) -> None:
        with self._lock:
            if self._running is not None and query_id in (None, self._running[0]):
                if tell_supervisor and self._interrupted != self._running[0]:
                    # The deadline passed or the client left: if DuckDB ignores the interrupt,
                    # the supervisor kills this worker after the grace, not at the old deadline.
                    self.status("cancel")
                self._interrupted = self._running[0]
                if self._running[1] is not None:
                    self._running[1].interrupt()
                self.grants.put(None)  # wakes a writer waiting for a segment

    # --- the work loop ---

    def serve(self) -> None:
        said_bye = False
        while True:
            if self.leaving and not said_bye:
                self.send(protocol.Bye(self.leaving))
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
                with self._send_lock:
                    self.watch.disarm()  # under the lock: the watch thread cannot fail it now
                    if self.broken and not said_bye:
                        # Bye before the reply: the gateway must not give this worker another query.
                        protocol.send(self.sock, protocol.Bye("internal_error"))
                        said_bye = True
                    protocol.send(self.sock, reply)
            except OSError:
                return
            self.after_query(reply.rows if isinstance(reply, protocol.Result) else 0)
            self.status("idle")

    def idle_tick(self) -> None:
        """A heartbeat, memory figures for the gateway, and the age limit."""
        self.status("idle")
        if self.broken:
            return  # its DuckDB is not to be asked anything more
        self.report_memory()
        self.check_limits(current_rss())

    def report_memory(self) -> None:
        memory = scalar(self.instances.full,
                        "SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT FROM duckdb_memory()")
        self.send(protocol.Status(current_rss(), memory, self.queries, self.connections))

    def after_query(self, rows: int) -> None:
        self.queries += 1
        if self.broken:
            self.check_limits(0)
            return
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

    def reconnect(self, rss: int, reason: str = "memory", evolved: set[str] | None = None) -> None:
        """A fresh DuckDB connection: what the old one cached or fragmented goes with it, and
        views for the tables there are now (`evolved`: as the gateway says they are)."""
        keep = self.instances.evolved if evolved is None else evolved
        self.instances.close()
        self.encoder.forget()
        self.instances = self._reopen(keep)
        self.connections += 1
        malloc_trim()
        self.rss_at_connect = self.rss_at_trim = current_rss()
        log.info("duckdb_reconnected", worker=self.worker_id, reason=reason, rss_before=rss,
                 rss_after=self.rss_at_connect)
        self.report_memory()

    def check_limits(self, rss: int) -> None:
        if self.broken and not self.leaving:
            # Not a recycling limit: this instance must not serve another query, so it stops
            # taking them now (Bye), without waiting for its replacement to be ready.
            self.leaving = "internal_error"
            if not self.recycling:  # else the supervisor is starting a replacement already
                self.recycling = "internal_error"
                log.error("worker_recycling", worker=self.worker_id, reason=self.recycling,
                          queries=self.queries, rss=rss)
                self.status(f"recycle {self.recycling}")
            return
        if self.recycling:
            return
        workers = self.cfg.workers
        if self.max_queries and self.queries >= self.max_queries:
            self.recycling = "max_queries"
        elif workers.max_rss_mb and rss > workers.max_rss_mb * 2**20:
            self.recycling = "max_rss"
        elif workers.max_age_s and time.monotonic() - self.born > workers.max_age_s:
            self.recycling = "max_age"
        if self.recycling:
            log.info("worker_recycling", worker=self.worker_id, reason=self.recycling,
                     queries=self.queries, rss=rss)
            self.status(f"recycle {self.recycling}")

    def _no_such_table(self, con, exc: duckdb.Error) -> str:
        """DuckDB suggests system tables for a name it does not know; name the real ones."""
        message = str(exc)
        if con is None or not isinstance(exc, duckdb.CatalogException) \
                or "does not exist" not in message:
            return message
        default = self.cfg.catalog.default_database
        views = con.execute("SELECT schema_name, view_name FROM duckdb_views() "
                            "WHERE NOT internal ORDER BY ALL").fetchall()
        tables = con.execute("SELECT database_name, table_name FROM duckdb_tables() "
                             "ORDER BY ALL").fetchall()
        names = [name if schema in (default, "main") else f"{schema}.{name}"
                 for schema, name in views] + [f"{db}.{name}" for db, name in tables]
        first = message.split("\n", 1)[0]
        return f"{first} Tables here: {', '.join(names) or 'none (the data directory is empty)'}"

    def _next_segment(self) -> str:
        name = self.grants.get()
        if name is None:
            raise QueryError(Kind.TIMEOUT, "query cancelled")
        return name

    def run(self, query: protocol.Query) -> protocol.Result | protocol.Failure:
        reply = self._run(query)
        if isinstance(reply, protocol.Failure):
            reply = protocol.Failure(reply.id, reply.kind, self.redact(reply.message))
        return reply

    def _run(self, query: protocol.Query) -> protocol.Result | protocol.Failure:
        started = time.perf_counter()
        self.watch.arm(query.id)
        with self._lock:
            self._running = (query.id, None)
            while not self.grants.empty():  # grants of an earlier query, reclaimed by the gateway
                self.grants.get_nowait()

        def hand_over(segment: str, length: int) -> None:
            self.send(protocol.Chunk(query.id, segment, length))

        con = None
        try:
            if query.format not in FORMATS:
                raise QueryError(Kind.BAD_REQUEST, f"unknown format {query.format!r}")
            if query.catalog and query.catalog != self.instances.version:
                # A table came or went, or its files' schemas now differ.
                self.reconnect(current_rss(), "tables_changed", set(query.evolved or ()))
                # Its views come from a listing made now, no older than the gateway's: current
                # for this version (else a listing that differs would reopen at every query).
                self.instances.version = query.catalog
            con = self.instances.get(query.databases)
            with self._lock:
                if self._interrupted == query.id:  # cancelled before DuckDB could be told
                    raise QueryError(Kind.TIMEOUT, "query cancelled")
                self._running = (query.id, con)
            self.checked.check(con, query.sql)
            sql = fill(query.sql, query.fills) if query.fills else query.sql
            tally = Tally()
            self.progress.arm(query.id, con, tally)
            with ChunkWriter(query.segment, query.chunk_bytes, query.max_result_bytes,
                             hand_over, self._next_segment) as sink:
                rows = self.encoder.write(con, sql, query.params, query.format, sink,
                                          query.batch_rows, tally, shape_key(query))
                return protocol.Result(query.id, sink.segment, sink.position, rows,
                                       (time.perf_counter() - started) * 1000)
        except QueryError as exc:
            return protocol.Failure(query.id, exc.kind, exc.message)
        except duckdb.InterruptException:
            return protocol.Failure(query.id, Kind.TIMEOUT, "query interrupted")
        except (duckdb.InternalException, duckdb.FatalException) as exc:
            return self._internal(query, str(exc))
        except duckdb.OutOfMemoryException as exc:
            return protocol.Failure(query.id, Kind.OUT_OF_MEMORY,
                                    f"{exc} (this worker's memory_limit is "
                                    f"{read_settings(con, ['memory_limit'])['memory_limit']})")
        except duckdb.PermissionException as exc:
            return protocol.Failure(query.id, Kind.FORBIDDEN, str(exc))
        except (duckdb.CatalogException, duckdb.BinderException) as exc:
            if query.databases is not None and self.instances.outside_scope(query.sql, exc):
                return protocol.Failure(query.id, Kind.FORBIDDEN,
                                        f"this token may read only the databases "
                                        f"{', '.join(query.databases)}: {exc}")
            return protocol.Failure(query.id, Kind.SQL_ERROR, self._no_such_table(con, exc))
        except duckdb.Error as exc:  # IO errors of a vanished file are FILE_MISSING: re-planned
            return protocol.Failure(query.id, duckdb_kind(str(exc)) or Kind.SQL_ERROR, str(exc))
        except pa.ArrowNotImplementedError as exc:
            return protocol.Failure(query.id, Kind.BAD_REQUEST,
                                    f"format {query.format!r} cannot encode this result: {exc}")
        except Exception as exc:  # a bug here must not take the worker down with it
            if self._interrupted == query.id:
                # DuckDB's interrupt can surface through pyarrow's batch reader as an OSError.
                return protocol.Failure(query.id, Kind.TIMEOUT,
                                        "query interrupted: it ran past its deadline")
            # DuckDB's errors found mid-result surface through pyarrow's reader as OSError,
            # known by their text only.
            kind = duckdb_kind(str(exc)) if isinstance(exc, OSError) else None
            if kind == Kind.INTERNAL:
                return self._internal(query, str(exc))
            if kind == Kind.OUT_OF_MEMORY and con is not None:
                limit = read_settings(con, ["memory_limit"])["memory_limit"]
                return protocol.Failure(query.id, kind,
                                        f"{exc} (this worker's memory_limit is {limit})")
            if kind is not None:
                return protocol.Failure(query.id, kind, str(exc))
            log.error("query_failed", exc_info=True, query_id=query.id)  # a bug of ours
            return protocol.Failure(query.id, Kind.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            self.progress.disarm()
            with self._lock:
                self._running = None

    def _internal(self, query: protocol.Query, text: str) -> protocol.Failure:
        self.broken = True
        log.error("duckdb_internal_error", query_id=query.id, error=self.redact(text))
        return protocol.Failure(query.id, Kind.INTERNAL, f"internal error: {first_line(text)}")


def shape_key(query: protocol.Query) -> tuple:
    """What decides a statement's result types: its text, the files it reads (not the instant
    now() was fixed at), its parameters and the databases it may see."""
    files = tuple(tuple(v) for v in query.fills.values() if isinstance(v, list)) \
        if query.fills else ()
    params = msgspec.msgpack.encode(query.params) if query.params else b""
    scope = None if query.databases is None else tuple(query.databases)
    return query.sql, files, params, scope


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
    # DuckDB accepts expressions 1,000 deep; the policy decodes their syntax tree, which is
    # about 2.5 times as deep as JSON (the C decoder's frames are small).
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    os.umask(0o077)  # DuckDB's temp files and directories are this user's alone
    # The supervisor decides when workers stop (a terminal's Ctrl-C or Ctrl-\ reaches us too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    fleet_stopping = threading.Event()
    signal.signal(signal.SIGUSR2, lambda *_: fleet_stopping.set())
    runtime = Path(args.runtime_dir)
    cfg = config_mod.decode((runtime / "config.json").read_bytes())
    global log
    log = log_mod.setup(f"worker-{args.id}", cfg.server.log_level, cfg.server.log_file)
    signal.signal(signal.SIGUSR1, lambda *_: log_mod.reopen(cfg.server.log_file))

    # Resolved: DuckDB compares real paths with allowed_directories.
    temp_root = runtime.resolve() / f"tmp-worker-{args.id}-{os.getpid()}"
    def reopen(evolved: set[str] | None = None) -> Instances:
        return Instances.open(cfg, args.memory_limit, temp_root, evolved)
    try:
        instances = reopen()
        settings = {**read_settings(instances.full, ["threads", "memory_limit", "temp_directory",
                                                     "TimeZone"]),
                    **sandbox.read(instances.full)}
        sock = connect_gateway(str(runtime / "workers.sock"), cfg.workers.boot_timeout_s)
    except Exception as exc:
        log.error("worker_boot_failed", worker=args.id, error=str(exc))
        return BOOT_FAILED
    malloc_trim()
    worker = Worker(args.id, cfg, instances, sock, reopen, args.status_fd,
                    Redactor(cfg.catalog.data_dir, str(runtime)), fleet_stopping)
    signal.signal(signal.SIGTERM, lambda *_: worker.leave())
    log.info("ready", process="worker", slot=args.id, **settings)
    while True:
        worker.send(protocol.Hello(args.id, os.getpid(), args.memory_limit))
        threading.Thread(target=worker.read_loop, name="socket-reader", daemon=True).start()
        worker.serve()
        worker.sock.close()
        if worker.leaving or fleet_stopping.is_set():
            break
        # The gateway went away (it is being replaced): keep DuckDB warm and rejoin the new one.
        log.warning("gateway_lost", worker=args.id)
        try:
            worker.sock = connect_gateway(str(runtime / "workers.sock"), cfg.workers.boot_timeout_s,
                                          give_up=lambda: worker.leaving)
        except OSError:
            break
    worker.instances.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
