"""Spill files: where a streamed result waits on disk for a slow client, so its worker moves on.

Runs on the gateway's event loop. `Spills` (one per gateway) owns the directory
<runtime>/spill (0700; emptied at start, so a replaced gateway's files go) and counts the bytes
of every file in it against results.spill_max_mb. A job whose client has stream_buffer_mb of
its result unsent in memory writes further pieces to its own `Spill` file instead of making
its worker wait: each piece is copied from its segment by one of the spill threads (the loop
never waits on the disk), the segment goes back to the pool once copied, and the caller reads
the piece back, a slice at a time in the same threads, as its client takes it. No thread ever
waits on a slow client's socket, and the spill threads serve nothing else, so a slow reader
cannot hold up another result's spilling. A piece that finds no room in the budget stays in
memory, which is back-pressure on the worker as before spilling existed.

A spill file is unlinked when its job is closed (result sent, query failed, or client gone);
its descriptor is closed and its bytes uncounted once no copy or read of it is running.
Failure: a copy or read that fails (disk full) fails the piece; the caller aborts the stream
as for any error midway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import shutil
from pathlib import Path

from engine import log as log_mod
from gateway.segments import Segment

log = log_mod.get()
THREADS = 2  # spill copies and reads; the disk, not the CPU, is what they wait on


class Spills:
    def __init__(self, directory: Path, budget_bytes: int):
        self.directory = directory
        self.budget = budget_bytes
        self.used = 0     # bytes in spill files now
        self.files = 0    # spill files open now
        self.written = 0  # bytes ever spilled
        self._names = itertools.count(1)
        self.executor = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="spill")

    def prepare(self) -> None:
        """Start with an empty directory: files of a gateway that died are of no use."""
        if self.budget:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(mode=0o700, parents=True)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def has_room(self, nbytes: int) -> bool:
        return self.budget > 0 and self.used + nbytes <= self.budget

    def open(self) -> Spill:
        return Spill(self, self.directory / f"result-{next(self._names)}")

    def stats(self) -> dict:
        return {"spill_files": self.files, "spill_bytes": self.used,
                "spill_bytes_total": self.written}


class Piece:
    """`length` bytes of a result at `offset` in a spill file; `copied` is done once they are."""

    __slots__ = ("spill", "offset", "length", "copied")

    def __init__(self, spill: Spill, offset: int, length: int, copied: asyncio.Future):
        self.spill = spill
        self.offset = offset
        self.length = length
        self.copied = copied

    async def read(self, offset: int, nbytes: int) -> bytes:
        """nbytes of this piece from offset (within the piece), read in a spill thread."""
        return await self.spill.run(os.pread, self.spill.fd, nbytes, self.offset + offset)


class Spill:
    """One result's spill file, appended to in order."""

    def __init__(self, spills: Spills, path: Path):
        self.spills = spills
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.size = 0
        self._busy = 0  # copies into the file and reads from it, running in spill threads
        self._closed = False
        spills.files += 1

    def append(self, segment: Segment, length: int, on_copied) -> Piece:
        """Copy segment[:length] to the end of the file in a thread; on_copied(segment) runs on
        the loop when the segment is no longer read (copied or failed)."""
        offset, self.size = self.size, self.size + length
        self.spills.used += length
        self.spills.written += length
        copied = self._submit(_copy, self.fd, segment.view, offset, length)
        copied.add_done_callback(lambda _: on_copied(segment))
        return Piece(self, offset, length, copied)

    async def run(self, fn, *args):
        """fn(*args) in a spill thread; the descriptor stays open until it returns, even if
        the caller is cancelled meanwhile."""
        return await asyncio.shield(self._submit(fn, *args))

    def _submit(self, fn, *args) -> asyncio.Future:
        self._busy += 1
        future = asyncio.get_running_loop().run_in_executor(self.spills.executor, fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _) -> None:
        self._busy -= 1
        if self._closed and not self._busy:
            self._finish()

    def close(self) -> None:
        """Unlink now; the descriptor closes once no copy into it is running."""
        if self._closed:
            return
        self._closed = True
        self.path.unlink(missing_ok=True)
        if not self._busy:
            self._finish()

    def _finish(self) -> None:
        os.close(self.fd)
        self.spills.used -= self.size
        self.spills.files -= 1


def _copy(fd: int, view: memoryview, offset: int, length: int) -> None:
    done = 0
    while done < length:
        done += os.pwrite(fd, view[done:length], offset + done)
