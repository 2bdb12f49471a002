"""What the supervisor does once, before it spawns anything: check the token file, sweep what
dead fleets left, bind the listening sockets (and hold the Flight port), write the demo data
where asked, build the file index. Each step raises (ConfigError, OSError, CalledProcessError)
rather than start a fleet that cannot serve; engine/supervisor.py turns that into a clear
`cannot_start` and exit 2. The demo data and the index are written by child processes: the
supervisor never imports DuckDB (it starts threads) and keeps its own memory small.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from engine import catalog, config as config_mod, log as log_mod, shm, tokens

RUNTIME_PREFIX = "duckfleet-"
log = log_mod.get()


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
    listeners = [socket.create_server((server.host, server.port), backlog=1024)]
    if server.unix_socket:
        path = Path(server.unix_socket)
        path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket file is created 0600: only this user connects
        try:
            listeners.append(socket.create_server(str(path), family=socket.AF_UNIX, backlog=1024))
        finally:
            os.umask(old_umask)
        # Widened only now, if asked: a dashboard of another user in the socket's group.
        os.chmod(path, int(server.unix_socket_mode, 8))
    for listener in listeners:
        listener.set_inheritable(True)
    return listeners


def reserve_flight_port(cfg: config_mod.Config) -> socket.socket | None:
    """Hold [flight]'s port for the gateway's gRPC server (port 0: a free one, which the
    gateway is told on its command line).

    gRPC (as pyarrow builds it) binds its own socket and cannot adopt a listening one, and it
    binds with SO_REUSEADDR but without SO_REUSEPORT. So the supervisor binds the address with
    SO_REUSEADDR and never listens on it: gRPC can bind beside it (Linux allows that while
    neither listens), anything binding without SO_REUSEADDR is refused, and while gRPC listens
    no one else can bind at all. A replaced gateway binds the same port again. Between a
    gateway's death and its replacement's start, Flight connections are refused (HTTP's are
    queued: the supervisor listens for it)."""
    flight = cfg.flight
    if not flight.enabled:
        return None
    if flight.tls_cert:  # checked here: a gateway that cannot load them would die at every start
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(flight.tls_cert, flight.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise config_mod.ConfigError(f"flight.tls_cert, flight.tls_key: {exc}") from None
    host = flight.host or cfg.server.host
    family, kind, proto, _, address = socket.getaddrinfo(host, flight.port,
                                                         type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise config_mod.ConfigError(f"flight.port: cannot bind {host}:{flight.port}: {exc}") from None
    return sock


def sweep_dead_runtime_dirs(base: Path) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    for path in base.glob(f"{RUNTIME_PREFIX}*-*"):
        pid_text = path.name[len(RUNTIME_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not shm.pid_alive(int(pid_text)) and path.owner() == me:
            shutil.rmtree(path, ignore_errors=True)


def ensure_demo_data(catalog_cfg: config_mod.CatalogConfig, asked: bool) -> None:
    """The demo dataset goes only where asked for (--demo), or into the configured data_dir
    when `demo = true` and it does not exist yet; an empty directory is served empty."""
    if config_mod.is_remote(catalog_cfg.data_dir):
        return  # object storage is written by others; an empty prefix is served empty
    data_dir = Path(catalog_cfg.data_dir)
    if catalog.databases(data_dir):
        return
    if not asked and (data_dir.exists() or not catalog_cfg.demo):
        log.warning("data_dir_empty", data_dir=str(data_dir),
                    hint="no <database>/<measurement>/**/*.parquet yet: tables appear as files "
                         "arrive (python -m engine.supervisor --demo writes a demo dataset)")
        return
    log.info("writing_demo_data", data_dir=catalog_cfg.data_dir)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "engine.demo", catalog_cfg.data_dir], check=True,
                   stdout=subprocess.DEVNULL)
    log.info("demo_data_written", seconds=round(time.monotonic() - started, 2))


def build_index(cfg: config_mod.Config) -> None:
    """The file index, before anything serves: read in a child (pyarrow, no DuckDB here),
    which logs progress and writes the index file the gateway then loads."""
    subprocess.run([sys.executable, "-m", "engine.index"], check=True,
                   input=config_mod.encode(cfg))
