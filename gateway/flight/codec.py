"""The Flight SQL wire codec: protobuf messages of `format/FlightSql.proto`, by hand.

Owns the field numbers and types of the messages duckfleet reads and writes, and their packing
in `google.protobuf.Any` (inside descriptors, tickets, action bodies and put results). Pure
functions, called on gRPC threads; no state.

Only the proto3 wire format's varint (0), 64-bit (1), length-delimited (2) and 32-bit (5) types
exist here; tags are varints (CommandStatementIngest numbers a field 1000). Unknown fields are
skipped, as protobuf does; repeated varints are accepted packed and unpacked. Malformed bytes
raise CodecError, which the server answers as INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Any

TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."


class CodecError(ValueError):
    """Bytes that are not the protobuf message they claim to be."""


# name -> {field number: (field name, kind)}; kind is "string", "bytes", "bool", "uint",
# "int", or "repeated uint" / "repeated string". Only what duckfleet reads or writes.
MESSAGES: dict[str, dict[int, tuple[str, str]]] = {
    "Any": {1: ("type_url", "string"), 2: ("value", "bytes")},
    "CommandGetSqlInfo": {1: ("info", "repeated uint")},
    "CommandGetXdbcTypeInfo": {1: ("data_type", "int")},
    "CommandGetCatalogs": {},
    "CommandGetDbSchemas": {1: ("catalog", "string"), 2: ("db_schema_filter_pattern", "string")},
    "CommandGetTables": {1: ("catalog", "string"), 2: ("db_schema_filter_pattern", "string"),
                         3: ("table_name_filter_pattern", "string"),
                         4: ("table_types", "repeated string"), 5: ("include_schema", "bool")},
    "CommandGetTableTypes": {},
    "CommandGetPrimaryKeys": {1: ("catalog", "string"), 2: ("db_schema", "string"),
                              3: ("table", "string")},
    "CommandGetExportedKeys": {1: ("catalog", "string"), 2: ("db_schema", "string"),
                               3: ("table", "string")},
    "CommandGetImportedKeys": {1: ("catalog", "string"), 2: ("db_schema", "string"),
                               3: ("table", "string")},
    "CommandGetCrossReference": {1: ("pk_catalog", "string"), 2: ("pk_db_schema", "string"),
                                 3: ("pk_table", "string"), 4: ("fk_catalog", "string"),
                                 5: ("fk_db_schema", "string"), 6: ("fk_table", "string")},
    "CommandStatementQuery": {1: ("query", "string"), 2: ("transaction_id", "bytes")},
    "TicketStatementQuery": {1: ("statement_handle", "bytes")},
    "CommandPreparedStatementQuery": {1: ("prepared_statement_handle", "bytes")},
    "CommandStatementUpdate": {1: ("query", "string"), 2: ("transaction_id", "bytes")},
    "CommandPreparedStatementUpdate": {1: ("prepared_statement_handle", "bytes")},
    "CommandStatementIngest": {},
    "CommandStatementSubstraitPlan": {},
    "ActionCreatePreparedStatementRequest": {1: ("query", "string"),
                                             2: ("transaction_id", "bytes")},
    "ActionCreatePreparedStatementResult": {1: ("prepared_statement_handle", "bytes"),
                                            2: ("dataset_schema", "bytes"),
                                            3: ("parameter_schema", "bytes"),
                                            4: ("is_update", "bool")},
    "ActionClosePreparedStatementRequest": {1: ("prepared_statement_handle", "bytes")},
    "DoPutUpdateResult": {1: ("record_count", "int")},
    "DoPutPreparedStatementResult": {1: ("prepared_statement_handle", "bytes")},
}
_WIRE = {"string": 2, "bytes": 2, "bool": 0, "uint": 0, "int": 0}


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # two's complement, as protobuf writes negative int32/int64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CodecError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def encode(name: str, **fields: Any) -> bytes:
    """The message's bytes; fields left out or at their default (0, "", False) are not written."""
    spec = {field: (number, kind) for number, (field, kind) in MESSAGES[name].items()}
    out = bytearray()
    for field, value in fields.items():
        number, kind = spec[field]
        repeated = kind.startswith("repeated ")
        for item in (value if repeated else [value]):
            kind_one = kind.removeprefix("repeated ")
            if item is None or (not repeated and not item):
                continue
            out += _varint(number << 3 | _WIRE[kind_one])
            if kind_one in ("string", "bytes"):
                raw = item.encode() if kind_one == "string" else bytes(item)
                out += _varint(len(raw)) + raw
            else:
                out += _varint(int(item))
    return bytes(out)


def decode(name: str, data: bytes) -> dict[str, Any]:
    """The message's fields by name; absent scalars are None, absent repeated fields []."""
    spec = MESSAGES[name]
    found: dict[str, Any] = {field: [] if kind.startswith("repeated ") else None
                             for field, kind in spec.values()}
    data = bytes(data)
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            raw, pos = _read_varint(data, pos)
        elif wire == 1:
            raw, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            raw, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            raw, pos = data[pos:pos + 4], pos + 4
        else:
            raise CodecError(f"{name}: unsupported wire type {wire}")
        if pos > len(data):
            raise CodecError(f"{name}: truncated field {number}")
        if number not in spec:
            continue
        field, kind = spec[number]
        found[field] = _value(name, field, kind, wire, raw, found[field])
    return found


def _value(name: str, field: str, kind: str, wire: int, raw, current):
    if kind == "repeated uint":
        if wire == 2:  # packed
            items, pos = [], 0
            while pos < len(raw):
                item, pos = _read_varint(raw, pos)
                items.append(item)
            return current + items
        return current + [raw]
    expected = _WIRE[kind.removeprefix("repeated ")]
    if wire != expected:
        raise CodecError(f"{name}.{field}: wire type {wire}, expected {expected}")
    if kind in ("string", "repeated string"):
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise CodecError(f"{name}.{field}: not UTF-8") from None
        return current + [text] if kind == "repeated string" else text
    if kind == "bytes":
        return raw
    if kind == "bool":
        return bool(raw)
    return _signed(raw) if kind == "int" else raw


def pack(name: str, **fields: Any) -> bytes:
    """The message inside a google.protobuf.Any."""
    return encode("Any", type_url=TYPE_PREFIX + name, value=encode(name, **fields))


def unpack(data: bytes) -> tuple[str, bytes]:
    """(message name, its bytes) of an Any; CodecError if it is not a Flight SQL message."""
    found = decode("Any", data)
    url = found["type_url"] or ""
    if not url.startswith(TYPE_PREFIX):
        raise CodecError(f"not a Flight SQL command (type {url[:100]!r})")
    return url[len(TYPE_PREFIX):], found["value"] or b""
