"""Every format against in-process DuckDB on the same query, over the real server."""

import base64
import csv
import datetime
import decimal
import io
import json
import math

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TYPES_SQL = """
SELECT * FROM (VALUES
  (1::TINYINT, 170141183460469231731687303715884105727::HUGEINT, 12345.67::DECIMAL(10,2),
   'nan'::DOUBLE, 'inf'::DOUBLE, 2.5::DOUBLE, 'héllo, "wörld" ✓'::VARCHAR, '\\x00\\xFFab'::BLOB,
   DATE '2024-02-29', TIMESTAMP '2024-01-02 03:04:05.123456', TIMESTAMPTZ '2024-01-02 03:04:05+02:00',
   INTERVAL '1 day 2 hours', [1.5, 'nan'::DOUBLE, NULL], {'a': 1, 'b': 'x'}, MAP {'k': 2}, NULL::INTEGER),
  ((-128)::TINYINT, -5::HUGEINT, -0.01::DECIMAL(10,2),
   '-inf'::DOUBLE, NULL, -0.0::DOUBLE, '', NULL,
   DATE '1970-01-01', TIMESTAMP '1999-12-31 23:59:59', NULL,
   INTERVAL '3 months', [], NULL, MAP {}, 7)
) AS t(i8, huge, dec, nan, inf, dbl, text, bin, day, ts, tstz, span, list, rec, map, maybe)
"""

# The documented JSON encoding of TYPES_SQL, written out by hand.
EXPECTED_JSON = [
    [1, 170141183460469231731687303715884105727, 12345.67, "NaN", "Infinity", 2.5,
     'héllo, "wörld" ✓', base64.b64encode(b"\x00\xffab").decode(), "2024-02-29",
     "2024-01-02T03:04:05.123456", "2024-01-02T01:04:05.000000+00:00", "1 day 02:00:00",
     [1.5, "NaN", None], {"a": 1, "b": "x"}, {"k": 2}, None],
    [-128, -5, -0.01, "-Infinity", None, -0.0, "", None, "1970-01-01",
     "1999-12-31T23:59:59.000000", None, "3 months", [], None, {}, 7],
]
COLUMNS = ["i8", "huge", "dec", "nan", "inf", "dbl", "text", "bin", "day", "ts", "tstz", "span",
           "list", "rec", "map", "maybe"]


@pytest.fixture(scope="module")
def local():
    con = duckdb.connect(config={"threads": 1})
    con.execute("SET TimeZone = 'UTC'")
    return con


def as_json_value(value, typ: pa.DataType):
    """The documented encoding, applied to Arrow's Python values: an independent oracle."""
    if value is None:
        return None
    if pa.types.is_map(typ):
        return {str(k): as_json_value(v, typ.item_type) for k, v in value}
    if pa.types.is_list(typ):
        return [as_json_value(v, typ.value_type) for v in value]
    if pa.types.is_struct(typ):
        return {k: as_json_value(v, typ.field(k).type) for k, v in value.items()}
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, decimal.Decimal):
        return float(value) if value != value.to_integral() else int(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime.datetime):
        text = value.astimezone(datetime.timezone.utc).replace(tzinfo=None) if value.tzinfo else value
        return text.strftime("%Y-%m-%dT%H:%M:%S.%f") + ("+00:00" if value.tzinfo else "")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, pa.MonthDayNano):
        return interval_text(value)
    return value


def interval_text(value: pa.MonthDayNano) -> str:
    """DuckDB's interval text, as the README documents it (non-negative values)."""
    years, months = divmod(value.months, 12)
    parts = [f"{n} {unit}{'s' if n != 1 else ''}"
             for n, unit in ((years, "year"), (months, "month"), (value.days, "day")) if n]
    micros = value.nanoseconds // 1000
    if micros or not parts:
        seconds, frac = divmod(micros, 1_000_000)
        text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        parts.append(text + (f".{frac:06d}" if frac else ""))
    return " ".join(parts)


def normalized_rows(table: pa.Table) -> list[list]:
    """Rows with NaN made comparable (NaN != NaN)."""
    def norm(v):
        if isinstance(v, float) and math.isnan(v):
            return "NaN"
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v
    return [[norm(v) for v in row.values()] for row in table.to_pylist()]


def test_arrow_matches_in_process(server, local):
    for path, body in (("/api/v1/query/arrow", {}), ("/api/v1/query", {"format": "arrow"})):
        resp = server.query(TYPES_SQL, path=path, **body)
        assert resp.status == 200, resp
        assert resp.headers["Content-Type"] == "application/vnd.apache.arrow.stream"
        assert resp.headers["X-Row-Count"] == "2"
        assert float(resp.headers["X-Execution-Time-Ms"]) >= 0
        assert float(resp.headers["X-Wait-Time-Ms"]) >= 0
        got = pa.ipc.open_stream(resp.body).read_all()
        expected = local.sql(TYPES_SQL).to_arrow_table()
        assert got.schema == expected.schema
        assert normalized_rows(got) == normalized_rows(expected)


