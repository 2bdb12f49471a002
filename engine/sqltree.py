"""DuckDB's parse tree of a statement (`json_serialize_sql`) as Python data, for both sides of
the socket: the gateway's analysis (gateway/sqlkey.py, pruning) and the worker's statement
policy (engine/policy.py). Runs on the caller's DuckDB connection and thread.

`scalar` runs a one-value query and drains its result: a result left open on a connection makes
DuckDB abort the transaction of the next relation that fails (`con.sql`), and the worker's next
query then fails with "Current transaction is aborted".

`fill` completes a planned statement (gateway/catalog.py): the plan's text holds markers,
string constants that each request replaces by its own values (the files a table reference
reads, the request's instant), always as quoted string constants, so the statement's calls are
those of the text with markers, and the worker checks that text once (engine/policy.py).

DuckDB writes Infinity and NaN unquoted, which is not JSON: msgspec refuses that text, so it is
decoded again with the json module, where they become {"float": "Infinity"} (a cache key still
tells 1e400 from NULL). `max_bytes` refuses a tree too large to decode and walk (TOO_LARGE).
"""

from __future__ import annotations

import json

import duckdb
import msgspec

from engine.errors import Kind, QueryError


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    return con.execute(sql, params or []).fetchall()[0][0]


def parse_tree(con: duckdb.DuckDBPyConnection, sql: str, max_bytes: int = 0) -> dict:
    text = scalar(con, "SELECT json_serialize_sql($1)", [sql])
    if max_bytes and len(text) > max_bytes:
        raise QueryError(Kind.TOO_LARGE, f"the statement is too large to check: its syntax tree "
                                         f"is over {max_bytes // 2**20} MiB")
    return decode_tree(text)


def decode_tree(text: str) -> dict:
    """json_serialize_sql's output; it may hold Infinity and NaN, which JSON has not."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return json.loads(text, parse_constant=lambda c: {"float": c})


def subquery(sql: str) -> str:
    """One statement as the body of a subquery: without its closing semicolon, and on lines of
    its own, so a trailing comment cannot swallow the parenthesis."""
    tokens = duckdb.tokenize(sql)
    if tokens and tokens[-1][1] == duckdb.token_type.operator:
        text = sql.encode()  # token positions count bytes of UTF-8
        if text[tokens[-1][0]:tokens[-1][0] + 1] == b";":
            sql = text[:tokens[-1][0]].decode()
    return f"(\n{sql}\n)"


def literal(text: str) -> str:
    """A SQL string constant."""
    return "'" + text.replace("'", "''") + "'"


def fill(template: str, fills: dict[str, str | list[str]]) -> str:
    """The statement with each marker constant ('marker') replaced by its value: a string, or
    a list of strings (the items of a list constant, which the marker stood in)."""
    for marker, value in fills.items():
        text = literal(value) if isinstance(value, str) else ", ".join(map(literal, value))
        template = template.replace(literal(marker), text)
    return template
