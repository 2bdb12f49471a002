"""The memory budget: how much RAM the fleet may use, and each worker's DuckDB memory_limit.

Pure functions, run by the supervisor before it spawns anything (and again on reload).
RAM is the lower of the machine's memory and the container's cgroup limit (v2 memory.max,
or v1 limit_in_bytes). The budget is RAM x memory_fraction. It must hold every worker's
memory_limit plus each process's own overhead (the workers, the gateway, the supervisor):

    workers x (memory_limit + overhead) + 2 x overhead <= budget

With memory_limit = "auto" the limit is whatever fits; an explicit limit that does not fit is
refused with the numbers (PlanError: budget and need), unless force_memory_limit is set. The
supervisor plans again whenever the number of workers changes (SIGTTIN, SIGTTOU, reload).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.config import Config, ConfigError, parse_size

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
MiB = 2**20


class PlanError(ConfigError):
    """A worker count that does not fit the budget: `need` bytes against `budget`."""

    def __init__(self, message: str, budget: int, need: int):
        super().__init__(message)
        self.budget = budget
        self.need = need


def cgroup_limit_bytes() -> int | None:
    for name in _CGROUP_LIMITS:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def system_memory_bytes() -> int:
    total = psutil.virtual_memory().total
    limit = cgroup_limit_bytes()
    return min(total, limit) if limit else total


@dataclass(frozen=True)
class MemoryPlan:
    ram: int
    budget: int
    workers: int
    worker_limit: int
    overhead: int  # per process

    @property
    def total(self) -> int:
        return self.workers * (self.worker_limit + self.overhead) + 2 * self.overhead

    def describe(self) -> str:
        return (f"{self.workers} workers x ({self.worker_limit // MiB} MiB memory_limit + "
                f"{self.overhead // MiB} MiB overhead) + 2 x {self.overhead // MiB} MiB "
                f"(gateway, supervisor) = {self.total // MiB} MiB; budget {self.budget // MiB} MiB "
                f"({self.ram // MiB} MiB RAM x fraction)")


MIN_AUTO_LIMIT = 64 * MiB  # an "auto" share below this is refused: DuckDB could do little with it


def plan(config: Config, ram: int | None = None, workers: int | None = None) -> MemoryPlan:
    """The plan for `workers` (default: the configured count)."""
    ram = system_memory_bytes() if ram is None else ram
    duck = config.duckdb
    budget = int(ram * duck.memory_fraction)
    overhead = duck.process_overhead_mb * MiB
    workers = config.worker_count if workers is None else workers
    if duck.memory_limit == "auto":
        limit = (budget - (workers + 2) * overhead) // workers
        if limit < MIN_AUTO_LIMIT:
            raise PlanError(f"duckdb.memory_limit: auto leaves {limit // MiB} MiB per worker: "
                              f"budget {budget // MiB} MiB minus {workers + 2} x "
                              f"{overhead // MiB} MiB overhead over {workers} workers; "
                              "use fewer workers or a larger memory_fraction",
                            budget, workers * MIN_AUTO_LIMIT + (workers + 2) * overhead)
        return MemoryPlan(ram, budget, workers, limit, overhead)
    result = MemoryPlan(ram, budget, workers, parse_size(duck.memory_limit, "duckdb.memory_limit"),
                        overhead)
    if result.total > budget and not duck.force_memory_limit:
        raise PlanError(f"duckdb.memory_limit: does not fit the memory budget: {result.describe()}. "
                        "Lower memory_limit or workers, or set duckdb.force_memory_limit = true",
                        budget, result.total)
    return result
