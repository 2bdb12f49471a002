"""The worker's Encoder (engine/encode.py) in one DuckDB: the statement run once inside its
format's projection writes exactly what the relational API writes, its shape is remembered
and described again when its types change, and statements that cannot be a subquery still
encode. The formats over a real server are tests/test_formats.py."""

import io

import duckdb
import pyarrow as pa
import pytest

from engine.encode import Encoder, Tally, write_result
from tests.test_formats import TYPES_SQL

FORMATS = ["json", "ndjson", "csv", "parquet", "arrow"]


@pytest.fixture
def con():
    con = duckdb.connect(config={"threads": 1})
    con.execute("SET TimeZone = 'UTC'")
    yield con
    con.close()


def encoded(encoder, con, sql, fmt, key=("k",), params=None) -> bytes:
    sink = io.BytesIO()
    encoder.write(con, sql, params, fmt, sink, 1000, Tally(), key)
    return sink.getvalue()


def related(con, sql, fmt) -> bytes:
    sink = io.BytesIO()
    write_result(con.sql(sql), fmt, sink, 1000)
    return sink.getvalue()


def same(fmt: str, one: bytes, other: bytes) -> bool:
    """Equal results: text and Parquet byte for byte; Arrow IPC by value (the bytes behind a
    NULL are whatever the buffer held), NaN written as text."""
    if fmt != "arrow":
        return one == other
    one, other = (pa.ipc.open_stream(x).read_all() for x in (one, other))
    return one.schema.equals(other.schema) and \
        [[repr(v) for v in row.values()] for row in one.to_pylist()] == \
        [[repr(v) for v in row.values()] for row in other.to_pylist()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_run_writes_what_the_relational_api_writes(con, fmt):
    encoder = Encoder()
    first = encoded(encoder, con, TYPES_SQL, fmt)
    assert same(fmt, first, related(con, TYPES_SQL, fmt))
    assert same(fmt, encoded(encoder, con, TYPES_SQL, fmt), first)  # the remembered shape


@pytest.mark.parametrize("sql", [
    "SELECT 1.5::DOUBLE AS x;", "SELECT 1.5::DOUBLE AS x -- no parenthesis may follow",
    "SELECT 1.5::DOUBLE AS x; -- a comment after the statement",
    "SELECT 'é;' AS x /* ; */ ;", "FROM range(3) t(x) ORDER BY x DESC", "VALUES (1), (2)",
    "DESCRIBE SELECT 1 AS x", "EXPLAIN SELECT 1 AS x", "PRAGMA version",
])
def test_any_allowed_statement_shape_encodes(con, sql):
    for fmt in ("json", "csv"):
        if sql.startswith(("EXPLAIN", "PRAGMA")):  # their text is the machine's: compare shape
            assert encoded(Encoder(), con, sql, fmt)[:20] == related(con, sql, fmt)[:20]
        else:
            assert encoded(Encoder(), con, sql, fmt) == related(con, sql, fmt)


def test_a_shape_whose_types_changed_is_described_again(con):
    encoder = Encoder()
    assert b'"NaN"' in encoded(encoder, con, "SELECT 'nan'::DOUBLE AS x", "json")
    # The same key now names a statement of other types: its remembered projection (isnan)
    # does not bind; the statement is described again, not failed.
    got = encoded(encoder, con, "SELECT TIMESTAMP '2024-01-02 03:04:05' AS x", "json")
    assert got == related(con, "SELECT TIMESTAMP '2024-01-02 03:04:05' AS x", "json")
    assert b"2024-01-02T03:04:05.000000" in got


def test_parameters_and_errors(con):
    encoder = Encoder()
    assert encoded(encoder, con, "SELECT ?::INTEGER + 1 AS y", "json", params=[41]) == \
        related(con, "SELECT 42 AS y", "json")
    with pytest.raises(duckdb.BinderException):
        encoded(encoder, con, "SELECT no_such_column", "json", key=("other",))
    with pytest.raises(duckdb.ConversionException, match="x0"):
        encoded(encoder, con, "SELECT ('x' || i)::INTEGER AS z FROM range(1) t(i)", "json",
                key=("third",))
    assert len(encoder._shapes) == 1  # failures leave no shape behind


def test_the_memo_is_bounded_and_forgotten(con, monkeypatch):
    monkeypatch.setattr(Encoder, "SHAPES", 3)
    encoder = Encoder()
    for n in range(5):
        encoded(encoder, con, f"SELECT {n} AS n", "json", key=(n,))
    assert len(encoder._shapes) == 3
    encoder.forget()
    assert not encoder._shapes
