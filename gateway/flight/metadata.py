"""Flight SQL metadata: the result schemas of the catalog commands and the tables they answer.

Owns the exact schemas clients check (field names, types, nullability, the SqlInfo dense
union's type codes: the Go driver behind ADBC rejects anything else), duckdb's SqlInfo
values, and the building of GetCatalogs / GetDbSchemas / GetTables / GetTableTypes answers from
what the gateway's catalog describes (gateway/catalog.py `describe(scope)`: Arc tables by
database, within a token's scope). Primary and foreign keys: duckfleet has none, and XDBC type
information is not kept, so those commands answer empty tables of the right schema.

Pure functions, run on gRPC threads. A table's Arrow schema comes from the caller (the server's
private DuckDB connection casts NULL to each DuckDB type the catalog lists).
"""

from __future__ import annotations

import re

import pyarrow as pa

CATALOG = "memory"  # the workers' DuckDB database: catalog.schema.table names resolve in it
TABLE_TYPE = "TABLE"
_text = pa.utf8()


def _schema(*fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(name, typ, nullable) for name, typ, nullable in fields])


CATALOGS = _schema(("catalog_name", _text, False))
DB_SCHEMAS = _schema(("catalog_name", _text, True), ("db_schema_name", _text, False))
TABLES = _schema(("catalog_name", _text, True), ("db_schema_name", _text, True),
                 ("table_name", _text, False), ("table_type", _text, False))
TABLES_WITH_SCHEMA = TABLES.append(pa.field("table_schema", pa.binary(), False))
TABLE_TYPES = _schema(("table_type", _text, False))
PRIMARY_KEYS = _schema(("catalog_name", _text, True), ("db_schema_name", _text, True),
                       ("table_name", _text, False), ("column_name", _text, False),
                       ("key_sequence", pa.int32(), False), ("key_name", _text, True))
FOREIGN_KEYS = _schema(
    ("pk_catalog_name", _text, True), ("pk_db_schema_name", _text, True),
    ("pk_table_name", _text, False), ("pk_column_name", _text, False),
    ("fk_catalog_name", _text, True), ("fk_db_schema_name", _text, True),
    ("fk_table_name", _text, False), ("fk_column_name", _text, False),
    ("key_sequence", pa.int32(), False), ("fk_key_name", _text, True),
    ("pk_key_name", _text, True), ("update_rule", pa.uint8(), False),
    ("delete_rule", pa.uint8(), False))
XDBC_TYPE_INFO = _schema(
    ("type_name", _text, False), ("data_type", pa.int32(), False),
    ("column_size", pa.int32(), True), ("literal_prefix", _text, True),
    ("literal_suffix", _text, True),
    ("create_params", pa.list_(pa.field("item", _text, False)), True),
    ("nullable", pa.int32(), False), ("case_sensitive", pa.bool_(), False),
    ("searchable", pa.int32(), False), ("unsigned_attribute", pa.bool_(), True),
    ("fixed_prec_scale", pa.bool_(), False), ("auto_increment", pa.bool_(), True),
    ("local_type_name", _text, True), ("minimum_scale", pa.int32(), True),
    ("maximum_scale", pa.int32(), True), ("sql_data_type", pa.int32(), False),
    ("datetime_subcode", pa.int32(), True), ("num_prec_radix", pa.int32(), True),
    ("interval_precision", pa.int32(), True))
_INFO_VALUE = pa.dense_union([
    pa.field("string_value", _text), pa.field("bool_value", pa.bool_()),
    pa.field("bigint_value", pa.int64()), pa.field("int32_bitmask", pa.int32()),
    pa.field("string_list", pa.list_(_text)),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32())))],
    type_codes=[0, 1, 2, 3, 4, 5])
SQL_INFO = _schema(("info_name", pa.uint32(), False), ("value", _INFO_VALUE, True))
_STRING, _BOOL, _BIGINT, _BITMASK, _LIST = 0, 1, 2, 3, 4


