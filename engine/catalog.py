"""The catalog: Arc's Parquet layout, configured views and attached DuckDB files, as SQL.

Pure: builds the statements a worker runs at boot, before any user SQL. Layout under data_dir:
<database>/<measurement>/YYYY/MM/DD/HH/*.parquet. Each database becomes a schema holding one
view per measurement; the default database comes first on the search path, so `cpu` and
`"default".cpu` name the same table (DuckDB reserves the word default, hence the quotes).
Views read the file list at query time, so new files are visible to the next query. A table
whose files have more than one schema (`evolved`, from the file index) is read by name
(union_by_name): it is the union of its files' columns as its schema grows. That costs a read
of every file's footer when the view is made, so tables of one schema are read without it.
Which directories are tables is decided by engine/index.py's rules (a directory named
x.parquet is not a file); on object storage (data_dir "s3://bucket/prefix") the caller lists
the prefix and passes the table keys. Queries the gateway prunes read explicit file lists.

A worker may also load a part of the catalog: only the given databases (Arc databases and
attached ones, by name), for a token limited to them. `directories` then names only those
databases' directories, which become the instance's sandbox (engine/sandbox.py), so nothing
else under data_dir can be read by any route, views or table functions alike.
"""

from __future__ import annotations

from engine.config import CatalogConfig
from engine.index import table_keys
from engine.sqltree import literal


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def databases(data_dir: str, keys: list[str] | None = None) -> dict[str, list[str]]:
    """{database: [measurement, ...]} for every directory pair with a valid name (or for these
    '<database>/<measurement>' keys, listed by the caller)."""
    found: dict[str, list[str]] = {}
    for key in table_keys(data_dir) if keys is None else keys:
        db, measurement = key.split("/")
        found.setdefault(db, []).append(measurement)
    return found


def _in_scope(name: str, scope: list[str] | None) -> bool:
    return scope is None or name in scope


def directories(catalog: CatalogConfig, scope: list[str] | None = None,
                keys: list[str] | None = None) -> list[str]:
    """The data directories a DuckDB instance loaded with this scope may read."""
    if scope is None:
        return [catalog.data_dir]
    return [f"{catalog.data_dir}/{db}" for db in databases(catalog.data_dir, keys) if db in scope]


def boot_statements(catalog: CatalogConfig, scope: list[str] | None = None,
                    evolved: set[str] | None = None, keys: list[str] | None = None) -> list[str]:
    """Schemas, views and attachments of the databases in scope (None: all), and the search
    path. `evolved`: '<database>/<measurement>' of tables with several schemas (None: any);
    `keys`: the tables, when the caller listed them (object storage)."""
    statements = []
    found = {db: m for db, m in databases(catalog.data_dir, keys).items() if _in_scope(db, scope)}
    for db, measurements in found.items():
        statements.append(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(db)}")
        for m in measurements:
            files = f"{catalog.data_dir}/{db}/{m}/**/*.parquet"
            by_name = ", union_by_name = true" if evolved is None or f"{db}/{m}" in evolved else ""
            statements.append(f"CREATE VIEW {quote_ident(db)}.{quote_ident(m)} AS "
                              f"SELECT * FROM read_parquet({literal(files)}{by_name})")
    for name, path in catalog.databases.items():
        if _in_scope(name, scope):
            statements.append(f"ATTACH {literal(path)} AS {quote_ident(name)} (READ_ONLY)")
    search = [catalog.default_database] if catalog.default_database in found else []
    statements.append(f"SET search_path = {literal(','.join([*search, 'main']))}")
    return statements


def view_statements(catalog: CatalogConfig) -> list[str]:
    """The configured views; DuckDB binds each as it is created, so one over a database out of
    scope fails to create (the worker then leaves it out of that scope)."""
    return [f"CREATE VIEW main.{quote_ident(name)} AS {sql}" for name, sql in catalog.views.items()]
