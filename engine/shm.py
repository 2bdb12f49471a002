"""Shared-memory result segments: fixed-size files in /dev/shm (what shm_open creates on Linux).
This module is the contract both sides share: names, sweeping, and the worker's writer.

Ownership: the gateway creates every segment (mode 0600, unguessable name; gateway/segments.py),
lends segments to a worker for one query, sends their bytes to the client, and is the only
process that unlinks one. A worker only opens segments it was lent and writes them from offset
0 (ChunkWriter); it never creates or unlinks one, so a worker crash cannot leak a segment.

Every segment is `chunk_bytes` long and its pages are allocated when it is created
(posix_fallocate), so a result is written at memcpy speed instead of paying for fresh tmpfs
pages (about 1 GB/s here); a result larger than a segment is written as a sequence of them.
Names are duckfleet.<supervisor pid>.<gateway pid>.<random>: a supervisor sweeps the names of a
gateway that died, and at start the names of fleets whose supervisor is gone.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

from engine.errors import Kind, QueryError

SHM_DIR = Path("/dev/shm")
PREFIX = "duckfleet."


def fleet_prefix(supervisor_pid: int) -> str:
    return f"{PREFIX}{supervisor_pid}."


def owner_prefix(supervisor_pid: int, gateway_pid: int) -> str:
    return f"{fleet_prefix(supervisor_pid)}{gateway_pid}."


def sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with prefix; returns how many."""
    count = 0
    for path in SHM_DIR.glob(prefix + "*"):
        try:
            path.unlink()
            count += 1
        except FileNotFoundError:
            pass
    return count


def sweep_dead_fleets() -> int:
    """Unlink the segments of fleets whose supervisor no longer runs."""
    count = 0
    for path in SHM_DIR.glob(PREFIX + "*"):
        pid_text = path.name[len(PREFIX):].split(".", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            path.unlink(missing_ok=True)
            count += 1
    return count


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChunkWriter(io.RawIOBase):
    """Worker side: a write-only file over a sequence of lent segments.

    Writes fill the current segment from offset 0; when it is full, `hand_over(name, length)`
    passes it to the gateway and `next_segment()` blocks until another is granted. Raises
    QueryError(TOO_LARGE) past `limit` bytes in all.
    """

    def __init__(self, first: str, chunk_bytes: int, limit: int,
                 hand_over: Callable[[str, int], None], next_segment: Callable[[], str]):
        super().__init__()
        self._chunk = chunk_bytes
        self._limit = limit
        self._hand_over = hand_over
        self._next_segment = next_segment
        self.total = 0
        self._open(first)

    def _open(self, name: str) -> None:
        self.segment = name
        self.position = 0
        self._fd = os.open(SHM_DIR / name, os.O_WRONLY | os.O_CLOEXEC)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if self._limit and self.total + size > self._limit:
            raise QueryError(Kind.TOO_LARGE,
                             f"result is larger than max_result_mb ({self._limit // 2**20} MiB)")
        while view:
            if self.position == self._chunk:
                os.close(self._fd)
                self._fd = -1
                self._hand_over(self.segment, self.position)
                self._open(self._next_segment())
            written = os.pwrite(self._fd, view[:self._chunk - self.position], self.position)
            self.position += written
            view = view[written:]
        self.total += size
        return size

    def tell(self) -> int:
        return self.total

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()
