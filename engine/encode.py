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

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from engine.catalog import quote_ident

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
            f"'{name.replace(chr(39), chr(39) * 2)}', "
            + json_value(f"struct_extract({x}, '{name.replace(chr(39), chr(39) * 2)}')", ft, depth + 1)
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


def write_result(rel: duckdb.DuckDBPyRelation, fmt: str, sink, batch_rows: int,
                 tally: Tally | None = None) -> int:
    """Encode rel into sink (a binary file object) in fmt; returns the row count."""
    tally = tally or Tally()
    if fmt == "arrow":
        _write_arrow(rel, sink, batch_rows, tally)
    elif fmt == "parquet":
        _write_parquet(rel, sink, batch_rows, tally)
    elif fmt == "csv":
        _write_csv(rel, sink, batch_rows, tally)
    elif fmt == "ndjson":
        pairs = ", ".join(f"'{_sql_str(name)}', {json_value(f'#{i}', t)}"
                          for i, (name, t) in enumerate(zip(rel.columns, rel.types), 1))
        _write_rows(rel.project(f"json_object({pairs})::VARCHAR || chr(10)"), sink, batch_rows,
                    tally)
    elif fmt == "json":
        sink.write(b'{"success":true,"columns":' + msgspec.json.encode(rel.columns) + b',"data":[')
        values = ", ".join(json_value(f"#{i}", t) for i, t in enumerate(rel.types, 1))
        _write_rows(rel.project(f"',' || json_array({values})::VARCHAR"), sink, batch_rows, tally,
                    skip_first_byte=True)
        sink.write(b'],"row_count":' + str(tally.rows).encode())
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return tally.rows


def _tallied(reader, tally: Tally):
    """The reader's batches, each counted once the caller has written it."""
    for batch in reader:
        yield batch
        tally.rows += batch.num_rows


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


def _write_arrow(rel, sink, batch_rows: int, tally: Tally) -> None:
    reader = rel.to_arrow_reader(batch_rows)
    with pa.ipc.new_stream(sink, reader.schema) as writer:
        for batch in _tallied(reader, tally):
            writer.write_batch(batch)


def _write_parquet(rel, sink, batch_rows: int, tally: Tally) -> None:
    # Parquet has no month-day-nano interval: intervals are written as their text.
    if any(t.id == "interval" for t in rel.types):
        rel = rel.project(", ".join(
            f"#{i}::VARCHAR AS {quote_ident(name)}" if t.id == "interval" else f"#{i}"
            for i, (name, t) in enumerate(zip(rel.columns, rel.types), 1)))
    reader = rel.to_arrow_reader(batch_rows)
    with pq.ParquetWriter(sink, reader.schema) as writer:
        for batch in _tallied(reader, tally):
            writer.write_batch(batch)


def _write_csv(rel, sink, batch_rows: int, tally: Tally) -> None:
    cells = ", ".join(f"{csv_value(f'#{i}', t)} AS {quote_ident(name)}"
                      for i, (name, t) in enumerate(zip(rel.columns, rel.types), 1))
    reader = rel.project(cells).to_arrow_reader(batch_rows)
    options = pa_csv.WriteOptions(quoting_style="needed")
    with pa_csv.CSVWriter(sink, reader.schema, write_options=options) as writer:
        for batch in _tallied(reader, tally):
            writer.write_batch(batch)


def _write_rows(rel, sink, batch_rows: int, tally: Tally, skip_first_byte: bool = False) -> None:
    """Copy a one-VARCHAR-column relation's strings back to back: one buffer copy per batch."""
    for batch in _tallied(rel.to_arrow_reader(batch_rows), tally):
        if not batch.num_rows:
            continue
        column = batch.column(0)
        _, offsets, data = column.buffers()
        offsets = memoryview(offsets).cast("q" if pa.types.is_large_string(column.type) else "i")
        start, end = offsets[column.offset], offsets[column.offset + len(column)]
        if skip_first_byte and tally.rows == 0:
            start += 1
        sink.write(memoryview(data)[start:end])
