"""The supervisor: `python -m engine.supervisor`, the parent of every duckfleet process.

It handles no requests. It parses the configuration once, sweeps what dead fleets left, makes
a private runtime directory (0700), binds the listening sockets (so the gateway can be
replaced without closing them), writes the demo data if needed, then spawns the gateway and
the workers by exec and owns the process table (engine/children.py).

One loop, in gunicorn's arbiter manner: signal handlers and workers' status lines only queue
an event; each turn of the loop reaps what exited, kills what is silent past its deadline,
and then either reconciles the table with what is wanted (engine/reconcile.py: every slot
has one ready worker that is not on its way out) or advances the stop (engine/stopping.py).
Vocabulary, in code, log events and README alike:

- spawn: start a process; reap: collect one that exited (`exited`, or `crashed`);
- recycle: a worker asks to be replaced (a recycling limit, or `internal_error`);
- stale: a worker due for replacement: it asked to be recycled, or it was spawned under an
  older configuration (`reload`), or with a memory_limit over the current plan's share
  (`memory_plan`: more workers now divide an `auto` budget);
- retire: ask a worker to leave after its query (SIGTERM: it says Bye, finishes, exits);
- kill: SIGKILL (`worker_unresponsive` past a deadline, `killing` past a stop's grace).

A worker that dies on its own is replaced with exponential backoff per slot, only for deaths
outside a query: one that died running a query (or over its memory cap) is replaced at once,
so queries that kill workers cannot hold the fleet below capacity. A worker that cannot boot
stops the server, unless it was spawned by a reload: then the previous configuration is kept.
Children die with the supervisor (PR_SET_PDEATHSIG), and the next start sweeps their sockets
and segments. The gateway reads `exited <pid> <code>` for each worker on a pipe of its own, to
tell a query that crashed its worker from a worker killed from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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

import msgspec

from engine import config as config_mod, log as log_mod, memory, reconcile, shm
from engine.children import Child, close_status, read_status, signal_child, spawn, watch_status
from engine.process import BOOT_FAILED, OVER_MEMORY, raise_fd_limit
from engine.startup import (RUNTIME_PREFIX, bind_listeners, build_index, check_tokens_file,
                            ensure_demo_data, reserve_flight_port, sweep_dead_runtime_dirs)
from engine.stopping import Stop

STABLE_S = 10.0  # a worker that lived this long resets its slot's crash count
WATCH_S = 0.25  # the longest a turn waits for an event: deadlines are checked this often
UNIX_PATH_MAX = 108  # sun_path, including its terminating NUL
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
           signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
RESTART_SECTIONS = ("server", "queue", "results", "auth", "query_cache", "flight")  # not reloaded
log = log_mod.get()


@dataclass(frozen=True)
class Plan:
    """What the workers are spawned with: a configuration, its generation, a count and limit."""
    cfg: config_mod.Config
    generation: int
    count: int
    memory_limit: int


class Supervisor:
    def __init__(self, cfg: config_mod.Config, config_path: str | None, overrides: dict,
                 demo: bool = False):
        self.demo = demo  # --demo: write the demo dataset into an empty data directory
        self.config_path = config_path
        self.overrides = overrides
        self.pid = os.getpid()
        self.table: dict[int, Child] = {}
        self._generations = itertools.count()
        self.plan = Plan(cfg, next(self._generations), cfg.worker_count, 0)
        self.fallback: Plan | None = None  # the plan before a reload, until the reload is done
        self.crashes: dict[int, int] = {}  # consecutive crashes of each slot
        self.not_before: dict[int, float] = {}  # a slot in backoff spawns no earlier (monotonic)
        self.runtime: Path | None = None
        self.listeners: list[socket.socket] = []
        self.stop = Stop(self)
        self.flight_socket: socket.socket | None = None  # holds [flight]'s port (engine/startup.py)
        self.exit_code = 0
        self._events: asyncio.Queue[int | None] = asyncio.Queue()  # a signal, or None: look again
        self._gateway_events = -1  # write end of the gateway's pipe of worker exits

    @property
    def cfg(self) -> config_mod.Config:
        return self.plan.cfg

    # --- start-up ---

    def prepare(self) -> None:
        """Everything that can fail before a process is spawned."""
        plan = memory.plan(self.cfg)
        self.plan = Plan(self.cfg, self.plan.generation, self.plan.count, plan.worker_limit)
        if self.cfg.auth.enabled:
            check_tokens_file(self.cfg.auth.tokens_file)
        shm.sweep_dead_fleets()
        self.flight_socket = reserve_flight_port(self.cfg)
        base = Path(self.cfg.server.runtime_dir or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
        sweep_dead_runtime_dirs(base)
        self.runtime = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{self.pid}-", dir=base))
        socket_path = str(self.runtime / "workers.sock")
        if len(socket_path.encode()) >= UNIX_PATH_MAX:
            shutil.rmtree(self.runtime)
            raise config_mod.ConfigError(
                f"server.runtime_dir: {socket_path} is {len(socket_path.encode())} bytes, over the "
                f"{UNIX_PATH_MAX - 1} a Unix socket path may have; choose a shorter directory")
        self.write_config()
        # Before any child exists: they inherit it (the gateway holds a descriptor a connection).
        fd_soft, fd_hard = raise_fd_limit() if self.cfg.server.raise_fd_limit else (0, 0)
        self.listeners = bind_listeners(self.cfg.server)
        host, port = self.listeners[0].getsockname()[:2]
        log.info("listening", host=host, port=port, unix_socket=self.cfg.server.unix_socket or None,
                 flight_port=self.flight_socket.getsockname()[1] if self.flight_socket else None,
                 runtime_dir=str(self.runtime), workers=self.plan.count,
                 fd_limit=fd_soft or None, fd_hard_limit=fd_hard or None,
                 memory_limit_bytes=self.plan.memory_limit, memory_plan=plan.describe())
        ensure_demo_data(self.cfg.catalog, self.demo)
        build_index(self.cfg)

    def write_config(self) -> None:
        config_file = self.runtime / "config.json"
        config_file.touch(mode=0o600)
        config_file.write_bytes(config_mod.encode(self.cfg))

    # --- the loop ---

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._events.put_nowait, sig)
        while not self.stop.done:
            self.turn()
            try:
                event = await asyncio.wait_for(self._events.get(), self._wait_s())
            except TimeoutError:
                continue
            self.handle(event)
            while not self._events.empty():
                self.handle(self._events.get_nowait())
        self.close()
        return self.exit_code

    def turn(self) -> None:
        self.reap()
        self.watch()
        if self.stop.mode is not None:
            self.stop.advance()
        if self.stop.mode not in (None, "drain"):
            return  # stopping: nothing is spawned again (a drain still replaces lost workers)
        if self.stop.mode is None and self.gateway() is None:
            self.spawn_gateway()
        wanted = reconcile.turn(self.workers(), self.plan.count, self.stale, self.may_spawn)
        for child, reason in wanted.retire:
            self.retire(child, reason)
        for slot in wanted.spawn:
            self.spawn_worker(slot)
        if self.fallback is not None and self._reloaded():
            self.fallback = None
            log.info("reloaded", workers=self.plan.count, generation=self.plan.generation)

    def _wait_s(self) -> float:
        now = time.monotonic()
        soonest = min([WATCH_S, self.stop.deadline - now,
                       *(t - now for t in self.not_before.values() if t > now)])
        return max(soonest, 0.001)

    def handle(self, event: int | None) -> None:
        if event is None or event == signal.SIGCHLD:
            return  # the next turn reaps and reconciles
        log.info("signal", signal=signal.Signals(event).name)
        if event in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.stop.on_signal(event)
        elif self.stop.mode is not None:
            return  # no reload or scaling while stopping
        elif event == signal.SIGHUP:
            self.reload()
        elif event in (signal.SIGTTIN, signal.SIGTTOU):
            self.resize(max(1, self.plan.count + (1 if event == signal.SIGTTIN else -1)))
        elif event == signal.SIGUSR1:
            log_mod.reopen(self.cfg.server.log_file)
            for child in self.table.values():
                signal_child(child, signal.SIGUSR1)

    def wake(self) -> None:
        self._events.put_nowait(None)

    # --- the table ---

    def gateway(self) -> Child | None:
        return next((c for c in self.table.values() if c.role == "gateway"), None)

    def workers(self) -> list[Child]:
        return [c for c in self.table.values() if c.role == "worker"]

    def stale(self, child: Child) -> str | None:
        """Why this worker is due for replacement, or None."""
        if child.recycle:
            return child.recycle
        if child.generation != self.plan.generation:
            return "reload"
        if child.memory_limit > self.plan.memory_limit:  # over the share: the plan would not hold
            return "memory_plan"
        return None

    def may_spawn(self, slot: int) -> bool:
        return time.monotonic() >= self.not_before.get(slot, 0.0)

    def _reloaded(self) -> bool:
        """No worker of an older configuration is left, and every slot has a ready one."""
        workers = self.workers()
        ready = {w.slot for w in workers if w.ready and self.stale(w) is None}
        return (all(w.generation == self.plan.generation for w in workers)
                and ready >= set(range(self.plan.count)))

    # --- spawn, retire, kill ---

    def spawn_gateway(self) -> None:
        fds = [s.fileno() for s in self.listeners]
        if self._gateway_events >= 0:
            os.close(self._gateway_events)  # the old gateway's pipe
        read_end, self._gateway_events = os.pipe()
        os.set_blocking(self._gateway_events, False)  # a full pipe loses lines, never blocks us
        args = ["-m", "gateway.app", "--runtime-dir", str(self.runtime),
                "--supervisor-pid", str(self.pid), "--events-fd", str(read_end)]
        for fd in fds:
            args += ["--listen-fd", str(fd)]
        if self.flight_socket is not None:
            args += ["--flight-port", str(self.flight_socket.getsockname()[1])]
        try:
            self._add(spawn("gateway", 0, args, pass_fds=[*fds, read_end]))
        finally:
            os.close(read_end)

    def tell_gateway(self, line: str) -> None:
        try:
            os.write(self._gateway_events, (line + "\n").encode())
        except OSError:
            pass  # no gateway, or it is not reading: it then treats the exit as not proven

    def spawn_worker(self, slot: int) -> None:
        read_end, write_end = os.pipe()
        plan = self.plan
        args = ["-m", "engine.worker", "--id", str(slot), "--runtime-dir", str(self.runtime),
                "--supervisor-pid", str(self.pid), "--memory-limit", str(plan.memory_limit),
                "--status-fd", str(write_end)]
        try:
            child = spawn("worker", slot, args, pass_fds=[write_end])
        finally:
            os.close(write_end)
        child.generation, child.memory_limit = plan.generation, plan.memory_limit
        child.deadline = time.monotonic() + self.cfg.workers.boot_timeout_s
        watch_status(child, read_end, self._on_status)
        self._add(child)

    def _add(self, child: Child) -> None:
        self.table[child.pid] = child
        log.info("spawned", process=child.role, slot=child.slot, child_pid=child.pid,
                 **({"generation": child.generation, "memory_limit": child.memory_limit}
                    if child.role == "worker" else {}))

    def retire(self, child: Child, reason: str) -> None:
        """Ask a worker to leave after its query: it says Bye, finishes what it was sent, exits."""
        child.retired = reason
        log.info("retiring", slot=child.slot, child_pid=child.pid, reason=reason)
        signal_child(child, signal.SIGTERM)

    def watch(self) -> None:
        """Kill every worker silent past its deadline; reaping it brings a replacement."""
        now = time.monotonic()
        for child in self.workers():
            if child.deadline and now > child.deadline:
                log.warning("worker_unresponsive", slot=child.slot, child_pid=child.pid,
                            ready=child.ready)
                child.deadline = 0.0
                signal_child(child, signal.SIGKILL)

    # --- what workers say ---

    def _on_status(self, child: Child) -> None:
        if any([self.on_status(child, word, arg) for word, arg in read_status(child)]):
            self.wake()

    def on_status(self, child: Child, word: str, arg: str) -> bool:
        """One status line; True if the table's wanted state may have changed."""
        now = time.monotonic()
        workers, queue = self.cfg.workers, self.cfg.queue
        if word in ("busy", "idle", "ready"):
            child.busy = word == "busy"
        if word == "idle":
            child.deadline = now + workers.heartbeat_timeout_s
        elif word == "busy":
            child.deadline = now + float(arg) + queue.cancel_grace_s + workers.kill_grace_s
        elif word == "cancel" and child.deadline:
            # Without this, a query that ignores interrupts would hold its worker until its
            # original deadline (query_timeout_s, 300 s by default) after its client left.
            child.deadline = min(child.deadline, now + queue.cancel_grace_s + workers.kill_grace_s)
        elif word == "ready":
            child.deadline = now + workers.heartbeat_timeout_s
            child.ready = True
            log.info("worker_ready", slot=child.slot, child_pid=child.pid)  # as we see it
            return True
        elif word == "recycle" and child.recycle is None:
            child.recycle = arg
            log.info("recycling", slot=child.slot, child_pid=child.pid, reason=arg)
            return True
        return False

    # --- reap ---

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.table.pop(pid, None)
            if child is None:
                continue
            for word, arg in read_status(child):  # its last lines: a recycle, or a query
                self.on_status(child, word, arg)
            close_status(child)
            code = os.waitstatus_to_exitcode(status)
            if child.role == "worker":
                self.tell_gateway(f"exited {pid} {code}")
            else:
                shm.sweep(shm.owner_prefix(self.pid, child.pid))
            self.on_exit(child, code)

    def on_exit(self, child: Child, code: int) -> None:
        how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}
        fields = dict(process=child.role, slot=child.slot, child_pid=child.pid,
                      uptime_s=round(time.monotonic() - child.started, 3), **how)
        planned = child.retired or child.recycle
        if self.stop.mode not in (None, "drain"):
            log.info("exited", **fields)
        elif planned and code in (0, -signal.SIGTERM):
            log.info("exited", planned=planned, **fields)
        elif child.role == "worker" and code == OVER_MEMORY:
            log.warning("exited", planned="out_of_memory", **fields)
            self.crashes.pop(child.slot, None)  # the query's doing, not the slot's: no backoff
        elif child.role == "worker" and code == BOOT_FAILED:
            self.boot_failed(child)
        else:
            log.warning("crashed", busy=child.busy, **fields)
            if child.role == "worker":
                self.back_off(child)

    def back_off(self, child: Child) -> None:
        """Backoff is for a slot whose workers die on their own (at boot, or idle). One that
        died running a query was killed by it (or for it, at its deadline): replaced at once."""
        count = self.crashes.get(child.slot, 0) + (not child.busy)
        if time.monotonic() - child.started > STABLE_S:
            count = 1
        self.crashes[child.slot] = count
        if count > 1 and not child.busy:
            delay = min(0.1 * 2 ** (count - 2), self.cfg.workers.crash_backoff_max_s)
            log.warning("crash_backoff", slot=child.slot, consecutive=count, delay_s=delay)
            self.not_before[child.slot] = time.monotonic() + delay

    def boot_failed(self, child: Child) -> None:
        if child.generation != self.plan.generation:
            log.info("exited", process="worker", slot=child.slot, child_pid=child.pid,
                     exit_code=BOOT_FAILED, stale=self.stale(child))
        elif self.fallback is not None:
            log.error("reload_failed", reason="a new worker could not boot (see worker_boot_failed); "
                      "the previous configuration is kept")
            self.plan, self.fallback = self.fallback, None
            self._publish()
        else:
            log.error("worker_cannot_boot", slot=child.slot,
                      hint="see the worker_boot_failed line above; stopping")
            self.exit_code = 1
            self.stop.begin("graceful")

    # --- reload and resize: they change the plan; the turns replace the workers ---

    def reload(self) -> None:
        """SIGHUP: read engine.toml again and plan memory for it; every worker is stale then."""
        try:
            cfg = config_mod.load(self.config_path, overrides=self.overrides)
            plan = memory.plan(cfg)
        except config_mod.ConfigError as exc:
            log.error("reload_failed", error=str(exc), **_numbers(exc))
            return
        fixed = [s for s in RESTART_SECTIONS if getattr(cfg, s) != getattr(self.cfg, s)]
        if fixed:
            log.warning("reload_needs_restart", sections=fixed,
                        hint="these sections apply at the next start")
        cfg = msgspec.structs.replace(cfg, **{s: getattr(self.cfg, s) for s in fixed})
        self.fallback = self.fallback or self.plan  # the last plan known to boot
        self.plan = Plan(cfg, next(self._generations), cfg.worker_count, plan.worker_limit)
        self._publish()
        log.info("reloading", workers=self.plan.count, generation=self.plan.generation,
                 memory_limit_bytes=plan.worker_limit, memory_plan=plan.describe())

    def _publish(self) -> None:
        """Workers spawned from now on read this configuration; the gateway reads [catalog]."""
        self.write_config()
        gateway = self.gateway()
        if gateway is not None:
            signal_child(gateway, signal.SIGHUP)

    def resize(self, count: int) -> None:
        """SIGTTIN / SIGTTOU: plan memory for `count` workers, or refuse with the numbers."""
        try:
            plan = memory.plan(self.cfg, workers=count)
        except memory.PlanError as exc:
            log.warning("workers_refused", count=count, current=self.plan.count, error=str(exc),
                        **_numbers(exc))
            return
        self.plan = Plan(self.cfg, self.plan.generation, count, plan.worker_limit)
        log.info("workers", count=count, memory_limit_bytes=plan.worker_limit,
                 memory_plan=plan.describe())

    # --- the end ---

    def close(self) -> None:
        """After the stop: nothing of this fleet is left on the machine."""
        for listener in self.listeners:
            listener.close()
        if self.flight_socket is not None:
            self.flight_socket.close()
        if self.cfg.server.unix_socket:
            Path(self.cfg.server.unix_socket).unlink(missing_ok=True)
        shm.sweep(shm.fleet_prefix(self.pid))
        if self._gateway_events >= 0:
            os.close(self._gateway_events)
            self._gateway_events = -1
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)
        log.info("stopped", exit_code=self.exit_code, quick=self.stop.mode == "quick")


