"""What a query may call: data, read by the statement policy (engine/policy.py).

Table functions are an allowlist: a query may call only those below, and anything else that
DuckDB 1.5.5 has (or a later version adds) is refused. Scalar, aggregate and window functions
are too many to list, so the few that change session state, write, wait, or reveal settings
and paths are refused by name (and any name with a refused prefix). System views that show
settings, paths or SQL text are refused by name; the rest of information_schema, pg_catalog
and DuckDB's catalog views may be read.

tests/test_allowlist.py generates its corpus from duckdb_functions() and duckdb_views(): every
table function and system view DuckDB has is in exactly one of the allowed or refused sets
here, each allowed one runs against a real fleet without revealing a path, and each refused
one is answered 403 naming it. A DuckDB upgrade that adds a function fails that test until
the function is classified here.
"""

from __future__ import annotations

# Table functions a query may call.
TABLE_FUNCTIONS = frozenset({
    # data: Parquet under data_dir (the sandbox decides which files)
    "read_parquet", "parquet_scan",
    # generators, pure
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    # the catalog, as users explore it (SHOW, DESCRIBE and SUMMARIZE bind to these internally)
    "duckdb_tables", "duckdb_columns", "duckdb_schemas", "duckdb_types", "duckdb_constraints",
    "duckdb_indexes", "duckdb_functions", "duckdb_keywords", "pragma_table_info",
    "pragma_version", "pragma_platform", "pragma_collations", "pg_timezone_names",
    "icu_calendar_names",
})

# Table functions DuckDB 1.5.5 has that are refused, and why (the reason is in the 403).
REFUSED_TABLE_FUNCTIONS = {
    **dict.fromkeys(("enable_profiling", "disable_profiling", "enable_logging", "disable_logging",
                     "truncate_duckdb_logs"), "it changes the state of a shared connection"),
    **dict.fromkeys(("checkpoint", "force_checkpoint"), "it writes"),
    **dict.fromkeys(("pandas_scan", "arrow_scan", "arrow_scan_dumb", "python_map_function"),
                    "it reads Python objects of the server"),
    **dict.fromkeys(("query", "query_table", "json_execute_serialized_sql"),
                    "it runs SQL that the policy cannot see"),
    **dict.fromkeys(("duckdb_settings", "duckdb_profiling_settings", "duckdb_temporary_files",
                     "duckdb_external_file_cache", "duckdb_extensions", "duckdb_databases",
                     "duckdb_views", "duckdb_logs", "duckdb_logs_parsed", "duckdb_log_contexts",
                     "duckdb_secrets", "duckdb_secret_types", "which_secret", "duckdb_memory",
                     "duckdb_variables", "duckdb_prepared_statements", "duckdb_dependencies",
                     "duckdb_sequences", "duckdb_optimizers", "duckdb_table_sample",
                     "duckdb_connection_count", "duckdb_approx_database_count",
                     "duckdb_coordinate_systems", "pragma_database_size", "pragma_metadata_info",
                     "pragma_storage_info", "pragma_user_agent", "pragma_show"),
                    "it reveals settings, paths, SQL text or server internals"),
    **dict.fromkeys(("read_csv", "read_csv_auto", "sniff_csv", "read_json", "read_json_auto",
                     "read_json_objects", "read_json_objects_auto", "read_ndjson",
                     "read_ndjson_auto", "read_ndjson_objects", "read_text", "read_blob",
                     "read_duckdb", "glob", "parquet_metadata", "parquet_schema",
                     "parquet_file_metadata", "parquet_kv_metadata", "parquet_full_metadata",
                     "parquet_bloom_probe", "seq_scan"),
                    "only Parquet files are read here (read_parquet)"),
    **dict.fromkeys(("histogram", "histogram_values", "summary", "test_all_types",
                     "test_vector_types"), "it is not on the allowlist"),
}

# Scalar, aggregate and window functions refused by name, and why.
REFUSED_FUNCTIONS = {
    "current_setting": "it reveals settings",
    "getenv": "it reveals the server's environment",
    "setseed": "it changes the state of a shared connection",
    "write_log": "it writes to the server's log",
    "nextval": "it changes a sequence",
    "currval": "it reads session state",
    "sleep_ms": "it holds a worker without doing work",
    "json_execute_serialized_sql": "it runs SQL that the policy cannot see",
    "parse_duckdb_log_message": "it is for the server's logs",
}
# Any function whose name starts with one of these is refused (DuckDB's own naming).
REFUSED_PREFIXES = ("enable_", "disable_", "python_", "pandas_", "arrow_")

# System views that are refused, as "schema.name": they show view SQL (absolute paths),
# attached files, settings, logs or prepared statements. Views of main and pg_catalog are also
# found without a schema.
REFUSED_VIEWS = {
    **dict.fromkeys(("main.duckdb_views", "information_schema.views", "pg_catalog.pg_views",
                     "main.sqlite_master", "main.sqlite_schema", "main.sqlite_temp_master",
                     "main.sqlite_temp_schema"),
                    "it shows view definitions, which hold server paths"),
    **dict.fromkeys(("main.duckdb_databases", "main.pragma_database_list",
                     "pg_catalog.pg_database"), "it shows the paths of attached files"),
    "pg_catalog.pg_settings": "it reveals settings",
    "main.duckdb_logs": "it shows the server's logs",
    "pg_catalog.pg_prepared_statements": "it shows session state",
}
UNQUALIFIED_SCHEMAS = ("main", "pg_catalog")  # where DuckDB finds a system view without a schema

# A quoted table name with a dot or a slash is a file, which DuckDB reads by a replacement scan
# (read_csv, read_json, read_duckdb...): it is read only if it ends so (before any .gz or .zst).
PARQUET_SUFFIX = ".parquet"
