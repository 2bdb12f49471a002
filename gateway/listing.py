"""Changes under an object-storage data_dir: the prefix listed every `catalog.refresh_s`.

Object stores have no inotify. The gateway's catalog (gateway/catalog.py) uses this in place
of gateway/watch.py, with the same interface: a task on the event loop lists the prefix (one
paged LIST, in a thread of its own so neither the loop nor the planning thread waits on the
network), compares each object's size and modification time with the previous listing, and
reports the relative paths that appeared, vanished or changed. The catalog then applies the
listing itself (`latest`) to the file index, and the result cache drops the entries of exactly
those tables, as it does for inotify's reports. So a node sees a new or deleted object at most
refresh_s (plus one listing's time) after the store does; with the cache on, ttl_seconds
bounds staleness too.

A listing that fails (the store unreachable, credentials refused) changes nothing: the last
good listing stays, `failed` says why (GET /api/v1/stats/connections shows `watching: false`),
and the next tick tries again; a `listing_failed` warning is logged once per outage.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from engine import log as log_mod
from engine.index import Listing
from engine.objectstore import Store

log = log_mod.get()


class ListingWatcher:
    def __init__(self, store: Store, interval_s: float,
                 on_change: Callable[[set[str] | None], None]):
        """on_change(paths): relative paths that changed since the last listing."""
        self.store = store
        self.interval_s = interval_s
        self._on_change = on_change
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="listing")
        self._task: asyncio.Task | None = None
        self.latest: Listing | None = None  # the newest listing, for the index to apply
        self.listings = 0  # completed listings (observable: tests wait on it)
        self.failed: str | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

    def poll(self) -> None:
        """Nothing to drain: reports come from the task."""

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                listing = await loop.run_in_executor(self._thread, self.store.list)
            except OSError as exc:
                if self.failed is None:
                    log.warning("listing_failed", data_dir=self.store.data_dir, error=str(exc)[:300],
                                hint="the last listing stays; cached results live until ttl_seconds")
                self.failed = str(exc)[:300]
            else:
                if self.failed is not None:
                    log.info("listing_recovered", data_dir=self.store.data_dir)
                self.failed = None
                self._compare(listing)
            await asyncio.sleep(self.interval_s)

    def _compare(self, listing: Listing) -> None:
        old = self.latest or {}
        changed = {rel for rel, facts in listing.items() if old.get(rel) != facts}
        changed |= old.keys() - listing.keys()
        self.latest = listing
        self.listings += 1
        if changed:
            self._on_change(changed)
