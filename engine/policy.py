"""Statement policy: only reads run. Decided by DuckDB's own parser, never by a regex.

Runs in the worker, on the worker's connection, before execution. One statement per request;
its parsed type must be SELECT (DuckDB also parses DESCRIBE, SHOW, SUMMARIZE, VALUES, FROM-first
queries and read-only PRAGMAs such as `PRAGMA version` as SELECT) or EXPLAIN of such a
statement. Everything else is refused with the statement type named.
"""

from __future__ import annotations

import duckdb

from engine.errors import Kind, QueryError

ALLOWED = {duckdb.StatementType.SELECT}
_EXPLAIN_WORDS = {"EXPLAIN", "ANALYZE", "ANALYSE"}


def check(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryError unless sql is exactly one read statement."""
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
        # EXPLAIN ANALYZE executes its statement, so the inner statement must pass too.
        check(con, _strip_explain(statement.query))
        return
    if statement.type not in ALLOWED:
        raise QueryError(Kind.FORBIDDEN,
                         f"{statement.type.name} statements are not allowed: only reads run here")


def _strip_explain(query: str) -> str:
    words = query.lstrip().split(None, 1)
    while words and words[0].upper() in _EXPLAIN_WORDS:
        words = words[1].lstrip().split(None, 1) if len(words) > 1 else []
    return words[0] + (" " + words[1] if len(words) > 1 else "") if words else ""
