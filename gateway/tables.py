"""One Arc table as the gateway sees it: its files from the index, as arrays pruning filters
quickly, the columns whose types do not mix across files, and its description for
GET /api/v1/catalog.

Built by gateway/catalog.py on its planning thread whenever the index changes; the DuckDB
connection passed in is that thread's (sandboxed to data_dir: it reads footers only).
"""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from engine.index import FileEntry

NUMBERS = frozenset({"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT",
                     "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE"})
DESCRIBE = "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet(?{}))"


class TableFiles:
    """One Arc table's files, as arrays pruning can filter quickly."""

    def __init__(self, key: str, data_dir: str, files: list[FileEntry]):
        self.key = key  # '<database>/<measurement>' as on disk
        self.data_dir = data_dir
        self.database, self.name = key.split("/")
        self.files = files
        self.paths = [f"{data_dir}/{f.path}" for f in files]
        kinds = {f.kind for f in files if f.kind}
        self.kind = kinds.pop() if len(kinds) == 1 else ""  # mixed time types: never pruned
        self.bounded = pa.array([f.kind == self.kind and bool(self.kind) for f in files])
        self.mins = pa.array([f.time_min for f in files], pa.int64())
        self.maxs = pa.array([f.time_max for f in files], pa.int64())
        self.schemas: dict[int, int] = {}  # schema id -> its first file
        for i, f in enumerate(files):
            self.schemas.setdefault(f.schema, i)
        self.rows = sum(f.rows for f in files)
        self.bytes = sum(f.size for f in files)
        self.conflicts: list[str] = []  # columns whose types do not mix across files
        self.evolved = len([s for s in self.schemas if s >= 0]) > 1  # read by name
        bounded = [f for f in files if f.kind]
        self.time_range = (min(f.time_min for f in bounded), max(f.time_max for f in bounded)) \
            if bounded else None

    def select(self, ranges: list[tuple[int, int]]) -> list[int]:
        """Indexes of the files that may hold a row in one of these time ranges; one file of
        every other schema comes along, so the table keeps all its columns."""
        keep = pc.invert(self.bounded)
        for low, high in ranges:
            keep = pc.or_(keep, pc.and_(pc.greater_equal(self.maxs, low),
                                        pc.less_equal(self.mins, high)))
        chosen = pc.indices_nonzero(keep).to_pylist()
        have = {self.files[i].schema for i in chosen}
        chosen += [i for schema, i in self.schemas.items() if schema not in have]
        return sorted(chosen)


def conflicts(con: duckdb.DuckDBPyConnection, table: TableFiles) -> list[str]:
    """Columns whose types do not mix across the table's files, with a file of each type:
    what a query that fails on such a column needs to be told."""
    reps = [table.paths[i] for schema, i in table.schemas.items() if schema >= 0]
    if len(reps) < 2:
        return []
    seen: dict[str, dict[str, str]] = {}  # column -> {type: a file that has it}
    try:
        for path in reps:
            for name, kind in con.execute(DESCRIBE.format(""), [path]).fetchall():
                seen.setdefault(name, {}).setdefault(kind, path[len(table.data_dir) + 1:])
    except duckdb.Error as exc:
        return [str(exc).split("\n", 1)[0]]
    return [f"column {name} is " + ", ".join(f"{kind} in {path}" for kind, path in kinds.items())
            for name, kinds in seen.items() if len({_family(kind) for kind in kinds}) > 1]


def describe(con: duckdb.DuckDBPyConnection, table: TableFiles, time_column: str) -> dict:
    """The table as GET /api/v1/catalog lists it: columns as DuckDB reads them by name."""
    reps = [table.paths[i] for schema, i in table.schemas.items() if schema >= 0]
    found = {"name": table.name, "files": len(table.files), "bytes": table.bytes,
             "rows": table.rows, "columns": [], "time_column": time_column if table.kind else None,
             "time_min": _iso(table.time_range and table.time_range[0]),
             "time_max": _iso(table.time_range and table.time_range[1])}
    try:
        columns = con.execute(DESCRIBE.format(", union_by_name = true"), [reps]).fetchall() \
            if reps else []
    except duckdb.Error as exc:
        found["error"] = str(exc).splitlines()[0]
    else:
        found["columns"] = [{"name": n, "type": t} for n, t in columns]
    return found


def _family(type_name: str) -> str:
    """Types within one family mix (a widening: INTEGER to BIGINT, FLOAT to DOUBLE); a number
    that became text or a list does not. Nested types mix only with themselves."""
    if type_name in NUMBERS or type_name.startswith("DECIMAL"):
        return "number"
    if type_name.startswith(("TIMESTAMP", "DATE")):
        return "time"
    return type_name


def _iso(us: int | None) -> str | None:
    return None if us is None else datetime.fromtimestamp(us / 1e6, timezone.utc).isoformat()
