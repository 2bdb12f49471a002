"""Partition pruning the way Arc's Python tier did it, for the Arc-style peer (ARC_PRUNE_DIR).

Rebuilt from the description of Arc's `api/partition_pruner.py` (see
/work/shared/notes/pruning-facts.md), not from its code: regular expressions find, in the text of
the first WHERE clause (up to GROUP BY, ORDER BY or LIMIT), `time >= '...'` or `time > '...'`,
`time < '...'` or `time <= '...'`, and `time BETWEEN '...' AND '...'`, with a string literal
right after the operator, parsed in a handful of formats. A start alone reads up to a day past
now; an end alone reads from 2020. The one range found serves every table of the query, and
each table's glob becomes one glob per hour of the range, kept where the hour's directory
exists (none: the whole glob). What it cannot see reads every file: `TIMESTAMP '...'` literals,
`now() - INTERVAL ...`, casts, parameters, a time column of another name; and what it sees is
not always the time column (`uptime >= '...'` matches too) nor the right query block (the first
WHERE's range serves every table, CTEs and subqueries included).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

WHERE = re.compile(r"\bWHERE\b\s+(.+?)(?:\bGROUP BY\b|\bORDER BY\b|\bLIMIT\b|$)", re.I | re.S)
STARTS = [re.compile(p, re.I) for p in (r"time\s*>=\s*'([^']+)'", r"time\s*>\s*'([^']+)'")]
ENDS = [re.compile(p, re.I) for p in (r"time\s*<\s*'([^']+)'", r"time\s*<=\s*'([^']+)'")]
BETWEEN = re.compile(r"time\s+BETWEEN\s+'([^']+)'\s+AND\s+'([^']+)'", re.I)
FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d")
TABLE = re.compile(r"\bFROM\s+(cpu|mem|disk)\b", re.I)


def _parse(text: str) -> datetime | None:
    for fmt in FORMATS:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            pass
    if "T" in text:
        try:
            return datetime.fromisoformat(text.split("+")[0].split("Z")[0])
        except ValueError:
            pass
    return None


def time_range(sql: str) -> tuple[datetime, datetime] | None:
    where = WHERE.search(sql)
    if not where:
        return None
    clause = where.group(1)
    start = end = None
    for pattern in STARTS:
        if (m := pattern.search(clause)) and (start := _parse(m.group(1))):
            break
    for pattern in ENDS:
        if (m := pattern.search(clause)) and (end := _parse(m.group(1))):
            break
    if m := BETWEEN.search(clause):
        start, end = _parse(m.group(1)) or start, _parse(m.group(2)) or end
    if start and end:
        return start, end
    if start:
        return start, datetime.utcnow() + timedelta(days=1)
    if end:
        return datetime(2020, 1, 1), end
    return None


def hour_globs(data_dir: Path, database: str, measurement: str, start: datetime, end: datetime) -> list[str]:
    hour, found = start.replace(minute=0, second=0, microsecond=0), []
    while hour < end:
        folder = data_dir / database / measurement / hour.strftime("%Y/%m/%d/%H")
        if folder.is_dir():
            found.append(f"{folder}/*.parquet")
        hour += timedelta(hours=1)
    return found


def rewrite(sql: str, data_dir: Path, database: str = "default") -> tuple[str, int | None]:
    """(the SQL to run, hour globs read; None when nothing was pruned)."""
    window = time_range(sql)
    if window is None:
        return sql, None
    total = 0

    def table(match: re.Match) -> str:
        nonlocal total
        globs = hour_globs(data_dir, database, match.group(1).lower(), *window)
        if not globs:
            return match.group(0)
        total += len(globs)
        listed = ", ".join("'" + g.replace("'", "''") + "'" for g in globs)
        return f"FROM read_parquet([{listed}]) AS {match.group(1)}"
    return TABLE.sub(table, sql), total
