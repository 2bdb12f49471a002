"""The gateway process: aiohttp on uvloop, started by the supervisor (`python -m gateway.app`).

It serves HTTP on listening sockets the supervisor owns and passes down (so a gateway restart
never closes them), Arrow Flight SQL (gateway/flight/, gRPC threads) on the port the supervisor
holds for it, and accepts worker connections on <runtime>/workers.sock. It owns every
shared-memory segment (gateway/segments.py). Signals, from the supervisor (engine/stopping.py):
SIGUSR2 drain (readiness answers 503, the rest is served as before); SIGTERM graceful stop:
stop accepting, let in-flight requests finish within shutdown_grace_s, answer what is left
503 (gateway/lifecycle.py), unlink all segments, exit; SIGQUIT quick stop: the same without
waiting. SIGTERM is also what it gets when the supervisor dies, so segments are cleaned up
then too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import threading
from pathlib import Path

import prometheus_client
import uvloop
from aiohttp import web

from engine import config as config_mod, log as log_mod, shm
from engine.process import die_with_parent
from gateway import access, auth, connections as connections_mod, handlers, ratelimit, render
from gateway.cache import QueryCache
from gateway.catalog import Catalog
from gateway.fleet import Fleet
from gateway.flight import server as flight_server
from gateway.flight.service import FlightService
from gateway.lifecycle import LIFECYCLE, Lifecycle
from gateway.metrics import Metrics
from gateway.segments import SegmentPool
from gateway.spill import Spills
from gateway.run import Runner
from gateway.streams import StreamSlots

CUT_MARGIN_S = 5.0  # after the grace, the time the requests cut have to answer and go
FD_SPARE = 256  # descriptors kept for everything but connections, segments and worker sockets


def make_app(fleet: Fleet, cfg: config_mod.Config, catalog: Catalog,
             cache: QueryCache | None = None,
             connections: connections_mod.Connections | None = None,
             lifecycle: Lifecycle | None = None) -> web.Application:
    """Middlewares, outermost first: observe (request id, access log, metrics), errors (JSON
    errors), the stop's bookkeeping, connection limits, auth (when enabled), rate limit (when
    enabled), the body's deadline; then the handler."""
    if connections is None:
        connections = make_connections(cfg, fleet.segments.limit)
    lifecycle = lifecycle or Lifecycle()
    middlewares = [access.observe, handlers.errors_middleware, lifecycle.middleware,
                   connections_mod.middleware(connections)]
    if cfg.auth.enabled:
        middlewares.append(auth.middleware(auth.TokenStore(cfg.auth.tokens_file)))
    if cfg.server.rate_limit_per_s > 0:
        middlewares.append(ratelimit.middleware(
            ratelimit.TokenBuckets(cfg.server.rate_limit_per_s, cfg.server.rate_limit_burst)))
    middlewares.append(connections_mod.body_middleware(connections))
    app = web.Application(client_max_size=cfg.server.max_body_kb * 1024, middlewares=middlewares)
    app[handlers.FLEET] = fleet
    app[handlers.CONFIG] = cfg
    app[handlers.CATALOG] = catalog
    app[handlers.CONNECTIONS] = connections
    app[LIFECYCLE] = lifecycle
    runner = app[handlers.RUNNER] = Runner(fleet, catalog, cache,
                                           StreamSlots(cfg.results.max_streams_per_client))
    app[render.MIN_SEND_BYTES] = cfg.results.min_send_kbps * 1000
    if cache is not None:
        app[handlers.CACHE] = cache
    app[access.METRICS] = Metrics(lambda: {**fleet.stats(), **runner.stats(),
                                           "connections": connections.stats()},
                                  cache.stats if cache else None)
    app[access.SLOW_QUERY_MS] = cfg.server.slow_query_ms
    app.on_response_prepare.append(access.add_request_id)
    app.on_response_prepare.append(lifecycle.on_response_prepare)
    app.add_routes(handlers.routes(cfg.server.console))
    return app


def make_connections(cfg: config_mod.Config, segments: int) -> connections_mod.Connections:
    """max_connections, lowered to what the open-file limit leaves (each connection is a
    descriptor; so are segments, worker sockets, logs and spill files: FD_SPARE and more)."""
    server = cfg.server
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - segments - 2 * cfg.worker_count - FD_SPARE - connections_mod.HEALTH_RESERVE
    limit = server.max_connections
    if room < limit:
        limit = max(1, room)
        log_mod.get().warning("fd_limit_low", fd_limit=soft, max_connections=server.max_connections,
                              lowered_to=limit, hint="raise the hard open-file limit (ulimit -Hn)")
    return connections_mod.Connections(limit, server.header_timeout_s, server.body_timeout_s)


def make_cache(cfg: config_mod.Config, segments: SegmentPool, catalog: Catalog) -> QueryCache:
    cache = QueryCache(cfg.query_cache, segments)
    catalog.listeners.append(cache.invalidate)
    cache.start()
    return cache


def read_worker_exits(loop: asyncio.AbstractEventLoop, fd: int, fleet: Fleet) -> None:
    """The supervisor's pipe: `exited <pid> <code>` a line, for every worker that ended."""
    os.set_blocking(fd, False)
    buffer = bytearray()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the supervisor is gone; we follow it
            loop.remove_reader(fd)
            os.close(fd)
            return
        buffer.extend(data)
        *lines, rest = buffer.split(b"\n")
        buffer[:] = rest
        for line in lines:
            word, _, args = line.decode().partition(" ")
            if word == "exited":
                pid, code = args.split()
                fleet.on_exit(int(pid), int(code))
    loop.add_reader(fd, readable)


