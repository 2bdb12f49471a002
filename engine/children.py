"""The rows of the supervisor's process table: one Child per process it spawned.

Runs in the supervisor's event loop only. spawn() starts a child by exec (never fork: DuckDB
starts threads) and returns its row; the supervisor (engine/supervisor.py) owns the table and
is the only one that changes a row. A worker writes one line per event on its status pipe
(engine/worker.py): `ready`, `busy <timeout_s>`, `idle`, `cancel`, `recycle <reason>`;
read_status() returns them as (word, argument) pairs, and closes the pipe at its end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class Child:
    role: str  # "gateway" or "worker"
    slot: int
    pid: int
    generation: int = 0    # the configuration it was spawned with (each reload is a new one)
    memory_limit: int = 0  # the DuckDB memory_limit it was given (the plan may change since)
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    busy: bool = False             # running a query, as its last heartbeat said
    deadline: float = 0.0          # liveness: killed if silent past this (monotonic); 0 = none
    recycle: str | None = None     # it asked to be replaced, and why (a limit, internal_error)
    retired: str | None = None     # the supervisor asked it to leave after its query, and why
    status_fd: int = -1
    buffer: bytes = b""


def spawn(role: str, slot: int, args: list[str], pass_fds=()) -> Child:
    process = subprocess.Popen([sys.executable, *args], pass_fds=pass_fds, stdin=subprocess.DEVNULL)
    process.returncode = 0  # we reap with waitpid ourselves; Popen must neither wait nor warn
    return Child(role, slot, process.pid)


def signal_child(child: Child, sig: int) -> None:
    try:
        os.kill(child.pid, sig)
    except ProcessLookupError:
        pass  # already gone; reaping will say how


def watch_status(child: Child, read_end: int, on_readable) -> None:
    """Hand the read end of a worker's status pipe to the loop: on_readable(child) when it has
    something."""
    child.status_fd = read_end
    os.set_blocking(read_end, False)
    asyncio.get_running_loop().add_reader(read_end, on_readable, child)


def read_status(child: Child) -> list[tuple[str, str]]:
    """Every whole line the worker has written so far; at the pipe's end, closes it."""
    lines: list[tuple[str, str]] = []
    while child.status_fd >= 0:  # to the end: a dead worker's last lines say what it was doing
        try:
            data = os.read(child.status_fd, 4096)
        except BlockingIOError:
            break
        except OSError:
            data = b""
        if not data:
            close_status(child)
            break
        child.buffer += data
        *whole, child.buffer = child.buffer.split(b"\n")
        for line in whole:
            word, _, arg = line.decode().partition(" ")
            lines.append((word, arg))
    return lines


def close_status(child: Child) -> None:
    if child.status_fd >= 0:
        asyncio.get_running_loop().remove_reader(child.status_fd)
        os.close(child.status_fd)
        child.status_fd = -1
