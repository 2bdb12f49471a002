"""Statement policy: only reads run, and they call only what is allowed. Decided by DuckDB's
own parser, never by a regex over the text.

Runs in the worker, on the worker's connection, before execution. One statement per request;
its parsed type must be SELECT (DuckDB also parses DESCRIBE, SHOW, SUMMARIZE, VALUES, FROM-first
queries and read-only PRAGMAs such as `PRAGMA version` as SELECT) or EXPLAIN of such a
statement (not EXPLAIN ANALYZE, whose profile shows the files views read as absolute paths).
Everything else is refused with the statement type named.

A SELECT can still call things that are not reads: `enable_profiling()` changes the shared
connection for every later query, `pandas_scan()` reads (and can crash on) the worker's own
memory, `duckdb_settings()` shows paths. So the statement is serialized to its syntax tree
(`json_serialize_sql`, of the text DuckDB will run: a PRAGMA's rewritten SELECT) and every call
in it is checked against engine/allowlist.py: table functions must be allowed, refused scalar
functions and system views are named in the 403, and a file read by a replacement scan
(`FROM 'x.csv'`) must be Parquet. Views of the catalog are the operator's and are not looked
into. A tree too deep to decode is refused as a SQL error, like DuckDB's own depth limit.

`Checked` remembers the statements it found allowed, by text (the verdict depends on nothing
else): a dashboard's queries, and a planned statement's text with markers (engine/sqltree.fill),
are parsed and walked once, not per request.
"""

from __future__ import annotations

import collections

import duckdb

from engine import allowlist
from engine.errors import Kind, QueryError
from engine.sqltree import parse_tree

ALLOWED = {duckdb.StatementType.SELECT}
TREE_MAX = 16 * 2**20  # 780 KB of "*," makes 75 MB of tree; a 100 KB IN list about 2 MB
_EXPLAIN_WORDS = {"EXPLAIN", "ANALYZE", "ANALYSE"}
_COMPRESSION = (".gz", ".zst")


def check(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryError unless sql is exactly one read statement calling only what is allowed."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(Kind.SQL_ERROR, str(exc)) from None
    if not statements:
        raise QueryError(Kind.BAD_REQUEST, "sql holds no statement")
    if len(statements) > 1:
        raise QueryError(Kind.FORBIDDEN,
                         f"one statement per request, got {len(statements)}")
    statement = statements[0]
    if statement.type == duckdb.StatementType.EXPLAIN:
        words = statement.query.upper().split(None, 2)[:2]
        if "ANALYZE" in words or "ANALYSE" in words:
            # Its profile names every file a view read, as the server's absolute paths.
            raise QueryError(Kind.FORBIDDEN, "EXPLAIN ANALYZE is not allowed: its profile shows "
                                             "the server's file paths (EXPLAIN is allowed)")
        check(con, _strip_explain(statement.query))
        return
    if statement.type not in ALLOWED:
        raise QueryError(Kind.FORBIDDEN,
                         f"{statement.type.name} statements are not allowed: only reads run here")
    check_calls(syntax_tree(con, statement.query))


class Checked:
    """Statements found allowed, at most `max_bytes` of their text, least recently used out."""

    def __init__(self, max_bytes: int = 16 * 2**20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._texts: collections.OrderedDict[str, None] = collections.OrderedDict()

    def check(self, con: duckdb.DuckDBPyConnection, sql: str) -> None:
        if sql in self._texts:
            self._texts.move_to_end(sql)
            return
        check(con, sql)
        if len(sql) > self.max_bytes // 16:
            return  # a huge statement is rare; it would push out many usual ones
        self._texts[sql] = None
        self.bytes += len(sql)
        while self.bytes > self.max_bytes:
            self.bytes -= len(self._texts.popitem(last=False)[0])


def syntax_tree(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    try:
        # Past TREE_MAX, decoding and walking it would hold the worker for seconds.
        tree = parse_tree(con, sql, TREE_MAX)
    except RecursionError:  # deeper than the worker's recursion limit (engine/worker.py)
        raise QueryError(Kind.SQL_ERROR, "the statement is nested too deeply") from None
    if tree.get("error"):
        raise QueryError(Kind.SQL_ERROR, tree.get("error_message") or "the statement does not parse")
    return tree


def check_calls(tree: dict) -> None:
    """Walk the syntax tree (iteratively: it can be deep) and refuse the first call not allowed."""
    stack: list = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "TABLE_FUNCTION" and isinstance(node.get("function"), dict):
            function = node["function"]
            _check_table_function(str(function.get("function_name", "")))
            stack.append(function.get("children"))
            stack.extend(v for k, v in node.items() if k != "function")
            continue
        if kind == "BASE_TABLE":
            _check_table(str(node.get("catalog_name", "")), str(node.get("schema_name", "")),
                         str(node.get("table_name", "")))
        elif node.get("class") in ("FUNCTION", "WINDOW", "AGGREGATE") and "function_name" in node:
            _check_function(str(node["function_name"]))
        stack.extend(v for v in node.values() if isinstance(v, (dict, list)))


def _forbidden(what: str, reason: str) -> QueryError:
    return QueryError(Kind.FORBIDDEN, f"{what} is not allowed: {reason}")


def _check_table_function(name: str) -> None:
    name = name.lower()
    if name in allowlist.TABLE_FUNCTIONS and not name.startswith(allowlist.REFUSED_PREFIXES):
        return
    reason = allowlist.REFUSED_TABLE_FUNCTIONS.get(name) or (
        "only these table functions may be called: " + ", ".join(sorted(allowlist.TABLE_FUNCTIONS)))
    raise _forbidden(f"table function {name}()", reason)


def _check_function(name: str) -> None:
    name = name.lower()
    reason = allowlist.REFUSED_FUNCTIONS.get(name)
    if reason is None and name.startswith(allowlist.REFUSED_PREFIXES):
        reason = "it changes session state or reads Python objects of the server"
    if reason is not None:
        raise _forbidden(f"function {name}()", reason)


def _check_table(catalog: str, schema: str, name: str) -> None:
    schema, lowered = schema.lower(), name.lower()
    if schema in ("system", "temp") and not catalog:  # system.x names a catalog, not a schema
        schema = ""
    for qualified in ([f"{s}.{lowered}" for s in allowlist.UNQUALIFIED_SCHEMAS] if not schema
                      else [f"{schema}.{lowered}"]):
        if qualified in allowlist.REFUSED_VIEWS:
            raise _forbidden(f"system view {qualified}", allowlist.REFUSED_VIEWS[qualified])
    if schema or ("." not in name and "/" not in name):
        return  # a table or view: catalog names never hold a dot or a slash
    # A quoted path: DuckDB reads it by a replacement scan (read_csv, read_json, read_duckdb...).
    stem = lowered
    while stem.endswith(_COMPRESSION):
        stem = stem.rsplit(".", 1)[0]
    if not stem.endswith(allowlist.PARQUET_SUFFIX):
        raise _forbidden(f"reading {name!r}", "only Parquet files are read here (read_parquet)")


def _strip_explain(query: str) -> str:
    words = query.lstrip().split(None, 1)
    while words and words[0].upper() in _EXPLAIN_WORDS:
        words = words[1].lstrip().split(None, 1) if len(words) > 1 else []
    return words[0] + (" " + words[1] if len(words) > 1 else "") if words else ""