async def serve(runtime: Path, supervisor_pid: int, listen_fds: list[int],
                events_fd: int = -1, flight_port: int | None = None) -> None:
    cfg = config_mod.decode((runtime / "config.json").read_bytes())
    log = log_mod.setup("gateway", cfg.server.log_level, cfg.server.log_file, libraries=("aiohttp",))
    logging.getLogger("aiohttp.server").addFilter(access.BadHttpFilter())
    shm_prefix = shm.owner_prefix(supervisor_pid, os.getpid())
    results, queue = cfg.results, cfg.queue
    segments = SegmentPool(shm_prefix, results.chunk_mb * 2**20, results.shm_budget_mb * 2**20,
                               results.shm_idle_mb * 2**20)
    segments.prealloc(results.shm_prealloc_mb * 2**20)
    spills = Spills(runtime / "spill", results.spill_max_mb * 2**20)
    spills.prepare()
    fleet = Fleet(segments, max_queue=queue.max_queue_size, queue_timeout=queue.queue_timeout_s,
                  query_timeout=queue.query_timeout_s, cancel_grace=queue.cancel_grace_s,
                  aging=queue.priority_aging_s, max_result_bytes=results.max_result_mb * 2**20,
                  batch_rows=results.batch_rows, stream_buffer=results.stream_buffer_mb * 2**20,
                  spills=spills if spills.budget else None, quarantine_s=queue.quarantine_s)
    catalog = Catalog(cfg.catalog, cfg.s3)
    await catalog.start()  # the supervisor built the index file: this loads and checks it
    cache = make_cache(cfg, segments, catalog) if cfg.query_cache.enabled else None
    worker_socket = runtime / "workers.sock"
    worker_socket.unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        worker_server = await asyncio.start_unix_server(fleet.accept, path=str(worker_socket))
    finally:
        os.umask(old_umask)

    # handler_cancellation: a client that disconnects cancels its request, wherever it is.
    # aiohttp's own shutdown timeout comes after ours (stop() below): it never cuts first.
    connections = make_connections(cfg, segments.limit)
    lifecycle = Lifecycle()
    app = make_app(fleet, cfg, catalog, cache, connections, lifecycle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=cfg.server.shutdown_grace_s + CUT_MARGIN_S,
                           handler_cancellation=True,
                           keepalive_timeout=cfg.server.keepalive_timeout_s)
    await runner.setup()
    for fd in listen_fds:
        sock = socket.socket(fileno=fd)
        await connections_mod.GuardedSite(runner, sock, connections, backlog=1024).start()
    stopping, quick = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    flight = None
    if flight_port is not None:  # the port the supervisor holds (engine/startup.py)
        service = FlightService(app[handlers.RUNNER], catalog, cfg.queue.default_priority, loop,
                                app[access.METRICS], cfg.server.slow_query_ms)
        flight = flight_server.start(cfg, flight_port, service, loop)
        log.info("flight_listening", port=flight.port, tls=bool(cfg.flight.tls_cert))
    if events_fd >= 0:
        read_worker_exits(loop, events_fd, fleet)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGQUIT, lambda: (quick.set(), stopping.set()))
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides

    def drain() -> None:
        lifecycle.draining = True
        log.info("draining")
    loop.add_signal_handler(signal.SIGUSR2, drain)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:  # SIGHUP from the supervisor: it rewrote config.json
        new = config_mod.decode((runtime / "config.json").read_bytes())
        task = asyncio.ensure_future(catalog.reconfigure(new.catalog, new.s3))
        reloads.add(task)
        task.add_done_callback(reloads.discard)
    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info("ready", process="gateway", listen_fds=listen_fds, auth=cfg.auth.enabled)
    await stopping.wait()
    closing = [stop(runner, lifecycle, quick, cfg.server.shutdown_grace_s)]
    if flight is not None:  # off the loop: its calls in flight need the loop to finish
        closing.append(loop.run_in_executor(None, flight.close))
    await asyncio.gather(*closing)
    worker_server.close()
    if cache is not None:
        cache.close()  # before the pool: its segments go back to it
    catalog.close()
    fleet.close()
    spills.close()
    worker_socket.unlink(missing_ok=True)
    log.info("gateway_stopped")


async def stop(runner: web.AppRunner, lifecycle: Lifecycle, quick: asyncio.Event,
               grace: float) -> None:
    """Stop listening and let in-flight requests finish, until the grace ends or a quick stop
    is asked for: then what is left is cut (answered 503 if it can still be)."""
    log = log_mod.get()
    log.info("gateway_stopping", quick=quick.is_set())
    cleanup = asyncio.ensure_future(runner.cleanup())
    hurry = asyncio.ensure_future(quick.wait())
    await asyncio.wait({cleanup, hurry}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    if not cleanup.done():
        log.info("requests_cut", requests=lifecycle.cut(), quick=quick.is_set())
    await cleanup
    hurry.cancel()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="duckfleet gateway (started by the supervisor)")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, action="append", default=[])
    parser.add_argument("--events-fd", type=int, default=-1)
    parser.add_argument("--flight-port", type=int, help="serve Flight SQL on this port")
    args = parser.parse_args(argv)
    die_with_parent(args.supervisor_pid, signal.SIGTERM)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it: a reload, not a stop
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # until serve() handles it: a drain, not a stop
    signal.signal(signal.SIGQUIT, lambda *_: os._exit(0))  # a quick stop before serve(): no core dump
    os.umask(0o077)  # nothing the gateway creates is for other users
    prometheus_client.disable_created_metrics()  # no *_created series: they only add noise
    # The planning thread walks parse trees as deep as DuckDB accepts (1,000 expressions, a
    # few thousand levels of JSON): room for that in recursion and in every thread's stack.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
    threading.stack_size(64 * 2**20)
    uvloop.run(serve(Path(args.runtime_dir), args.supervisor_pid, args.listen_fd, args.events_fd,
                     args.flight_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
