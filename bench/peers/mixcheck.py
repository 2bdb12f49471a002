"""The dashboard mix as a plan fixed before any load, and the check of every peer's answers.

Plan: one segment for each run and concurrency, in order, the same for every peer. Segment i's
clients send seeded sequences of panel queries whose live windows end at NOW0 + i minutes:
virtual time stands still within a segment (a few seconds long) and moves a minute to the next,
as a dashboard's auto-refresh would. Each client's sequence holds its share of
duration * MAX_QPS queries, more than any peer answers in that time; a client whose sequence
ends stops (the segment's QPS is over its measured wall time either way).

Checked, after each segment's load: every SAMPLE_EVERY-th answer of each client (a fixed set
of positions in the plan), every answer a cache served (X-Cache `hit` or `coalesced`, from
duckfleet or the Arc-style tier), and the warm-up's answer of every panel. The expected answers
of all of them are computed once, before any peer runs, by in-process DuckDB over every row of
the same data (bench/answers.py): the sampled positions, the warm-up, and every query the plan
sends more than once (only those can come from a cache). An answer the plan did not foresee
fails loudly rather than being computed under load.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from bench.answers import Reference, check_answer
from bench.peers.dashboard import DEMO, PANELS, WINDOWS, DashboardMix, MixConfig, panel_sql
from bench.peers.loadgen import Reply

SAMPLE_EVERY = 10
MAX_QPS = 1000
CACHE_SERVED = {"hit", "coalesced"}


@dataclass(frozen=True)
class Segment:
    run: int
    concurrency: int
    now: datetime
    sequences: tuple[tuple[str, ...], ...]  # one a client

    def feeder(self):
        """next_sql for closed_loop: each client's next planned query, None at its end."""
        its = [iter(s) for s in self.sequences]
        return lambda n: next(its[n], None)

    def spelled(self, spell) -> "Segment":
        """The same segment with every query rewritten by `spell` (bench.peers' history)."""
        return dataclasses.replace(self, sequences=tuple(tuple(map(spell, s)) for s in self.sequences))


def plan(concurrencies: list[int], runs: int, duration: float, config: MixConfig = DEMO) -> list[Segment]:
    """Segment i's "now" is config.now0 + i minutes."""
    segments = []
    for run in range(runs):
        for c in concurrencies:
            at = dataclasses.replace(config, now0=config.now0 + timedelta(minutes=len(segments)))
            length = math.ceil(duration * MAX_QPS / c)
            mixes = [DashboardMix(seed=run * 10_000 + c * 100 + n, epoch=None, config=at)
                     for n in range(c)]
            segments.append(Segment(run, c, at.now0,
                                    tuple(tuple(m.next() for _ in range(length)) for m in mixes)))
    return segments


def warm_queries(config: MixConfig = DEMO) -> list[str]:
    """Every panel once, a live 1 h window: the warm-up every peer gets."""
    return [panel_sql(panel, config.now0, next(iter(WINDOWS))) for panel in PANELS]


def to_expect(segments: list[Segment], warm: list[str]) -> set[str]:
    """Every query whose answer may be checked."""
    counts = collections.Counter(warm)
    sampled = set(warm)
    for segment in segments:
        for sequence in segment.sequences:
            counts.update(sequence)
            sampled.update(sequence[::SAMPLE_EVERY])
    return sampled | {sql for sql, n in counts.items() if n > 1}


class Keeper:
    """on_reply for closed_loop: keeps the replies to check."""

    def __init__(self):
        self.position: collections.Counter = collections.Counter()
        self.kept: list[Reply] = []
        self.replies = 0
        self.cache_served = 0

    def on_reply(self, reply: Reply) -> None:
        self.replies += 1
        k = self.position[reply.client]
        self.position[reply.client] += 1
        if reply.status != 200:
            return
        served = (reply.cache or "").lower() in CACHE_SERVED
        self.cache_served += served
        if served or k % SAMPLE_EVERY == 0:
            self.kept.append(reply)


def wrong(reference: Reference, reply: Reply, seen: dict) -> str | None:
    """What is wrong with one reply (None: right). JSON bodies alike for a query are checked
    once (a cache sends the same bytes again)."""
    if reply.sql not in reference.answers:
        raise RuntimeError(f"no expected answer was planned for {reply.sql[:200]}")
    if reply.body is None:
        return check_answer(reference, reply.sql, reply.rows, reply.columns)
    key = (reply.sql, hashlib.blake2b(reply.body, digest_size=16).digest())
    if key not in seen:
        doc = json.loads(reply.body)
        seen[key] = check_answer(reference, reply.sql, doc["data"], doc["columns"])
    return seen[key]


def check(keeper: Keeper, reference: Reference) -> dict:
    seen: dict = {}
    problems = []
    for reply in keeper.kept:
        problem = wrong(reference, reply, seen)
        if problem:
            problems.append({"sql": reply.sql, "cache": reply.cache, "wrong": problem})
    return {"checked": len(keeper.kept), "of": keeper.replies,
            "share": round(len(keeper.kept) / max(1, keeper.replies), 3),
            "cache_served": keeper.cache_served, "wrong": len(problems), "wrong_examples": problems[:5]}
