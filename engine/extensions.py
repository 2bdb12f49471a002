"""DuckDB extensions from their pip packages (duckdb-extension-<name>): nothing is downloaded.

Used by workers and the gateway (httpfs, for object storage: engine/objectstore.py) and by the
benchmarks (tpch, quack).

Each package ships the binary at duckdb_extension_<name>/extensions/v<duckdb version>/; the
version must match the running DuckDB exactly, so a mismatch fails here with the path.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import duckdb


def extension_path(name: str) -> str:
    path = Path(str(importlib.resources.files(f"duckdb_extension_{name}"))) / "extensions" \
        / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: install duckdb-extension-{name}=={duckdb.__version__}")
    return str(path)


def load(con: duckdb.DuckDBPyConnection, *names: str) -> None:
    for name in names:
        con.load_extension(extension_path(name))
