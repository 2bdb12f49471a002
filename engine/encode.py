"""Result encodings, produced inside the worker by DuckDB and pyarrow, never row by row in Python.

Arrow and Parquet write DuckDB's Arrow batches as they come. JSON, NDJSON and CSV are built
by DuckDB itself: the user's relation is projected through one SQL expression per column that
turns each value into its JSON form (json_value); DuckDB returns one string per row, and the
worker copies each batch's contiguous string buffer into the segment. CSV cells are the same
JSON values unquoted, so the three text formats agree with each other by construction.

The JSON encoding of each type (documented in the README):
  integers of any width, DECIMAL   -> number, all digits kept
  FLOAT, DOUBLE                    -> number; NaN and infinities -> "NaN", "Infinity", "-Infinity"
  TIMESTAMP (any precision)        -> "YYYY-MM-DDTHH:MM:SS.ffffff"
  TIMESTAMP WITH TIME ZONE         -> "YYYY-MM-DDTHH:MM:SS.ffffff+00:00" (always in UTC)
  DATE, TIME                       -> "YYYY-MM-DD", "HH:MM:SS[.ffffff]"
  INTERVAL                         -> DuckDB's text, such as "1 day 02:00:00"
  BLOB                             -> base64 string
  LIST, ARRAY / STRUCT / MAP       -> array / object / object with keys as text
  NULL                             -> null;  anything else -> DuckDB's to_json
Parquet keeps DuckDB's Arrow types, except INTERVAL (no Parquet equivalent): its text.
A type a format cannot hold fails the query with a 400 that names it.
"""

from __future__ import annotations

from collections import OrderedDict

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from engine.catalog import quote_ident
from engine.errors import Kind, QueryError
from engine.sqltree import literal, subquery

_ISO = "'%Y-%m-%dT%H:%M:%S.%f'"
_TIMESTAMPS = {"timestamp", "timestamp_s", "timestamp_ms", "timestamp_ns"}
_TEXT = {"varchar", "enum", "uuid"}


def json_value(x: str, t: duckdb.DuckDBPyType, depth: int = 0) -> str:
    """SQL expression of type JSON for the value x of type t."""
    kind = t.id
    if kind in ("float", "double"):
        return (f"CASE WHEN isnan({x}) THEN '\"NaN\"'::JSON WHEN isinf({x}) THEN "
                f"(CASE WHEN {x} > 0 THEN '\"Infinity\"' ELSE '\"-Infinity\"' END)::JSON "
                f"ELSE to_json({x}) END")
    if kind in _TIMESTAMPS:
        return f"to_json(strftime({x}, {_ISO}))"
    if kind == "timestamp with time zone":
        return f"to_json(strftime(timezone('UTC', {x}), {_ISO}) || '+00:00')"
    if kind == "blob":
        return f"to_json(base64({x}))"
    var = f"v{depth}"
    if kind in ("list", "array"):
        inner = json_value(var, t.children[0][1], depth + 1)
        if inner != f"to_json({var})":
            return f"to_json(list_transform({x}, lambda {var}: {inner}))"
    elif kind == "struct":
        fields = ", ".join(
            f"{literal(name)}, " + json_value(f"struct_extract({x}, {literal(name)})", ft, depth + 1)
            for name, ft in t.children)
        return f"CASE WHEN {x} IS NULL THEN NULL ELSE json_object({fields}) END"
    elif kind == "map":
        inner = json_value(f"{var}.value", t.children[1][1], depth + 1)
        if inner != f"to_json({var}.value)":
            return (f"to_json(map_from_entries(list_transform(map_entries({x}), lambda {var}: "
                    f"{{'key': {var}.key::VARCHAR, 'value': {inner}}})))")
    return f"to_json({x})"


def csv_value(x: str, t: duckdb.DuckDBPyType) -> str:
    """SQL VARCHAR expression: the JSON value without quotes for strings, as is otherwise."""
    if t.id in _TEXT:
        return f"{x}::VARCHAR"
    return f"({json_value(x, t)}) ->> '$'"