def test_json_has_arc_shape_and_documented_encoding(server):
    resp = server.query(TYPES_SQL)
    assert resp.status == 200, resp
    assert resp.headers["Content-Type"].startswith("application/json")
    doc = resp.json()
    assert list(doc) == ["success", "columns", "data", "row_count", "execution_time_ms",
                         "wait_time_ms", "timestamp", "error"]
    assert doc["success"] is True and doc["error"] is None
    assert doc["columns"] == COLUMNS
    assert doc["row_count"] == 2
    assert doc["data"] == EXPECTED_JSON
    datetime.datetime.fromisoformat(doc["timestamp"])


def test_json_agrees_with_arrow(server):
    table = pa.ipc.open_stream(server.query(TYPES_SQL, format="arrow").body).read_all()
    data = server.query(TYPES_SQL).json()["data"]
    assert len(data) == table.num_rows == len(EXPECTED_JSON)
    for row_json, row_arrow in zip(data, table.to_pylist(), strict=True):
        assert row_json == [as_json_value(v, field.type)
                            for v, field in zip(row_arrow.values(), table.schema, strict=True)]


def test_ndjson_and_csv_agree_with_json(server):
    data = server.query(TYPES_SQL).json()["data"]
    ndjson = server.query(TYPES_SQL, format="ndjson")
    assert ndjson.headers["Content-Type"].startswith("application/x-ndjson")
    lines = ndjson.body.decode().splitlines()
    assert [json.loads(line) for line in lines] == [dict(zip(COLUMNS, row, strict=True)) for row in data]

    resp = server.query(TYPES_SQL, format="csv")
    assert resp.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(resp.body.decode())))
    assert rows[0] == COLUMNS
    assert len(rows) == 1 + len(data) == 1 + len(EXPECTED_JSON), rows  # not just a header
    for cells, row in zip(rows[1:], data, strict=True):
        assert cells == [_csv_text(v) for v in row]


def _csv_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_parquet_matches_in_process(server, local):
    resp = server.query(TYPES_SQL, format="parquet")
    assert resp.status == 200
    got = pq.read_table(io.BytesIO(resp.body))
    expected = local.sql(TYPES_SQL).to_arrow_table()
    rows = normalized_rows(expected)
    span = COLUMNS.index("span")
    for row, text in zip(rows, ["1 day 02:00:00", "3 months"], strict=True):
        row[span] = text  # Parquet has no month-day-nano interval: its text
    assert normalized_rows(got) == rows


# The README's rows for the types TYPES_SQL leaves out.
MORE_TYPES_SQL = """
SELECT * FROM (VALUES
  (TIME '08:00:00', TIME '23:59:59.123456', '0b1a2c3d-4e5f-6789-abcd-ef0123456789'::UUID,
   'happy'::ENUM('sad', 'ok', 'happy'), 2.5::FLOAT, 'nan'::FLOAT, '-inf'::FLOAT, 0.1::FLOAT,
   [1, 2, 3]::INTEGER[3], ['a', NULL]::VARCHAR[2], TIMESTAMP_S '2025-11-01 08:00:00',
   TIMESTAMP_MS '2025-11-01 08:00:00.123', TIMESTAMP_NS '2025-11-01 08:00:00.123456789'),
  (TIME '00:00:00.5', NULL, NULL, 'sad'::ENUM('sad', 'ok', 'happy'), -1.0::FLOAT, 'inf'::FLOAT,
   NULL, NULL, [-1, NULL, 0]::INTEGER[3], NULL, TIMESTAMP_S '1970-01-01 00:00:00', NULL,
   TIMESTAMP_NS '2262-04-11 23:47:16.854775')
) AS t(t, t_frac, id, mood, f, f_nan, f_inf, f_tenth, arr, arr_text, ts_s, ts_ms, ts_ns)
"""
MORE_COLUMNS = ["t", "t_frac", "id", "mood", "f", "f_nan", "f_inf", "f_tenth", "arr", "arr_text",
                "ts_s", "ts_ms", "ts_ns"]
MORE_EXPECTED_JSON = [
    ["08:00:00", "23:59:59.123456", "0b1a2c3d-4e5f-6789-abcd-ef0123456789", "happy", 2.5, "NaN",
     "-Infinity", 0.10000000149011612,  # a FLOAT is the double it widens to
     [1, 2, 3], ["a", None], "2025-11-01T08:00:00.000000", "2025-11-01T08:00:00.123000",
     "2025-11-01T08:00:00.123456"],  # nanoseconds are cut to microseconds
    ["00:00:00.5", None, None, "sad", -1.0, "Infinity", None, None, [-1, None, 0], None,
     "1970-01-01T00:00:00.000000", None, "2262-04-11T23:47:16.854775"],
]