def _numbers(exc: Exception) -> dict:
    if isinstance(exc, memory.PlanError):
        return {"budget_bytes": exc.budget, "need_bytes": exc.need}
    return {}


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(prog="python -m engine.supervisor",
                                     description="Start a duckfleet server: gateway and workers.")
    parser.add_argument("--config", help="engine.toml to read (default: ./engine.toml if present)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    parser.add_argument("--data-dir", help="catalog data directory (must exist), or s3://bucket/prefix")
    parser.add_argument("--flight-port", type=int, help="Arrow Flight SQL port (0: any free one)")
    parser.add_argument("--demo", action="store_true",
                        help="write the demo dataset into the data directory if it holds none")
    args = parser.parse_args(argv)
    overrides: dict[str, dict] = {}
    data_dir = args.data_dir if args.data_dir and config_mod.is_remote(args.data_dir) else \
        str(Path(args.data_dir).resolve()) if args.data_dir else None
    if data_dir and not args.demo and not config_mod.is_remote(data_dir) and not Path(data_dir).is_dir():
        parser.exit(2, f"--data-dir: {data_dir} is not a directory (add --demo to create it "
                       "with the demo dataset)\n")
    for section, key, value in (("server", "host", args.host), ("server", "port", args.port),
                                ("workers", "count", args.workers),
                                ("flight", "port", args.flight_port),
                                ("catalog", "data_dir", data_dir)):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    path = args.config or ("engine.toml" if Path("engine.toml").exists() else None)
    global log
    log = log_mod.setup("supervisor")
    try:
        cfg = config_mod.load(path, overrides=overrides)
        log = log_mod.setup("supervisor", cfg.server.log_level, cfg.server.log_file)
        supervisor = Supervisor(cfg, path, overrides, args.demo)
        supervisor.prepare()
    except (config_mod.ConfigError, OSError, subprocess.CalledProcessError) as exc:
        log.error("cannot_start", error=str(exc))
        return 2
    return asyncio.run(supervisor.run())


if __name__ == "__main__":
    sys.exit(main())
