"""A fair queue of callers waiting for a resource: the segment pool's and the worker queue's.

Event-loop only. Waiters are served in key order (ties by arrival): the segment pool uses
arrival order, the admission queue arrival time + a priority's head start. A waiter handed a
resource just as it was cancelled (its client left, its deadline passed) gives the resource
back through `give_back`, so nothing is lost between the hand-over and the wake-up.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Waiters(Generic[T]):
    def __init__(self, give_back: Callable[[T], None]):
        self._give_back = give_back
        self._heap: list[tuple[float, int, asyncio.Future, str]] = []
        self._seq = itertools.count()

    def count(self, label: str | None = None) -> int:
        """Waiters still waiting (with this label, if given)."""
        return sum(not f.done() and label in (None, tag) for _, _, f, tag in self._heap)

    def __bool__(self) -> bool:
        return any(not f.done() for _, _, f, _ in self._heap)

    async def wait(self, key: float | None = None, label: str = "",
                   timeout: float | None = None) -> T:
        """The next resource handed over for this waiter; TimeoutError after timeout s."""
        seq = next(self._seq)
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (seq if key is None else key, seq, waiter, label))
        try:
            return await asyncio.wait_for(waiter, timeout) if timeout else await waiter
        except (asyncio.CancelledError, TimeoutError):
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())
            raise

    def hand(self, resource: T) -> bool:
        """To the first waiter still waiting; False if there is none (the caller keeps it)."""
        while self._heap:
            _, _, waiter, _ = heapq.heappop(self._heap)
            if not waiter.done():
                waiter.set_result(resource)
                return True
        return False

    def cancel_all(self) -> None:
        for _, _, waiter, _ in self._heap:
            waiter.cancel()
        self._heap.clear()