class Tally:
    """Rows written so far: read by the worker's progress thread while the result is written."""

    __slots__ = ("rows",)

    def __init__(self):
        self.rows = 0


class Encoder:
    """Runs a statement and writes its result in a format, binding it as few times as it can.

    The text formats (and Parquet, for intervals) project the result through expressions chosen
    by its column types, which only a bind tells. A bind costs about as much as running a small
    query (it opens the first Parquet file of each scan), and the relational API bound three
    times: to describe, to project, to run. Here the statement runs once, wrapped in its
    projection as a subquery, and its shape (names and projection) is remembered by `key`: the
    statement, the files it reads and its parameters, which decide the types. So a repeat
    binds once and a first sight twice (describe, run). The memo holds SHAPES statements and is
    forgotten with the worker's DuckDB instances (`forget`); a remembered shape that no longer
    binds is described again. What DuckDB cannot read as a subquery (EXPLAIN, PRAGMA) goes
    through the relational API. Main thread only.
    """

    SHAPES = 1024

    def __init__(self):
        self._shapes: OrderedDict[tuple, _Shape] = OrderedDict()

    def forget(self) -> None:
        self._shapes.clear()

    def write(self, con: duckdb.DuckDBPyConnection, sql: str, params: list | None, fmt: str,
              sink, batch_rows: int, tally: Tally, key: tuple) -> int:
        """Run sql and encode its result into sink (a binary file object); the row count."""
        if fmt == "arrow":
            _write_arrow(_run(con, sql, params, batch_rows), sink, tally)
            return tally.rows
        if fmt not in _WRITERS:
            raise ValueError(f"unknown format {fmt!r}")
        key = (fmt, *key)
        shape = self._shapes.get(key)
        if shape is not None:
            self._shapes.move_to_end(key)
            try:
                reader = shape.run(con, sql, params, batch_rows)
            except (duckdb.BinderException, duckdb.ConversionException):
                # Its types changed under it (nothing is written yet): describe it again.
                del self._shapes[key]
                shape = None
        if shape is None:
            rel = con.sql(sql, params=params) if params else con.sql(sql)
            if rel is None:
                raise QueryError(Kind.BAD_REQUEST, "the statement returns no result")
            shape = _Shape(fmt, rel.columns, rel.types)
            try:
                reader = shape.run(con, sql, params, batch_rows)
            except duckdb.ParserException:  # not a subquery: EXPLAIN, PRAGMA
                reader = shape.project(rel).to_arrow_reader(batch_rows)
            else:
                self._shapes[key] = shape
                if len(self._shapes) > self.SHAPES:
                    self._shapes.popitem(last=False)
            del rel
        _WRITERS[fmt](reader, sink, tally, shape)
        return tally.rows


def write_result(rel: duckdb.DuckDBPyRelation, fmt: str, sink, batch_rows: int,
                 tally: Tally | None = None) -> int:
    """Encode a relation into sink in fmt; the row count (for a relation already at hand)."""
    tally = tally or Tally()
    if fmt == "arrow":
        _write_arrow(rel.to_arrow_reader(batch_rows), sink, tally)
    elif fmt not in _WRITERS:
        raise ValueError(f"unknown format {fmt!r}")
    else:
        shape = _Shape(fmt, rel.columns, rel.types)
        _WRITERS[fmt](shape.project(rel).to_arrow_reader(batch_rows), sink, tally, shape)
    return tally.rows


def _run(con: duckdb.DuckDBPyConnection, sql: str, params: list | None, batch_rows: int):
    con.execute(sql, params) if params else con.execute(sql)
    if con.description is None:
        raise QueryError(Kind.BAD_REQUEST, "the statement returns no result")
    return con.to_arrow_reader(batch_rows)


