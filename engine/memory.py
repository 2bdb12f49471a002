"""The memory budget: how much RAM the fleet may use, and each worker's DuckDB memory_limit.

Pure functions, run by the supervisor before it spawns anything. RAM is the lower of the
machine's memory and the container's cgroup limit (v2 memory.max, or v1 limit_in_bytes).
"""

from __future__ import annotations

from pathlib import Path

import psutil

from engine.config import Config, ConfigError, parse_size

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


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


def worker_memory_limit(config: Config, ram: int | None = None) -> int:
    """DuckDB memory_limit for each worker, in bytes: (RAM x fraction) / workers unless set."""
    if config.duckdb.memory_limit != "auto":
        return parse_size(config.duckdb.memory_limit, "duckdb.memory_limit")
    ram = system_memory_bytes() if ram is None else ram
    limit = int(ram * config.duckdb.memory_fraction / config.worker_count)
    if limit < 64 * 1024**2:
        raise ConfigError(
            f"duckdb.memory_limit: auto gives {limit // 1024**2} MiB per worker "
            f"({ram // 1024**2} MiB x {config.duckdb.memory_fraction} / {config.worker_count} workers); "
            "use fewer workers or set a limit explicitly")
    return limit
