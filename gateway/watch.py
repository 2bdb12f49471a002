"""Changes under data_dir: which files and directories came, went or changed.

One inotify watch per directory under data_dir (new directories are watched as they appear).
The kernel queues an event as a file operation completes, so `poll()`, a non-blocking read
called before every cache lookup, sees a file written before the request arrived: a new
Parquet file is visible to the very next query. The event loop also polls when the descriptor
turns readable, so entries die promptly even while no query comes.

Each poll reports the changed paths, relative to data_dir ('default/cpu/2025/11/01/00/x.parquet',
'default/new_table'), or None when the kernel's queue overflowed (everything may have changed).
Names starting with a dot (the index file, writers' temporary files) are neither watched nor
reported.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

from inotify_simple import INotify, flags

from engine import log as log_mod

log = log_mod.get()
MASK = (flags.CREATE | flags.DELETE | flags.MODIFY | flags.CLOSE_WRITE | flags.MOVED_FROM
        | flags.MOVED_TO | flags.ATTRIB | flags.DELETE_SELF | flags.MOVE_SELF)


class DataWatcher:
    def __init__(self, root: str, on_change: Callable[[set[str] | None], None]):
        """on_change(paths): relative paths that changed, or None for everything."""
        self.root = Path(root)
        self._on_change = on_change
        self._inotify = INotify(nonblocking=True)
        self._dirs: dict[int, tuple[str, ...]] = {}  # watch descriptor -> path parts under root
        self.failed: str | None = None  # why changes are not seen (the cache then relies on TTL)
        if not self.root.is_dir():
            self._fail(f"data_dir {root} is not a directory")
        self._watch_tree(self.root, ())

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self.poll)

    def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
        except RuntimeError:
            pass
        self._inotify.close()

    def poll(self) -> None:
        """Read every queued event; report the paths touched, or None for everything."""
        touched: set[str] | None = set()
        for event in self._inotify.read(timeout=0):
            if event.mask & flags.Q_OVERFLOW:
                touched = None
                continue
            parts = self._dirs.get(event.wd)
            if parts is None:
                continue
            if event.mask & flags.IGNORED:  # its directory is gone
                del self._dirs[event.wd]
                continue
            path = (*parts, event.name) if event.name else parts
            if not path or any(p.startswith(".") for p in path):
                continue
            if event.mask & flags.ISDIR and event.mask & (flags.CREATE | flags.MOVED_TO):
                self._watch_tree(self.root.joinpath(*path), path)
            if touched is not None:
                touched.add("/".join(path))
        if touched is None or touched:
            self._on_change(touched)

    def _watch_tree(self, directory: Path, parts: tuple[str, ...]) -> None:
        try:
            self._dirs[self._inotify.add_watch(directory, MASK)] = parts
            for entry in os.scandir(directory):
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    self._watch_tree(Path(entry.path), (*parts, entry.name))
        except FileNotFoundError:  # gone again before we looked
            pass
        except OSError as exc:  # out of inotify watches (fs.inotify.max_user_watches)
            self._fail(f"cannot watch {directory}: {exc}")

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.warning("cache_watch_failed", error=reason,
                        hint="cached results then live until ttl_seconds; "
                             "raise fs.inotify.max_user_watches if that is the cause")
