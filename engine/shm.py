"""Shared-memory result segments: fixed-size files in /dev/shm (what shm_open creates on Linux).

Ownership: the gateway creates every segment (mode 0600, unguessable name), lends segments
to a worker for one query, sends their bytes to the client, and is the only process that
unlinks one. A worker only opens segments it was lent and writes them from offset 0; it never
creates or unlinks one, so a worker crash cannot leak a segment.

Every segment is `chunk_bytes` long and its pages are allocated when it is created
(posix_fallocate), so a result is written at memcpy speed instead of paying for fresh tmpfs
pages (about 1 GB/s here); a result larger than a segment is written as a sequence of them.
The pool bounds the segments in existence by `budget_bytes` (a request for one waits for
room: back-pressure, never failure), keeps at most `idle_bytes` of free ones for reuse, and
allocates `prealloc_bytes` of them at start.

Names are duckfleet.<supervisor pid>.<gateway pid>.<random>: a supervisor sweeps the names of a
gateway that died, and at start the names of fleets whose supervisor is gone.
"""

from __future__ import annotations

import asyncio
import collections
import io
import mmap
import os
import secrets
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


class Segment:
    """One segment, with a read-only mapping the gateway keeps for the segment's life."""

    __slots__ = ("name", "fd", "_map", "view")

    def __init__(self, name: str, size: int):
        self.name = name
        self.fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.posix_fallocate(self.fd, 0, size)
        self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.view = memoryview(self._map)

    def destroy(self) -> None:
        (SHM_DIR / self.name).unlink(missing_ok=True)
        self.view.release()
        try:
            self._map.close()
        except BufferError:  # a slice is still referenced by a dead connection; GC unmaps it
            pass
        os.close(self.fd)


class SegmentPool:
    """The gateway's segments: lends them, takes them back, unlinks them. Event-loop only."""

    def __init__(self, prefix: str, chunk_bytes: int, budget_bytes: int, idle_bytes: int):
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        self.limit = max(1, budget_bytes // chunk_bytes)
        self.idle_limit = idle_bytes // chunk_bytes
        self._idle: list[Segment] = []
        self._lent: set[Segment] = set()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.created = 0
        self.detached = 0  # kept by the cache, outside the budget

    @property
    def in_use(self) -> int:
        return len(self._lent)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    def prealloc(self, nbytes: int) -> None:
        for _ in range(min(nbytes // self.chunk_bytes, self.limit)):
            self._idle.append(self._create())

    def try_acquire(self) -> Segment | None:
        if self._idle:
            segment = self._idle.pop()  # the most recently used: its pages are warmest
        elif len(self._lent) < self.limit:
            segment = self._create()
        else:
            return None
        self._lent.add(segment)
        return segment

    async def acquire(self) -> Segment:
        """A segment, waiting for one to be released when the budget is used up."""
        segment = self.try_acquire() if not self.waiting else None
        if segment is not None:
            return segment
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    def release(self, segment: Segment) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(segment)  # stays lent, to its new borrower
                return
        self._lent.discard(segment)
        if len(self._idle) < self.idle_limit:
            self._idle.append(segment)
        else:
            segment.destroy()

    def detach(self, segment: Segment) -> None:
        """A lent segment leaves the pool's count: its borrower (the cache) keeps it."""
        self._lent.discard(segment)
        self.detached += 1

    def reclaim(self, segment: Segment) -> None:
        """A detached segment comes back: to a waiter or the idle list, or it is unlinked."""
        self.detached -= 1
        self._lent.add(segment)
        self.release(segment)

    def close(self) -> None:
        for segment in [*self._idle, *self._lent]:
            segment.destroy()
        self._idle.clear()
        self._lent.clear()
        for waiter in self._waiters:
            waiter.cancel()

    def _create(self) -> Segment:
        self.created += 1
        return Segment(f"{self.prefix}{secrets.token_hex(12)}", self.chunk_bytes)


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
