"""The supervisor: `python -m engine.supervisor`, the parent of every duckfleet process.

It handles no requests. It parses the configuration once, sweeps what dead fleets left, makes
a private runtime directory (0700), binds the listening sockets (so the gateway can be
replaced without closing them), writes the demo data if needed, then spawns the gateway and
the workers by exec and owns the process table: spawn, reap, replace, stop.

Signal handlers only queue the signal; the loop does the work. SIGCHLD: reap and replace.
SIGTERM / SIGINT: graceful stop: the gateway drains in-flight requests within
shutdown_grace_s, then the workers finish and exit; whatever remains is killed. Children die
with the supervisor (PR_SET_PDEATHSIG), and the next start sweeps their sockets and segments.
A worker that cannot boot (exit code BOOT_FAILED) stops the server instead of spinning.
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

from engine import catalog, config as config_mod, log as log_mod, memory, shm, tokens
from engine.process import BOOT_FAILED

RUNTIME_PREFIX = "duckfleet-"
log = log_mod.get()


@dataclass
class Child:
    role: str  # "gateway" or "worker"
    slot: int
    pid: int
    started: float = field(default_factory=time.monotonic)
    exited: asyncio.Future | None = None


class Supervisor:
    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        self.runtime: Path | None = None
        self.listeners: list[socket.socket] = []
        self.memory_limit = 0
        self.stopping = False
        self.exit_code = 0
        self._signals: asyncio.Queue[int] = asyncio.Queue()

    # --- start-up ---

    def prepare(self) -> None:
        """Everything that can fail before a process is spawned."""
        self.memory_limit = memory.worker_memory_limit(self.cfg)
        if self.cfg.auth.enabled:
            check_tokens_file(self.cfg.auth.tokens_file)
        shm.sweep_dead_fleets()
        base = Path(self.cfg.server.runtime_dir or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
        sweep_dead_runtime_dirs(base)
        self.runtime = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{self.pid}-", dir=base))
        config_file = self.runtime / "config.json"
        config_file.touch(mode=0o600)
        config_file.write_bytes(config_mod.encode(self.cfg))
        self.listeners = bind_listeners(self.cfg.server)
        host, port = self.listeners[0].getsockname()[:2]
        log.info("listening", host=host, port=port, unix_socket=self.cfg.server.unix_socket or None,
                 runtime_dir=str(self.runtime), workers=self.cfg.worker_count,
                 memory_limit_bytes=self.memory_limit)
        ensure_demo_data(self.cfg.catalog)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        self.spawn_gateway()
        for slot in range(self.cfg.worker_count):
            self.spawn_worker(slot)
        while not self.stopping:
            sig = await self._signals.get()
            if sig == signal.SIGCHLD:
                self.reap()
            else:
                log.info("stop_requested", signal=signal.Signals(sig).name)
                self.stopping = True
        await self.stop()
        return self.exit_code

    # --- lifecycle verbs ---

    def spawn_gateway(self) -> None:
        fds = [s.fileno() for s in self.listeners]
        args = ["-m", "gateway.app", "--runtime-dir", str(self.runtime),
                "--supervisor-pid", str(self.pid)]
        for fd in fds:
            args += ["--listen-fd", str(fd)]
        self._spawn("gateway", 0, args, pass_fds=fds)

    def spawn_worker(self, slot: int) -> None:
        self._spawn("worker", slot, ["-m", "engine.worker", "--id", str(slot),
                                     "--runtime-dir", str(self.runtime),
                                     "--supervisor-pid", str(self.pid),
                                     "--memory-limit", str(self.memory_limit)])

    def _spawn(self, role: str, slot: int, args: list[str], pass_fds=()) -> None:
        process = subprocess.Popen([sys.executable, *args], pass_fds=pass_fds,
                                   stdin=subprocess.DEVNULL)
        # We reap with waitpid ourselves; tell Popen so it neither waits nor warns.
        process.returncode = 0
        child = Child(role, slot, process.pid, exited=asyncio.get_running_loop().create_future())
        self.children[child.pid] = child
        log.info("spawned", process=role, slot=slot, child_pid=child.pid)

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
            code = os.waitstatus_to_exitcode(status)
            child.exited.set_result(code)
            how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}
            # A signal or an error code outside a stop is a crash; the rest are planned exits.
            crashed = code != 0 and not self.stopping
            (log.warning if crashed else log.info)(
                "crashed" if crashed else "exited", process=child.role, slot=child.slot,
                child_pid=pid, uptime_s=round(time.monotonic() - child.started, 3), **how)
            if not self.stopping:
                self.replace(child, code)

    def replace(self, child: Child, code: int) -> None:
        if child.role == "gateway":
            shm.sweep(shm.owner_prefix(self.pid, child.pid))
            self.spawn_gateway()
        elif code == BOOT_FAILED:
            log.error("worker_cannot_boot", slot=child.slot,
                      hint="see the worker_boot_failed line above; stopping")
            self.exit_code = 1
            self.stopping = True
            self._signals.put_nowait(signal.SIGTERM)
        else:
            self.spawn_worker(child.slot)

    async def stop(self) -> None:
        grace = self.cfg.server.shutdown_grace_s
        gateways = [c for c in self.children.values() if c.role == "gateway"]
        await self._terminate(gateways, grace + 2)  # the gateway drains in-flight requests
        workers = [c for c in self.children.values() if c.role == "worker"]
        await self._terminate(workers, grace)
        for listener in self.listeners:
            listener.close()
        if self.cfg.server.unix_socket:
            Path(self.cfg.server.unix_socket).unlink(missing_ok=True)
        shm.sweep(shm.fleet_prefix(self.pid))
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)
        log.info("stopped", exit_code=self.exit_code)

    async def _terminate(self, children: list[Child], grace: float) -> None:
        for child in children:
            _signal(child.pid, signal.SIGTERM)
        pending = [c.exited for c in children]
        deadline = time.monotonic() + grace
        while pending and time.monotonic() < deadline:
            try:
                sig = await asyncio.wait_for(self._signals.get(), 0.1)
            except TimeoutError:
                sig = signal.SIGCHLD
            if sig == signal.SIGCHLD:
                self.reap()
            pending = [f for f in pending if not f.done()]
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


def check_tokens_file(path: str) -> None:
    """With auth on, start only with a token file that parses (an empty one would lock all out)."""
    try:
        found = tokens.load(path)
    except tokens.TokenFileError as exc:
        raise config_mod.ConfigError(f"auth.tokens_file: {exc}") from None
    if not found:
        raise config_mod.ConfigError(f"auth.tokens_file: {path} holds no token; make one with "
                                     "`python -m engine.tokens create NAME`")


def bind_listeners(server: config_mod.ServerConfig) -> list[socket.socket]:
    listeners = [socket.create_server((server.host, server.port), backlog=1024, reuse_port=False)]
    if server.unix_socket:
        path = Path(server.unix_socket)
        path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket file is created 0600: only this user connects
        try:
            listeners.append(socket.create_server(str(path), family=socket.AF_UNIX, backlog=1024))
        finally:
            os.umask(old_umask)
    for listener in listeners:
        listener.set_inheritable(True)
    return listeners


def sweep_dead_runtime_dirs(base: Path) -> None:
    for path in base.glob(f"{RUNTIME_PREFIX}*-*"):
        pid_text = path.name[len(RUNTIME_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not shm._alive(int(pid_text)) and path.owner() == _user():
            shutil.rmtree(path, ignore_errors=True)


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


def ensure_demo_data(catalog_cfg: config_mod.CatalogConfig) -> None:
    if not catalog_cfg.demo or catalog.databases(catalog_cfg.data_dir):
        return
    log.info("writing_demo_data", data_dir=catalog_cfg.data_dir)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "engine.demo", catalog_cfg.data_dir], check=True,
                   stdout=subprocess.DEVNULL)
    log.info("demo_data_written", seconds=round(time.monotonic() - started, 2))


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(prog="python -m engine.supervisor",
                                     description="Start a duckfleet server: gateway and workers.")
    parser.add_argument("--config", help="engine.toml to read (default: ./engine.toml if present)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    parser.add_argument("--data-dir", help="catalog data directory")
    args = parser.parse_args(argv)
    overrides: dict[str, dict] = {}
    for section, key, value in (("server", "host", args.host), ("server", "port", args.port),
                                ("workers", "count", args.workers),
                                ("catalog", "data_dir", args.data_dir)):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.data_dir:
        overrides["catalog"]["data_dir"] = str(Path(args.data_dir).resolve())
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    path = args.config or ("engine.toml" if Path("engine.toml").exists() else None)
    global log
    log = log_mod.setup("supervisor")
    try:
        cfg = config_mod.load(path, overrides=overrides)
        log = log_mod.setup("supervisor", cfg.server.log_level)
        supervisor = Supervisor(cfg)
        supervisor.prepare()
    except (config_mod.ConfigError, OSError, subprocess.CalledProcessError) as exc:
        log.error("cannot_start", error=str(exc))
        return 2
    return asyncio.run(supervisor.run())


if __name__ == "__main__":
    sys.exit(main())
