"""The gateway's shared-memory segments (engine/shm.py names them): created, lent, unlinked.

Event-loop only. Every segment is chunk_bytes long, its pages allocated at creation
(posix_fallocate) so a worker writes at memcpy speed instead of paying for fresh tmpfs pages.
The pool bounds the segments in existence by `budget_bytes` (a request for one waits, in
arrival order, for room: back-pressure, never failure), keeps at most `idle_bytes` of free
ones for reuse, and allocates `prealloc` of them at start. The cache may keep a lent segment
(`detach`), outside the budget, and give it back later (`reclaim`).
"""

from __future__ import annotations

import mmap
import os
import secrets

from engine.shm import SHM_DIR
from gateway.waiters import Waiters


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
        """Unlink and unmap; again is a no-op (a job may give back a segment after close)."""
        if self.fd < 0:
            return
        (SHM_DIR / self.name).unlink(missing_ok=True)
        self.view.release()
        try:
            self._map.close()
        except BufferError:  # a slice is still referenced by a dead connection; GC unmaps it
            pass
        os.close(self.fd)
        self.fd = -1


class SegmentPool:
    def __init__(self, prefix: str, chunk_bytes: int, budget_bytes: int, idle_bytes: int):
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        self.limit = max(1, budget_bytes // chunk_bytes)
        self.idle_limit = idle_bytes // chunk_bytes
        self._idle: list[Segment] = []
        self._lent: set[Segment] = set()
        self._waiters: Waiters[Segment] = Waiters(self.release)
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
        return self._waiters.count()

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
        """A segment, waiting (behind earlier waiters) for one when the budget is used up."""
        segment = self.try_acquire() if not self._waiters else None
        if segment is not None:
            return segment
        return await self._waiters.wait()

    def release(self, segment: Segment) -> None:
        if segment.fd < 0:
            return  # the pool was closed under its borrower
        if self._waiters.hand(segment):
            return  # stays lent, to its new borrower
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
        self._waiters.cancel_all()

    def _create(self) -> Segment:
        self.created += 1
        return Segment(f"{self.prefix}{secrets.token_hex(12)}", self.chunk_bytes)
