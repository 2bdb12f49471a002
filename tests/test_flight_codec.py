"""The Flight SQL codec and error mapping, without a server (gateway/flight/codec.py, status.py)."""

import pyarrow as pa
import pyarrow.flight as fl
import pytest

from engine.errors import Kind
from gateway.flight import codec, metadata, statements
from gateway.flight.status import STATUS, flight_error


def test_round_trip_through_any():
    packed = codec.pack("CommandGetTables", catalog="memory", table_name_filter_pattern="c%",
                        table_types=["TABLE", "VIEW"], include_schema=True)
    name, body = codec.unpack(packed)
    assert name == "CommandGetTables"
    assert codec.decode(name, body) == {"catalog": "memory", "db_schema_filter_pattern": None,
                                        "table_name_filter_pattern": "c%",
                                        "table_types": ["TABLE", "VIEW"], "include_schema": True}


def test_repeated_uint_packed_and_unpacked_and_unknown_fields_skipped():
    packed = bytes([0x0A, 3, 0, 1, 2])         # info = [0, 1, 2], packed
    unpacked = bytes([0x08, 0, 0x08, 0xF4, 0x03])  # info = 0, info = 500
    field_1000 = bytes([0xC2, 0x3E, 2]) + b"xy"  # field 1000 (a two-byte tag), length-delimited
    assert codec.decode("CommandGetSqlInfo", packed)["info"] == [0, 1, 2]
    assert codec.decode("CommandGetSqlInfo", unpacked + field_1000)["info"] == [0, 500]


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\x80", b"\x0b"])
def test_malformed_bytes_are_a_codec_error(data):
    with pytest.raises(codec.CodecError):
        codec.decode("CommandStatementQuery", data)


def test_only_flight_sql_commands_unpack():
    other = codec.encode("Any", type_url="type.googleapis.com/other.Message", value=b"")
    with pytest.raises(codec.CodecError, match="not a Flight SQL command"):
        codec.unpack(other)


def test_every_kind_has_a_status():
    assert set(STATUS) == set(Kind)
    assert isinstance(flight_error(Kind.SQL_ERROR, "x"), pa.ArrowInvalid)
    assert isinstance(flight_error(Kind.OVERLOADED, "x"), fl.FlightUnavailableError)
    assert isinstance(flight_error(Kind.TIMEOUT, "x"), fl.FlightTimedOutError)
    assert isinstance(flight_error(Kind.FORBIDDEN, "x"), fl.FlightUnauthorizedError)
    assert isinstance(flight_error(Kind.UNAUTHORIZED, "x"), fl.FlightUnauthenticatedError)


def test_sql_info_has_the_dense_union_the_drivers_check():
    table = metadata.sql_info_table(metadata.sql_info_values("1"), [0, 3, 508, 9999])
    assert table.schema == metadata.SQL_INFO
    assert table.column("info_name").to_pylist() == [0, 3, 508]  # unknown ids left out
    assert table.column("value").to_pylist() == ["duckfleet", True, []]


def test_like_patterns():
    assert metadata.like("c_u%")("cpu_total") and not metadata.like("c_u")("cpus")
    assert metadata.like(r"a\_b")("a_b") and not metadata.like(r"a\_b")("axb")
    assert metadata.like(None)("anything")


def test_handles_hold_the_statement_and_one_row_of_parameters():
    handle = statements.encode_handle("SELECT $1", [41])
    assert statements.decode_handle(handle) == ("SELECT $1", [41])
    one = pa.table({"a": [1], "b": ["x"]})
    assert statements.parameters(one, 1 << 20) == [1, "x"]
    assert statements.parameters(one.slice(0, 0), 1 << 20) is None
    with pytest.raises(Exception, match="executemany"):
        statements.parameters(pa.table({"a": [1, 2]}), 1 << 20)
