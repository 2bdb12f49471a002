"""What the cache needs to know of a SQL text, from DuckDB's own parser.

`SqlAnalyzer.analyze(sql)` parses with `json_serialize_sql` in a private in-memory DuckDB and
walks the syntax tree once, giving:
  - `shape`: the tree without source positions, so texts that differ only in whitespace,
    keyword case or comments share one key;
  - `volatile`: the query calls a function whose result changes between runs: DuckDB's
    VOLATILE and CONSISTENT_WITHIN_QUERY functions (random(), now(), uuid()...), the macros
    built on them (ago()...), and the bare keywords current_timestamp, current_date... (which
    DuckDB binds from column names);
  - `tables`: the Arc tables it reads, as "<database>/<measurement>" directories under
    data_dir, or None when it reads something the cache cannot watch (an attached database,
    a configured view, a file read by a table function): any change then invalidates it;
  - `reason`: why it cannot be cached at all (not one SELECT, a table function other than a
    pure one), else None.

The parse costs about 0.3 ms, so results are memoized by exact text: a dashboard sends the
same text every refresh and pays for one parse.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import duckdb
import msgspec

# Keywords DuckDB parses as column names and binds to the clock or the session.
VOLATILE_KEYWORDS = frozenset({"current_timestamp", "current_date", "current_time", "localtimestamp",
                               "localtime", "current_user", "current_role", "session_user", "user",
                               "current_catalog", "current_schema"})
SYSTEM_SCHEMAS = frozenset({"information_schema", "pg_catalog", "system", "temp", "main"})
PURE_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
FILE_TABLE_FUNCTIONS = frozenset({"read_parquet", "parquet_scan"})  # cached, but no table to watch
MEMO_SIZE = 4096


@dataclass(frozen=True)
class Analysis:
    shape: bytes | None  # None when not cacheable
    volatile: bool = False
    tables: frozenset[str] | None = None  # None: depends on everything under data_dir
    reason: str | None = None


def volatile_functions(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """Functions whose result may change between runs, and the macros that call them."""
    names = {row[0] for row in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() "
        "WHERE stability IN ('VOLATILE', 'CONSISTENT_WITHIN_QUERY')").fetchall()}
    names |= VOLATILE_KEYWORDS
    macros = con.execute("SELECT function_name, macro_definition FROM duckdb_functions() "
                         "WHERE macro_definition IS NOT NULL").fetchall()
    while True:  # a macro that calls a volatile macro is volatile too
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b", re.I)
        found = {name for name, body in macros if name not in names and pattern.search(body)}
        if not found:
            return frozenset(names)
        names |= found


class SqlAnalyzer:
    def __init__(self, default_database: str, other_names: frozenset[str] = frozenset()):
        """other_names: schemas and unqualified names that are not Arc tables (attached
        databases, configured views): a query naming one depends on everything."""
        self._con = duckdb.connect(":memory:", config={"threads": 1})
        self._default = default_database
        self._other = other_names | SYSTEM_SCHEMAS
        self._volatile = volatile_functions(self._con)
        self.analyze = functools.lru_cache(maxsize=MEMO_SIZE)(self._analyze)

    def close(self) -> None:
        self._con.close()

    def _analyze(self, sql: str) -> Analysis:
        try:
            text = self._con.execute("SELECT json_serialize_sql($1)", [sql]).fetchone()[0]
        except duckdb.Error as exc:
            return Analysis(None, reason=f"not parsed: {exc}")
        tree = msgspec.json.decode(text)
        if tree.get("error") or len(tree.get("statements", [])) != 1:
            return Analysis(None, reason="not a single SELECT")
        walk = _Walk(self._volatile)
        shape = walk.visit(tree["statements"][0])
        if walk.reason:
            return Analysis(None, reason=walk.reason)
        tables = self._tables(walk)
        return Analysis(msgspec.json.encode(shape), walk.volatile, tables)

    def _tables(self, walk: _Walk) -> frozenset[str] | None:
        if walk.reads_files:
            return None
        found = set()
        for catalog, schema, name in walk.tables:
            if not schema and name in walk.ctes:
                continue
            if catalog or schema in self._other or (
                    not schema and name in self._other):
                return None
            found.add(f"{schema or self._default}/{name}")
        return frozenset(found)


class _Walk:
    """One pass over a serialized statement: the tree without positions, and what it uses."""

    def __init__(self, volatile_names: frozenset[str]):
        self._volatile_names = volatile_names
        self.volatile = False
        self.reads_files = False
        self.reason: str | None = None
        self.tables: list[tuple[str, str, str]] = []
        self.ctes: set[str] = set()

    def visit(self, node):
        if isinstance(node, list):
            return [self.visit(item) for item in node]
        if not isinstance(node, dict):
            return node
        self._note(node)
        return {k: self.visit(v) for k, v in node.items() if k != "query_location"}

    def _note(self, node: dict) -> None:
        kind = node.get("type")
        if node.get("class") == "FUNCTION" and node.get("function_name", "").lower() in self._volatile_names:
            self.volatile = True
        elif kind == "COLUMN_REF" and len(node.get("column_names", ())) == 1 and \
                node["column_names"][0].lower() in VOLATILE_KEYWORDS:
            self.volatile = True
        elif kind == "BASE_TABLE":
            self.tables.append((node.get("catalog_name", ""), node.get("schema_name", ""),
                                node.get("table_name", "")))
        elif kind == "TABLE_FUNCTION":
            name = node.get("function", {}).get("function_name", "").lower()
            if name in FILE_TABLE_FUNCTIONS:
                self.reads_files = True
            elif name not in PURE_TABLE_FUNCTIONS:
                self.reason = f"table function {name}() is not cached"
        if "cte_map" in node:
            self.ctes.update(item["key"] for item in node["cte_map"].get("map", []))
