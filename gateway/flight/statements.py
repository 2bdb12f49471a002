"""Prepared statements without server state: handles, parameters, and describing a statement.

Owns the handle format and what a parameter batch may be. A handle is the statement itself:
msgpack `[1, sql, params]`, params being None or the one row of values a DoPut bound. So a
handle survives worker recycling and gateway restarts, any gRPC thread can serve it, and
ClosePreparedStatement has nothing to free. A client could write its own handle, but it could
send the same SQL as a plain statement: handles carry no privilege.

Parameters arrive as Arrow record batches (DoPut). A query runs once, with one row of values:
several rows (executemany) are refused with INVALID_ARGUMENT, as duckfleet only reads.
Values become what HTTP's JSON params would be after msgpack (the worker's wire): numbers,
strings, booleans, None, bytes, and timestamps; dates, times, decimals and intervals as text,
which DuckDB casts where the query uses them.

`LocalDuckDB.describe_sql` is what CreatePreparedStatement runs to learn the result's schema:
DuckDB cannot describe a statement with unbound parameters, but the statement as a subquery
with LIMIT 0 and NULL for each parameter gives the schema without reading data. Everything
here runs on gRPC threads.
"""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from engine.catalog import quote_ident
from engine.errors import Kind, QueryError
from engine.sqltree import subquery

VERSION = 1


def encode_handle(sql: str, params: list[Any] | None) -> bytes:
    return msgspec.msgpack.encode([VERSION, sql, params])


def decode_handle(handle: bytes) -> tuple[str, list[Any] | None]:
    try:
        version, sql, params = msgspec.msgpack.decode(handle, type=tuple[int, str, list | None])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        raise QueryError(Kind.BAD_REQUEST, "not a prepared statement handle of this server") from None
    if version != VERSION:
        raise QueryError(Kind.BAD_REQUEST, f"prepared statement handle of version {version}; "
                                           "prepare the statement again")
    return sql, params


def parameters(table: pa.Table, max_bytes: int) -> list[Any] | None:
    """The one row of values a DoPut bound; None for no row (a statement without parameters)."""
    if table.nbytes > max_bytes:
        raise QueryError(Kind.TOO_LARGE, f"parameters of {table.nbytes} bytes are over the "
                                         f"limit ({max_bytes // 1024} KiB, server.max_body_kb)")
    if table.num_rows == 0:
        return None
    if table.num_rows > 1:
        raise QueryError(Kind.BAD_REQUEST, f"{table.num_rows} rows of parameters: duckfleet runs a "
                                           "query with one row of parameters at a time "
                                           "(executemany is for writes, which it does not take)")
    values = [column[0].as_py() for column in table.columns]
    try:
        return msgspec.msgpack.decode(msgspec.msgpack.encode(values))
    except (OverflowError, msgspec.EncodeError, TypeError) as exc:
        raise QueryError(Kind.BAD_REQUEST, f"parameters cannot be passed to DuckDB: {exc}") from None


class LocalDuckDB:
    """A private in-memory DuckDB connection for what needs DuckDB but no data: parsing a
    statement, and the Arrow types of DuckDB types. One per server, shared by the gRPC threads
    under a lock (each use takes microseconds; opening a connection takes milliseconds)."""

    def __init__(self):
        self._con = duckdb.connect(":memory:", config={"threads": 1})
        self._lock = threading.Lock()

    def describe_sql(self, sql: str) -> tuple[str, list[None]] | None:
        """(SQL that answers the statement's schema with no rows, NULL parameters for it);
        None if the text is not one statement or not a query: then nothing describes it."""
        try:
            with self._lock:
                statements = self._con.extract_statements(sql)
        except duckdb.Error:
            return None  # the query itself will say what is wrong, when it is run
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            return None
        return f"SELECT * FROM {subquery(sql)} LIMIT 0", [None] * len(statements[0].named_parameters)

    def arrow_schema(self, columns: list[dict]) -> pa.Schema:
        """The Arrow schema DuckDB gives columns of these DuckDB types (as the catalog lists
        them: the types workers produce, by the same DuckDB)."""
        if not columns:
            return pa.schema([])
        select = ", ".join(f"CAST(NULL AS {c['type']}) AS {quote_ident(c['name'])}"
                           for c in columns)
        with self._lock:
            return self._con.execute(f"SELECT {select} LIMIT 0").fetch_arrow_table().schema

    def close(self) -> None:
        with self._lock:
            self._con.close()


def schema_of(ipc: bytes) -> pa.Schema:
    return pa.ipc.open_stream(ipc).schema
