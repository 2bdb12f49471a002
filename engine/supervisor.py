"""The supervisor: `python -m engine.supervisor`, the parent of every duckfleet process.

It handles no requests. It parses the configuration once, sweeps what dead fleets left, makes
a private runtime directory (0700), binds the listening sockets (so the gateway can be
replaced without closing them), writes the demo data if needed, then spawns the gateway and
the workers by exec and owns the process table. One verb per step: spawn, reap, replace,
retire, kill, stop.

Each worker writes one line per event on its own pipe: `ready`, `busy <timeout>` / `idle`
(heartbeats from its work loop), `cancel` (deadline passed or client gone), `retire <reason>`
(a recycling limit was reached, or `internal_error`: it has stopped taking queries already). A
retiring worker keeps serving until its replacement is ready; only then is it told to leave
(SIGTERM), so capacity never dips. A worker silent past its deadline (the query's, or
cancel_grace_s + kill_grace_s after a cancel) is killed and replaced; one that exits
OVER_MEMORY (past its RSS cap) is replaced at once, without crash backoff. The gateway reads
`exited <pid> <code>` for each worker on a pipe of its own, to tell a query that crashed its
worker from a worker killed from outside (gateway/handlers.py).

Signals (handlers only queue them; the loop does the work), as Gunicorn's:
SIGTERM graceful stop (the gateway drains within shutdown_grace_s); SIGINT, SIGQUIT quick stop;
SIGHUP reload engine.toml, replace the workers one by one and have the gateway read [catalog]
again; SIGTTIN / SIGTTOU one worker more / fewer; SIGUSR1 reopen log files; SIGCHLD reap. Children die with the supervisor
(PR_SET_PDEATHSIG), and the next start sweeps their sockets and segments. Crashing workers are
respawned with exponential backoff, only for deaths outside a query: one that died running a
query is replaced at once, so queries that kill workers cannot hold the fleet below capacity.
A worker that cannot boot stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from engine import config as config_mod, log as log_mod, memory, shm
from engine.process import BOOT_FAILED, OVER_MEMORY, raise_fd_limit
from engine.startup import (RUNTIME_PREFIX, bind_listeners, build_index, check_tokens_file,
                            ensure_demo_data, reserve_flight_port, sweep_dead_runtime_dirs)

STABLE_S = 10.0  # a worker that lived this long resets its slot's crash count
QUICK_GRACE_S = 1.0
UNIX_PATH_MAX = 108  # sun_path, including its terminating NUL
log = log_mod.get()


@dataclass
class Child:
    role: str  # "gateway" or "worker"
    slot: int
    pid: int
    exited: asyncio.Future
    status_fd: int = -1
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    busy: bool = False             # running a query, as its last heartbeat said
    deadline: float = 0.0          # liveness: killed if silent past this (monotonic)
    leaving: str | None = None     # we asked it to leave, and why: a planned exit
    replaces: Child | None = None  # the retiring worker this one will replace
    replacement: Child | None = None
    buffer: bytes = b""


class Supervisor:
    def __init__(self, cfg: config_mod.Config, config_path: str | None, overrides: dict,
                 demo: bool = False):
        self.cfg = cfg
        self.demo = demo  # --demo: write the demo dataset into an empty data directory
        self.config_path = config_path
        self.overrides = overrides
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        self.slots: set[int] = set(range(cfg.worker_count))
        self.crashes: dict[int, int] = {}
        self.runtime: Path | None = None
        self.listeners: list[socket.socket] = []
        self.flight_socket: socket.socket | None = None  # holds [flight]'s port (engine/startup.py)
        self.memory_limit = 0
        self.stopping: str | None = None
        self.exit_code = 0
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._rolling: asyncio.Task | None = None
        self._gateway_events = -1  # write end of the gateway's pipe of worker exits

    # --- start-up ---

    def prepare(self) -> None:
        """Everything that can fail before a process is spawned."""
        plan = memory.plan(self.cfg)
        self.memory_limit = plan.worker_limit
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
                 runtime_dir=str(self.runtime), workers=self.cfg.worker_count,
                 fd_limit=fd_soft or None, fd_hard_limit=fd_hard or None,
                 memory_limit_bytes=self.memory_limit, memory_plan=plan.describe())
        ensure_demo_data(self.cfg.catalog, self.demo)
        build_index(self.cfg)

    def write_config(self) -> None:
        config_file = self.runtime / "config.json"
        config_file.touch(mode=0o600)
        config_file.write_bytes(config_mod.encode(self.cfg))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        self.spawn_gateway()
        for slot in sorted(self.slots):
            self.spawn_worker(slot)
        watchdog = asyncio.ensure_future(self.watch())
        while not self.stopping:
            self.handle(await self._signals.get())
        watchdog.cancel()
        if self._rolling is not None:
            self._rolling.cancel()
        await self.stop(quick=self.stopping == "quick")
        return self.exit_code

    def handle(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            self.reap()
        elif sig == signal.SIGTERM:
            self.stopping = "graceful"
        elif sig in (signal.SIGINT, signal.SIGQUIT):
            self.stopping = "quick"
        elif sig == signal.SIGHUP:
            if self._rolling is None or self._rolling.done():
                self._rolling = asyncio.ensure_future(self.reload())
            else:
                log.warning("reload_ignored", reason="a reload is in progress")
        elif sig == signal.SIGTTIN:
            self.scale(+1)
        elif sig == signal.SIGTTOU:
            self.scale(-1)
        elif sig == signal.SIGUSR1:
            log_mod.reopen(self.cfg.server.log_file)
            for child in self.children.values():
                _signal(child.pid, signal.SIGUSR1)
        if sig != signal.SIGCHLD:
            log.info("signal", signal=signal.Signals(sig).name)

    # --- spawn ---

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
            self._spawn("gateway", 0, args, pass_fds=[*fds, read_end])
        finally:
            os.close(read_end)

    def tell_gateway(self, line: str) -> None:
        try:
            os.write(self._gateway_events, (line + "\n").encode())
        except OSError:
            pass  # no gateway, or it is not reading: it then treats the exit as not proven

    def spawn_worker(self, slot: int, replaces: Child | None = None) -> Child:
        read_end, write_end = os.pipe()
        args = ["-m", "engine.worker", "--id", str(slot), "--runtime-dir", str(self.runtime),
                "--supervisor-pid", str(self.pid), "--memory-limit", str(self.memory_limit),
                "--status-fd", str(write_end)]
        try:
            child = self._spawn("worker", slot, args, pass_fds=[write_end])
        finally:
            os.close(write_end)
        child.status_fd = read_end
        child.deadline = time.monotonic() + self.cfg.workers.boot_timeout_s
        child.replaces = replaces
        if replaces is not None:
            replaces.replacement = child
        os.set_blocking(read_end, False)
        asyncio.get_running_loop().add_reader(read_end, self._on_status, child)
        return child

    def _spawn(self, role: str, slot: int, args: list[str], pass_fds=()) -> Child:
        process = subprocess.Popen([sys.executable, *args], pass_fds=pass_fds,
                                   stdin=subprocess.DEVNULL)
        process.returncode = 0  # we reap with waitpid ourselves; Popen must neither wait nor warn
        child = Child(role, slot, process.pid, asyncio.get_running_loop().create_future())
        self.children[child.pid] = child
        log.info("spawned", process=role, slot=slot, child_pid=child.pid)
        return child

    # --- what workers say ---

    def _on_status(self, child: Child) -> None:
        while child.status_fd >= 0:  # to the end: reap() reads what a dead worker said last
            try:
                data = os.read(child.status_fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_status(child)
                return
            self._on_lines(child, data)

    def _on_lines(self, child: Child, data: bytes) -> None:
        child.buffer += data
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            word, _, arg = line.decode().partition(" ")
            now = time.monotonic()
            if word in ("busy", "idle", "ready"):
                child.busy = word == "busy"
            if word == "idle":
                child.deadline = now + self.cfg.workers.heartbeat_timeout_s
            elif word == "busy":
                workers, queue = self.cfg.workers, self.cfg.queue
                child.deadline = now + float(arg) + queue.cancel_grace_s + workers.kill_grace_s
            elif word == "cancel" and child.deadline:
                # Without this, a query that ignores interrupts would hold its worker until its
                # original deadline (query_timeout_s, 300 s by default) after its client left.
                grace = self.cfg.queue.cancel_grace_s + self.cfg.workers.kill_grace_s
                child.deadline = min(child.deadline, now + grace)
            elif word == "ready":
                child.deadline = now + self.cfg.workers.heartbeat_timeout_s
                self.on_ready(child)
            elif word == "retire":
                self.on_retire(child, arg)

    def _close_status(self, child: Child) -> None:
        if child.status_fd >= 0:
            asyncio.get_running_loop().remove_reader(child.status_fd)
            os.close(child.status_fd)
            child.status_fd = -1

    def on_ready(self, child: Child) -> None:
        child.ready = True
        log.info("worker_ready", slot=child.slot, child_pid=child.pid)  # as the supervisor sees it
        old = child.replaces
        child.replaces = None
        if old is not None and old.pid in self.children:
            self.retire(old, old.leaving or "replaced")

    def on_retire(self, child: Child, reason: str) -> None:
        if self.stopping or child.replacement is not None or child.leaving:
            return
        child.leaving = reason
        log.info("recycling", slot=child.slot, child_pid=child.pid, reason=reason)
        self.spawn_worker(child.slot, replaces=child)

    def retire(self, child: Child, reason: str) -> None:
        """A planned exit: the worker says Bye, finishes what it was sent, and leaves."""
        child.leaving = reason
        _signal(child.pid, signal.SIGTERM)

    # --- reap and replace ---

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.status_fd >= 0:
                self._on_status(child)  # its last lines: a retire, or the query it was running
            self._close_status(child)
            code = os.waitstatus_to_exitcode(status)
            child.exited.set_result(code)
            if child.role == "worker":
                self.tell_gateway(f"exited {pid} {code}")
            how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}
            uptime = round(time.monotonic() - child.started, 3)
            if child.leaving and child.ready and code in (0, -signal.SIGTERM):
                log.info("exited", process=child.role, slot=child.slot, child_pid=pid,
                         uptime_s=uptime, planned=child.leaving, **how)
            elif self.stopping:
                log.info("exited", process=child.role, slot=child.slot, child_pid=pid,
                         uptime_s=uptime, **how)
            elif child.role == "worker" and code == OVER_MEMORY:
                log.warning("exited", process=child.role, slot=child.slot, child_pid=pid,
                            uptime_s=uptime, planned="out_of_memory", **how)
                self.crashes.pop(child.slot, None)  # the query's doing, not the slot's: no backoff
                self.replace(child, code)
            else:
                log.warning("crashed", process=child.role, slot=child.slot, child_pid=pid,
                            uptime_s=uptime, busy=child.busy, **how)
                self.replace(child, code)

    def replace(self, child: Child, code: int) -> None:
        if child.role == "gateway":
            shm.sweep(shm.owner_prefix(self.pid, child.pid))
            self.spawn_gateway()
            return
        if code == BOOT_FAILED:
            if self._rolling is not None and not self._rolling.done():
                log.error("reload_failed", reason="a new worker could not boot; old workers kept")
                self._rolling.cancel()
                if child.replaces is not None:
                    child.replaces.leaving = None
                    child.replaces.replacement = None
                return
            log.error("worker_cannot_boot", slot=child.slot,
                      hint="see the worker_boot_failed line above; stopping")
            self.exit_code = 1
            self.stopping = "graceful"
            self._signals.put_nowait(signal.SIGTERM)
            return
        if child.replacement is not None and child.replacement.pid in self.children:
            child.replacement.replaces = None  # it takes the slot now; nothing to add
            return
        if child.slot not in self.slots and child.replaces is None:
            return  # scaled down
        # Backoff is for a slot whose workers die on their own (at boot, or idle). One that
        # died running a query was killed by it (or for it, at its deadline): replaced at once.
        count = self.crashes.get(child.slot, 0) + (not child.busy)
        if time.monotonic() - child.started > STABLE_S:
            count = 1
        self.crashes[child.slot] = count
        delay = 0.0 if count <= 1 or child.busy else min(0.1 * 2 ** (count - 2),
                                                          self.cfg.workers.crash_backoff_max_s)
        if delay:
            log.warning("crash_backoff", slot=child.slot, consecutive=count, delay_s=delay)
        old = child.replaces if child.replaces is not None and child.replaces.pid in self.children else None
        asyncio.get_running_loop().call_later(delay, self._respawn, child.slot, old)

    def _respawn(self, slot: int, replaces: Child | None) -> None:
        if not self.stopping and (slot in self.slots or replaces is not None):
            self.spawn_worker(slot, replaces)

    # --- liveness ---

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for child in list(self.children.values()):
                if child.role == "worker" and child.deadline and now > child.deadline:
                    log.warning("worker_unresponsive", slot=child.slot, child_pid=child.pid,
                                ready=child.ready)
                    child.deadline = 0.0
                    _signal(child.pid, signal.SIGKILL)

    # --- reload and scale ---

    async def reload(self) -> None:
        try:
            cfg = config_mod.load(self.config_path, overrides=self.overrides)
            plan = memory.plan(cfg)
        except config_mod.ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        fixed = [s for s in ("server", "queue", "results", "auth", "query_cache", "flight")
                 if getattr(cfg, s) != getattr(self.cfg, s)]
        if fixed:
            log.warning("reload_needs_restart", sections=fixed,
                        hint="these sections apply at the next start")
        cfg = msgspec.structs.replace(cfg, **{s: getattr(self.cfg, s) for s in fixed})
        self.cfg, self.memory_limit = cfg, plan.worker_limit
        self.write_config()
        for gateway in [c for c in self.children.values() if c.role == "gateway"]:
            _signal(gateway.pid, signal.SIGHUP)  # it reads [catalog] again
        log.info("reloading", workers=cfg.worker_count)
        for old in sorted(self._workers(), key=lambda c: c.slot):
            if old.slot >= cfg.worker_count:
                continue
            new = self.spawn_worker(old.slot, replaces=old)
            old.leaving = "reload"
            await asyncio.wait({old.exited, new.exited}, return_when=asyncio.FIRST_COMPLETED)
            if new.exited.done():
                log.error("reload_failed", reason="a new worker died before it was ready")
                return
        self.resize(cfg.worker_count)
        log.info("reloaded", workers=cfg.worker_count)

    def scale(self, step: int) -> None:
        self.resize(max(1, len(self.slots) + step))

    def resize(self, count: int) -> None:
        current = set(self.slots)
        self.slots = set(range(count))
        for slot in sorted(self.slots - current):
            self.spawn_worker(slot)
        for child in self._workers():
            if child.slot not in self.slots:
                self.retire(child, "scaled_down")
        log.info("workers", count=count)

    def _workers(self) -> list[Child]:
        return [c for c in self.children.values() if c.role == "worker" and not c.leaving]

    # --- stop ---

    async def stop(self, quick: bool = False) -> None:
        grace = QUICK_GRACE_S if quick else self.cfg.server.shutdown_grace_s
        gateways = [c for c in self.children.values() if c.role == "gateway"]
        await self._terminate(gateways, grace + (0 if quick else 2))
        workers = [c for c in self.children.values() if c.role == "worker"]
        await self._terminate(workers, grace)
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
        log.info("stopped", exit_code=self.exit_code, quick=quick)

    async def _terminate(self, children: list[Child], grace: float) -> None:
        for child in children:
            child.leaving = child.leaving or "stop"
            _signal(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(not c.exited.done() for c in children) and time.monotonic() < deadline:
            try:
                sig = await asyncio.wait_for(self._signals.get(), 0.1)
            except TimeoutError:
                sig = signal.SIGCHLD
            if sig == signal.SIGCHLD:
                self.reap()
        for child in children:
            if not child.exited.done():
                log.warning("killing", process=child.role, slot=child.slot, child_pid=child.pid)
                _signal(child.pid, signal.SIGKILL)
        while any(not c.exited.done() for c in children):
            await asyncio.sleep(0.01)
            self.reap()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(prog="python -m engine.supervisor",
                                     description="Start a duckfleet server: gateway and workers.")
    parser.add_argument("--config", help="engine.toml to read (default: ./engine.toml if present)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    parser.add_argument("--data-dir", help="catalog data directory (must exist)")
    parser.add_argument("--flight-port", type=int, help="Arrow Flight SQL port (0: any free one)")
    parser.add_argument("--demo", action="store_true",
                        help="write the demo dataset into the data directory if it holds none")
    args = parser.parse_args(argv)
    overrides: dict[str, dict] = {}
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    if data_dir and not args.demo and not Path(data_dir).is_dir():
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