def test_more_types_every_format(server, local):
    """TIME, UUID, ENUM, FLOAT, ARRAY and TIMESTAMP_S/MS/NS as the README documents them."""
    doc = server.query(MORE_TYPES_SQL).json()
    assert doc["columns"] == MORE_COLUMNS
    assert doc["data"] == MORE_EXPECTED_JSON
    lines = server.query(MORE_TYPES_SQL, format="ndjson").body.decode().splitlines()
    assert [json.loads(line) for line in lines] == \
        [dict(zip(MORE_COLUMNS, row, strict=True)) for row in MORE_EXPECTED_JSON]
    rows = list(csv.reader(io.StringIO(server.query(MORE_TYPES_SQL, format="csv").body.decode())))
    assert rows[0] == MORE_COLUMNS and len(rows) == 1 + len(MORE_EXPECTED_JSON)
    for cells, row in zip(rows[1:], MORE_EXPECTED_JSON, strict=True):
        assert cells == [_csv_text(v) for v in row]

    # Arrow keeps DuckDB's own Arrow types.
    expected = local.sql(MORE_TYPES_SQL).to_arrow_table()
    got = pa.ipc.open_stream(server.query(MORE_TYPES_SQL, format="arrow").body).read_all()
    assert got.schema == expected.schema
    assert normalized_rows(got) == normalized_rows(expected)
    types = dict(zip(got.column_names, got.schema.types, strict=True))
    assert types["t"] == pa.time64("us") and types["id"] == pa.string()
    assert pa.types.is_dictionary(types["mood"]) and types["f"] == pa.float32()
    assert types["arr"].list_size == 3 and types["ts_s"] == pa.timestamp("s")
    assert types["ts_ms"] == pa.timestamp("ms") and types["ts_ns"] == pa.timestamp("ns")

    # Parquet keeps them too, but for what Parquet cannot hold: seconds become milliseconds.
    parquet = pq.read_table(io.BytesIO(server.query(MORE_TYPES_SQL, format="parquet").body))
    assert parquet.column_names == MORE_COLUMNS
    for name, typ in zip(parquet.column_names, parquet.schema.types, strict=True):
        want = pa.timestamp("ms") if name == "ts_s" else types[name]
        if pa.types.is_fixed_size_list(want):  # the child field's name is Parquet's "element"
            assert pa.types.is_fixed_size_list(typ) and typ.value_type == want.value_type, name
            assert typ.list_size == want.list_size, name
        else:
            assert typ == want, name
    assert normalized_rows(parquet) == normalized_rows(expected)  # the same instants


@pytest.mark.parametrize("fmt", ["json", "arrow", "csv", "ndjson", "parquet"])
def test_empty_result(server, fmt):
    resp = server.query("SELECT 1 AS a, 'x' AS b WHERE false", format=fmt)
    assert resp.status == 200, resp
    assert resp.headers["X-Row-Count"] == "0"
    if fmt == "json":
        assert resp.json()["data"] == [] and resp.json()["row_count"] == 0
    elif fmt == "arrow":
        table = pa.ipc.open_stream(resp.body).read_all()
        assert table.num_rows == 0 and table.column_names == ["a", "b"]
    elif fmt == "csv":
        assert resp.body.decode().splitlines() == ['"a","b"']
    elif fmt == "ndjson":
        assert resp.body == b""
    else:
        assert pq.read_table(io.BytesIO(resp.body)).num_rows == 0


MILLION = "SELECT i, i * 0.5 AS half, 'row ' || i AS label FROM range(1000000) t(i)"


def test_million_rows_every_format(server, local):
    expected = local.sql(MILLION).to_arrow_table()
    arrow = pa.ipc.open_stream(server.query(MILLION, format="arrow").body).read_all()
    assert arrow.equals(expected)

    doc = server.query(MILLION).json()
    assert doc["row_count"] == 1_000_000 == len(doc["data"])
    assert doc["data"][0] == [0, 0.0, "row 0"]
    assert doc["data"][-1] == [999_999, 499_999.5, "row 999999"]
    assert sum(row[0] for row in doc["data"]) == 999_999 * 1_000_000 // 2

    lines = server.query(MILLION, format="ndjson").body.splitlines()
    assert len(lines) == 1_000_000
    assert json.loads(lines[123_456]) == {"i": 123_456, "half": 61_728.0, "label": "row 123456"}

    rows = server.query(MILLION, format="csv").body.decode().splitlines()
    assert len(rows) == 1_000_001 and rows[-1] == '"999999","499999.5","row 999999"'

    parquet = pq.read_table(io.BytesIO(server.query(MILLION, format="parquet").body))
    assert parquet.equals(expected)


def test_parameters(server):
    resp = server.query("SELECT $1::INTEGER + 1 AS a, $2::VARCHAR AS b", params=[41, "x"])
    assert resp.json()["data"] == [[42, "x"]]


def test_csv_quoting_as_documented(server):
    """The README: every cell in double quotes, numbers and header too, inner quotes doubled;
    NULL the one unquoted (empty) cell."""
    resp = server.query("SELECT NULL::VARCHAR AS a, '' AS b, 'x\"y' AS c, 1 AS d, [1, 2] AS l",
                        format="csv")
    assert resp.body == b'"a","b","c","d","l"\n,"","x""y","1","[1,2]"\n'