class _Shape:
    """A result's column names and the projection a format reads it through (None: as is)."""

    __slots__ = ("columns", "select")

    def __init__(self, fmt: str, columns: list[str], types: list):
        self.columns = columns
        self.select = _PROJECTIONS[fmt](columns, types)

    def run(self, con, sql: str, params: list | None, batch_rows: int):
        if self.select is None:
            return _run(con, sql, params, batch_rows)
        return _run(con, f"SELECT {self.select} FROM {subquery(sql)} AS q", params, batch_rows)

    def project(self, rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
        return rel if self.select is None else rel.project(self.select)


def _json_select(columns, types) -> str:
    values = ", ".join(json_value(f"#{i}", t) for i, t in enumerate(types, 1))
    return f"',' || json_array({values})::VARCHAR"


def _ndjson_select(columns, types) -> str:
    pairs = ", ".join(f"{literal(name)}, {json_value(f'#{i}', t)}"
                      for i, (name, t) in enumerate(zip(columns, types), 1))
    return f"json_object({pairs})::VARCHAR || chr(10)"


def _csv_select(columns, types) -> str:
    return ", ".join(f"{csv_value(f'#{i}', t)} AS {quote_ident(name)}"
                     for i, (name, t) in enumerate(zip(columns, types), 1))


def _parquet_select(columns, types) -> str | None:
    # Parquet has no month-day-nano interval: intervals are written as their text.
    if not any(t.id == "interval" for t in types):
        return None
    return ", ".join(f"#{i}::VARCHAR AS {quote_ident(name)}" if t.id == "interval" else f"#{i}"
                     for i, (name, t) in enumerate(zip(columns, types), 1))


def _write_json(reader, sink, tally: Tally, shape: _Shape) -> None:
    sink.write(b'{"success":true,"columns":' + msgspec.json.encode(shape.columns) + b',"data":[')
    _write_rows(reader, sink, tally, skip_first_byte=True)
    sink.write(b'],"row_count":' + str(tally.rows).encode())


def _write_ndjson(reader, sink, tally: Tally, shape: _Shape) -> None:
    _write_rows(reader, sink, tally)


def _tallied(reader, tally: Tally):
    """The reader's batches, each counted once the caller has written it."""
    for batch in reader:
        yield batch
        tally.rows += batch.num_rows


def _write_arrow(reader, sink, tally: Tally) -> None:
    with pa.ipc.new_stream(sink, reader.schema) as writer:
        for batch in _tallied(reader, tally):
            writer.write_batch(batch)


def _write_parquet(reader, sink, tally: Tally, shape: _Shape) -> None:
    with pq.ParquetWriter(sink, reader.schema) as writer:
        for batch in _tallied(reader, tally):
            writer.write_batch(batch)


def _write_csv(reader, sink, tally: Tally, shape: _Shape) -> None:
    options = pa_csv.WriteOptions(quoting_style="needed")
    with pa_csv.CSVWriter(sink, reader.schema, write_options=options) as writer:
        for batch in _tallied(reader, tally):
            writer.write_batch(batch)


def _write_rows(reader, sink, tally: Tally, skip_first_byte: bool = False) -> None:
    """Copy a one-VARCHAR-column result's strings back to back: one buffer copy per batch."""
    for batch in _tallied(reader, tally):
        if not batch.num_rows:
            continue
        column = batch.column(0)
        _, offsets, data = column.buffers()
        offsets = memoryview(offsets).cast("q" if pa.types.is_large_string(column.type) else "i")
        start, end = offsets[column.offset], offsets[column.offset + len(column)]
        if skip_first_byte and tally.rows == 0:
            start += 1
        sink.write(memoryview(data)[start:end])


_PROJECTIONS = {"json": _json_select, "ndjson": _ndjson_select, "csv": _csv_select,
                "parquet": _parquet_select}
_WRITERS = {"json": _write_json, "ndjson": _write_ndjson, "csv": _write_csv,
            "parquet": _write_parquet}