def sql_info_values(version: str) -> dict[int, tuple[int, object]]:
    """SqlInfo id -> (union type code, value). JDBC drivers before 19 throw on a missing key,
    so every key of the spec's server and syntax ranges is answered."""
    values: dict[int, tuple[int, object]] = {
        0: (_STRING, "duckfleet"), 1: (_STRING, version), 2: (_STRING, pa.__version__),
        3: (_BOOL, True),            # read only
        4: (_BOOL, True),            # SQL
        5: (_BOOL, False),           # Substrait
        6: (_STRING, ""), 7: (_STRING, ""),
        8: (_BITMASK, 0),            # transactions: none
        9: (_BOOL, False),           # CancelQuery: cancel the call instead
        10: (_BOOL, False), 11: (_BOOL, False),  # bulk ingestion, and in transactions
        100: (_BITMASK, 0), 101: (_BITMASK, 0),  # handles and transactions never time out
        500: (_BOOL, False), 501: (_BOOL, False), 502: (_BOOL, False),
        503: (_BITMASK, 1),          # identifiers: case-insensitive
        504: (_STRING, '"'),
        505: (_BITMASK, 1),          # quoted ones too (DuckDB keeps their case, matches without it)
        506: (_BOOL, True),
        507: (_BITMASK, 3),          # NULLs sort at the end, ascending or descending
        508: (_LIST, []), 509: (_LIST, []), 510: (_LIST, []), 511: (_LIST, []),
        512: (_LIST, []),
        513: (_STRING, "\\"), 514: (_STRING, ""),
        515: (_BOOL, True), 516: (_BOOL, True), 518: (_BOOL, True), 519: (_BOOL, False),
        520: (_BOOL, True), 521: (_BOOL, True),
        522: (_BITMASK, 3), 523: (_BOOL, True), 524: (_BOOL, True),
        525: (_BITMASK, 3), 526: (_BITMASK, 3), 527: (_BOOL, False),
        528: (_BITMASK, 2),          # full outer joins
        529: (_STRING, "schema"), 530: (_STRING, ""), 531: (_STRING, "catalog"),
        532: (_BOOL, True),
        533: (_BITMASK, 0), 534: (_BITMASK, 0), 535: (_BITMASK, 0),
        536: (_BOOL, False), 537: (_BOOL, False),
        538: (_BITMASK, 15), 539: (_BOOL, True), 540: (_BITMASK, 3),
        556: (_BOOL, False),
        562: (_BITMASK, 0), 563: (_BOOL, False), 564: (_BITMASK, 0),
        565: (_BOOL, False), 566: (_BOOL, False),
        567: (_BITMASK, 2),          # forward-only result sets
        568: (_BITMASK, 0), 569: (_BITMASK, 2), 570: (_BITMASK, 0), 571: (_BITMASK, 0),
        572: (_BOOL, False), 573: (_BOOL, False), 574: (_BOOL, False), 575: (_BOOL, False),
        576: (_BOOL, False),
    }
    for key in range(541, 562):  # the maximum lengths and counts: 0, "no limit or unknown"
        values.setdefault(key, (_BIGINT, 0))
    return values


def sql_info_table(values: dict[int, tuple[int, object]], wanted: list[int]) -> pa.Table:
    """The rows asked for (every one if none is named; unknown ids are left out)."""
    ids = [i for i in (wanted or sorted(values)) if i in values]
    children: list[list] = [[] for _ in range(6)]
    type_ids, offsets = [], []
    for info in ids:
        code, value = values[info]
        type_ids.append(code)
        offsets.append(len(children[code]))
        children[code].append(value)
    arrays = [pa.array(items, type=_INFO_VALUE.field(code).type)
              for code, items in enumerate(children)]
    union = pa.UnionArray.from_dense(pa.array(type_ids, pa.int8()), pa.array(offsets, pa.int32()),
                                     arrays, [f.name for f in _INFO_VALUE], list(range(6)))
    return pa.Table.from_arrays([pa.array(ids, pa.uint32()), union], schema=SQL_INFO)


def like(pattern: str | None):
    """A predicate for a Flight SQL filter pattern (SQL LIKE: % and _, escaped with \\)."""
    if not pattern:
        return lambda name: True
    parts = re.findall(r"\\.|%|_|[^\\%_]+|\\", pattern)
    regex = "".join(".*" if p == "%" else "." if p == "_" else re.escape(p[-1]) if
                    p.startswith("\\") else re.escape(p) for p in parts)
    compiled = re.compile(regex, re.DOTALL)
    return lambda name: compiled.fullmatch(name) is not None


def _catalog_matches(catalog: str | None) -> bool:
    return catalog is None or catalog == CATALOG


def catalogs() -> pa.Table:
    return pa.Table.from_pylist([{"catalog_name": CATALOG}], schema=CATALOGS)


def db_schemas(described: dict, catalog: str | None, pattern: str | None) -> pa.Table:
    match = like(pattern)
    rows = [{"catalog_name": CATALOG, "db_schema_name": db["name"]}
            for db in described["databases"] if _catalog_matches(catalog) and match(db["name"])]
    return pa.Table.from_pylist(rows, schema=DB_SCHEMAS)


def tables(described: dict, command: dict, arrow_schema) -> pa.Table:
    """arrow_schema(columns): a table's Arrow schema (statements.LocalDuckDB.arrow_schema)."""
    schema_match = like(command["db_schema_filter_pattern"])
    table_match = like(command["table_name_filter_pattern"])
    types = command["table_types"]
    rows = []
    if _catalog_matches(command["catalog"]) and (not types or TABLE_TYPE in types):
        for db in described["databases"]:
            if not schema_match(db["name"]):
                continue
            for table in db["tables"]:
                if table_match(table["name"]):
                    row = {"catalog_name": CATALOG, "db_schema_name": db["name"],
                           "table_name": table["name"], "table_type": TABLE_TYPE}
                    if command["include_schema"]:
                        row["table_schema"] = arrow_schema(table["columns"]).serialize().to_pybytes()
                    rows.append(row)
    return pa.Table.from_pylist(rows, schema=TABLES_WITH_SCHEMA if command["include_schema"]
                                else TABLES)


def table_types() -> pa.Table:
    return pa.Table.from_pylist([{"table_type": TABLE_TYPE}], schema=TABLE_TYPES)
