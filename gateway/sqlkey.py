"""What the gateway needs to know of a SQL text, from DuckDB's own parser.

`SqlAnalyzer.analyze(sql)` parses with `json_serialize_sql` and walks the syntax tree once,
giving an Analysis:
  - `shape`: the tree without source positions, so texts that differ only in whitespace,
    keyword case or comments share one cache key;
  - `volatile`: the query calls a function whose result changes between runs: DuckDB's
    VOLATILE and CONSISTENT_WITHIN_QUERY functions, the clock functions DuckDB marks
    CONSISTENT anyway (current_localtimestamp()...), the macros built on them (ago()...), and
    the bare keywords current_timestamp, current_date... (which DuckDB binds from column names);
  - `tables`: the Arc tables it depends on, as casefolded "<database>/<measurement>" (a view
    from [catalog.views] stands for the tables it reads), or None when it reads something the
    watcher cannot see (an attached database, a file named by a path, system catalogs): any
    change then invalidates it. Names are casefolded as DuckDB binds them: CPU, "cpu" and
    "default".cpu are one table. Over-approximating is safe (a CTE named like a table still
    counts the table), missing a table would serve stale rows;
  - `reason`: why it cannot be cached at all (not one SELECT, sampling, a table function other
    than a pure one), else None;
  - `tree`: the statement's tree, for pruning (gateway/prune.py).

Bounded, because the input is a client's: a text over `max_sql_bytes` is not analyzed (it runs
as sent, uncached and unpruned), a tree nested past Python's recursion raises a clear 400, any
parse-tree value (Infinity, NaN, huge numbers) keeps its identity in the key, and results are
memoized by exact text within `memo_bytes`. DuckDB work happens on the caller's thread: the
gateway calls it from its planning thread only (gateway/catalog.py), never on the event loop.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import duckdb
import msgspec

from engine.errors import Kind, QueryError
from engine.sqltree import parse_tree

# Keywords DuckDB parses as column names and binds to the clock or the session.
VOLATILE_KEYWORDS = frozenset({"current_timestamp", "current_date", "current_time", "localtimestamp",
                               "localtime", "current_user", "current_role", "session_user", "user",
                               "current_catalog", "current_schema"})
# Functions whose result changes between runs although DuckDB marks them CONSISTENT.
NONDETERMINISTIC = frozenset({"current_localtimestamp", "current_localtime", "current_setting",
                              "current_query", "version"})
SYSTEM_SCHEMAS = frozenset({"information_schema", "pg_catalog", "system", "temp"})
PURE_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
FILE_TABLE_FUNCTIONS = frozenset({"read_parquet", "parquet_scan"})  # cached, but no table to watch


@dataclass(frozen=True)
class Analysis:
    shape: bytes | None  # None when not cacheable
    volatile: bool = False
    tables: frozenset[str] | None = None  # None: depends on everything under data_dir
    reason: str | None = None
    tree: dict | None = None  # the statement (statements[0]["node"]), when it parsed
    size: int = 0  # what the memo charges for it


def volatile_functions(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """Functions whose result may change between runs, and the macros that call them."""
    names = {row[0] for row in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() "
        "WHERE stability IN ('VOLATILE', 'CONSISTENT_WITHIN_QUERY')").fetchall()}
    names |= VOLATILE_KEYWORDS | NONDETERMINISTIC
    macros = con.execute("SELECT function_name, macro_definition FROM duckdb_functions() "
                         "WHERE macro_definition IS NOT NULL").fetchall()
    while True:  # a macro that calls a volatile macro is volatile too
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b", re.I)
        found = {name for name, body in macros if name not in names and pattern.search(body)}
        if not found:
            return frozenset(names)
        names |= found


class SqlAnalyzer:
    def __init__(self, con: duckdb.DuckDBPyConnection, default_database: str,
                 views: dict[str, str] | None = None, attached: frozenset[str] = frozenset(),
                 max_sql_bytes: int = 65536, memo_bytes: int = 64 * 2**20):
        """views: [catalog.views] (name -> SQL); attached: names of attached databases."""
        self._con = con
        self._default = default_database.casefold()
        self._opaque = {n.casefold() for n in attached} | SYSTEM_SCHEMAS
        self.volatile_names = volatile_functions(con)
        self.max_sql_bytes = max_sql_bytes
        self._memo: collections.OrderedDict[str, Analysis] = collections.OrderedDict()
        self._memo_bytes, self._memo_limit = 0, memo_bytes
        self._views: dict[str, frozenset[str] | None] = {}
        for name, sql in (views or {}).items():  # a view depends on what it reads
            self._views[name.casefold()] = self.analyze(sql).tables if sql else None

    def cached(self, sql: str) -> Analysis | None:
        """The memoized analysis of this exact text, if any (no DuckDB call: loop-safe)."""
        return self._memo.get(sql)

    def analyze(self, sql: str) -> Analysis:
        found = self._memo.get(sql)
        if found is not None:
            self._memo.move_to_end(sql)
            return found
        analysis = self._analyze(sql)
        self._memo[sql] = analysis
        self._memo_bytes += analysis.size
        while self._memo_bytes > self._memo_limit and len(self._memo) > 1:
            _, old = self._memo.popitem(last=False)
            self._memo_bytes -= old.size
        return analysis

    def _analyze(self, sql: str) -> Analysis:
        if len(sql.encode()) > self.max_sql_bytes:
            return Analysis(None, reason=f"over {self.max_sql_bytes} bytes: not analyzed",
                            size=64)
        try:
            tree = parse_tree(self._con, sql)
            if tree.get("error") or len(tree.get("statements", [])) != 1:
                return Analysis(None, reason="not a single SELECT", size=len(sql) + 64)
            walk = _Walk(self.volatile_names)
            shape = msgspec.json.encode(walk.visit(tree["statements"][0]))
        except duckdb.Error as exc:
            return Analysis(None, reason=f"not parsed: {exc}", size=len(sql) + 64)
        except RecursionError:
            raise QueryError(Kind.BAD_REQUEST, "the statement is nested too deeply") from None
        node = tree["statements"][0].get("node")
        size = 2 * len(sql) + 4 * len(shape) + 64  # the tree costs a few times its JSON
        if walk.reason:
            return Analysis(None, reason=walk.reason, tree=node, size=size)
        return Analysis(shape, walk.volatile, self._tables(walk), tree=node, size=size)

    def _tables(self, walk: _Walk) -> frozenset[str] | None:
        if walk.reads_files:
            return None
        found: set[str] = set()
        for catalog, schema, name in walk.tables:
            schema, name = schema.casefold(), name.casefold()
            if catalog or schema in self._opaque or "/" in name or "." in name:
                return None  # an attached database, a system catalog, or a file by its path
            if schema in ("", "main") and name in self._views:
                if self._views[name] is None:
                    return None
                found |= self._views[name]
            if schema != "main":
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

    def visit(self, node):
        if isinstance(node, list):
            return [self.visit(item) for item in node]
        if not isinstance(node, dict):
            return node
        self._note(node)
        shape = {k: self.visit(v) for k, v in node.items() if k != "query_location"}
        if node.get("type") == "BASE_TABLE":  # DuckDB binds names case-insensitively
            for key in ("catalog_name", "schema_name", "table_name"):
                shape[key] = shape.get(key, "").casefold()
        return shape

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
        if node.get("sample") is not None:
            self.reason = "sampling (USING SAMPLE, TABLESAMPLE) is random: not cached"
