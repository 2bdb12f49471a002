"""Spill files: where a streamed result waits on disk for a slow client, so its worker moves on.

Runs on the gateway's event loop. `Spills` (one per gateway) owns the directory
<runtime>/spill (0700; emptied at start, so a replaced gateway's files go) and counts the bytes
of every file in it against results.spill_max_mb. A job whose client has stream_buffer_mb of
its result unsent in memory writes further pieces to its own `Spill` file instead of making
its worker wait: each piece is copied from its segment by a worker thread (the loop never
waits on the disk), the segment goes back to the pool once copied, and the caller sends the
piece from the file with sendfile. A piece that finds no room in the budget stays in memory,
which is back-pressure on the worker as before spilling existed.

A spill file is unlinked, and its bytes uncounted, when its job is closed (result sent, query
failed, or client gone), once no copy into it is still running. Failure: a copy that fails
(disk full) fails the piece; the caller aborts the stream as for any error midway.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from pathlib import Path

from engine import log as log_mod
from engine.shm import Segment

log = log_mod.get()


class Spills:
    def __init__(self, directory: Path, budget_bytes: int):
        self.directory = directory
        self.budget = budget_bytes
        self.used = 0     # bytes in spill files now
        self.files = 0    # spill files open now
        self.written = 0  # bytes ever spilled
        self._names = itertools.count(1)

    def prepare(self) -> None:
        """Start with an empty directory: files of a gateway that died are of no use."""
        if self.budget:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(mode=0o700, parents=True)

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

    @property
    def fd(self) -> int:
        return self.spill.fd


class Spill:
    """One result's spill file, appended to in order."""

    def __init__(self, spills: Spills, path: Path):
        self.spills = spills
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.size = 0
        self._copying = 0
        self._closed = False
        spills.files += 1

    def append(self, segment: Segment, length: int, on_copied) -> Piece:
        """Copy segment[:length] to the end of the file in a thread; on_copied(segment) runs on
        the loop when the segment is no longer read (copied or failed)."""
        offset, self.size = self.size, self.size + length
        self.spills.used += length
        self.spills.written += length
        self._copying += 1
        loop = asyncio.get_running_loop()
        copied = loop.run_in_executor(None, _copy, self.fd, segment.view, offset, length)

        def done(_):
            self._copying -= 1
            on_copied(segment)
            if self._closed and not self._copying:
                self._finish()
        copied.add_done_callback(done)
        return Piece(self, offset, length, copied)

    def close(self) -> None:
        """Unlink now; the descriptor closes once no copy into it is running."""
        if self._closed:
            return
        self._closed = True
        self.path.unlink(missing_ok=True)
        if not self._copying:
            self._finish()

    def _finish(self) -> None:
        os.close(self.fd)
        self.spills.used -= self.size
        self.spills.files -= 1


def _copy(fd: int, view: memoryview, offset: int, length: int) -> None:
    done = 0
    while done < length:
        done += os.pwrite(fd, view[done:length], offset + done)
