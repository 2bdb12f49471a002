"""The reconcile turn: what the supervisor must do so that every slot has one ready worker.

A pure function of the process table (engine/children.py) and of what the supervisor wants
(the number of slots, which workers are stale, which slots may spawn now); the supervisor
(engine/supervisor.py) runs it after every event and carries out the answer. Gunicorn's
arbiter is the model (each turn compares the table with the wanted state), per slot.

A worker is *fresh* unless it is stale (it asked to be recycled, or it was spawned under an
older configuration, or with more memory than the plan now gives each worker) or retired (asked to leave: it is on its way out). Per
slot below the count:

- the first fresh ready worker keeps the slot, and every other worker of the slot is retired:
  a stale worker leaves only once its replacement is ready, so capacity never dips;
- a slot without a fresh worker gets one spawned, unless its crash backoff holds it back.
  Replacing workers that are stale by the supervisor's doing (a reload, a new memory plan) and
  still serve goes one slot at a time; a slot with no ready worker, or whose worker asked to
  be recycled, does not wait for that.

Workers in slots at or above the count are retired (a scale-down).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.children import Child


@dataclass
class Turn:
    spawn: list[int] = field(default_factory=list)  # slots to spawn a worker for
    retire: list[tuple[Child, str]] = field(default_factory=list)  # workers to retire, and why


def turn(workers: Iterable[Child], count: int, stale: Callable[[Child], str | None],
         may_spawn: Callable[[int], bool]) -> Turn:
    live = [w for w in workers if w.retired is None]
    slots: dict[int, list[Child]] = {}
    for worker in live:
        slots.setdefault(worker.slot, []).append(worker)
    result = Turn()
    rolling = any(_rolling(members, stale) for slot, members in slots.items() if slot < count)
    for slot in range(count):
        members = slots.get(slot, [])
        fresh = [w for w in members if stale(w) is None]
        keeper = next((w for w in fresh if w.ready), None)
        if keeper is not None:
            result.retire += [(w, stale(w) or "surplus") for w in members if w is not keeper]
            continue
        if fresh or not may_spawn(slot):
            continue  # its replacement is booting, or its backoff holds
        if _planned(members):
            if rolling:
                continue  # one slot at a time
            rolling = True
        result.spawn.append(slot)
    result.retire += [(w, "scaled_down") for w in live if w.slot >= count]
    return result


def _planned(members: list[Child]) -> bool:
    """The slot is served, by workers stale by the supervisor's doing (none asked to go)."""
    return any(w.ready for w in members) and not any(w.recycle for w in members)


def _rolling(members: list[Child], stale) -> bool:
    """A fresh worker boots to take over such a slot."""
    fresh = [w for w in members if stale(w) is None]
    return bool(fresh) and not any(w.ready for w in fresh) and _planned(members)
