"""The catalog: Arc's Parquet layout, configured views and attached DuckDB files, as SQL.

Pure: builds the statements a worker runs at boot, before any user SQL. Layout under data_dir:
<database>/<measurement>/YYYY/MM/DD/HH/*.parquet. Each database becomes a schema holding one
view per measurement; the default database comes first on the search path, so `cpu` and
`"default".cpu` name the same table (DuckDB reserves the word default, hence the quotes).
Views read the file list at query time, so new files are visible to the next query.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.config import CatalogConfig

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def databases(data_dir: str) -> dict[str, list[str]]:
    """{database: [measurement, ...]} for every directory pair with a valid name."""
    root = Path(data_dir)
    if not root.is_dir():
        return {}
    found = {}
    for db in sorted(p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)):
        measurements = sorted(m.name for m in db.iterdir() if m.is_dir() and NAME.match(m.name)
                              and next(m.rglob("*.parquet"), None) is not None)
        if measurements:
            found[db.name] = measurements
    return found


def boot_statements(catalog: CatalogConfig) -> list[str]:
    statements = []
    found = databases(catalog.data_dir)
    for db, measurements in found.items():
        statements.append(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(db)}")
        for m in measurements:
            files = str(Path(catalog.data_dir, db, m)) + "/**/*.parquet"
            statements.append(f"CREATE VIEW {quote_ident(db)}.{quote_ident(m)} AS "
                              f"SELECT * FROM read_parquet({_literal(files)})")
    for name, path in catalog.databases.items():
        statements.append(f"ATTACH {_literal(path)} AS {quote_ident(name)} (READ_ONLY)")
    search = [catalog.default_database] if catalog.default_database in found else []
    statements.append(f"SET search_path = {_literal(','.join([*search, 'main']))}")
    for name, sql in catalog.views.items():
        statements.append(f"CREATE VIEW main.{quote_ident(name)} AS {sql}")
    return statements
