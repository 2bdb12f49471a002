"""The DuckDB sandbox: what a worker's DuckDB instance may touch once user SQL can run.

Run by the worker (engine/worker.py) on each DuckDB instance it opens, after the catalog is
loaded (binding views and attaching databases needs file access) and before any user SQL.
`apply` sets, in this order:

  allowed_directories = the catalog's data directories and the instance's temp directory,
      written with a trailing slash as DuckDB reads them back (1.5.5 adds the slash itself
      and then matches prefixes, so /srv/data never admits /srv/data2).
  enable_external_access = false: files outside allowed_directories, extensions, the network
      and Python objects are refused. At this point DuckDB itself puts the attached database
      files (and their WAL names) in allowed_paths, and nothing else.
  autoinstall_known_extensions, autoload_known_extensions, allow_community_extensions = false
  python_enable_replacements = false: no Python variable of the worker can be read as a table.
  lock_configuration = true, last: no statement can change any of the above afterwards.

DuckDB resolves '..' and symlinks before it compares a path with allowed_directories, so a
symlink inside the data directory that points out of it is refused too (tests/test_hostile.py
checks that with real files). `verify` reads every setting back, and checks that each attached
database is read-only; on any difference it raises SandboxError and the worker refuses to
serve (exit code BOOT_FAILED), exactly like its other settings.
"""

from __future__ import annotations

import duckdb

from engine.sqltree import scalar

LOCKED = {
    "enable_external_access": "false",
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
    "allow_community_extensions": "false",
    "python_enable_replacements": "false",
    "lock_configuration": "true",
}
NAMES = ["allowed_directories", "allowed_paths", *LOCKED]


class SandboxError(RuntimeError):
    """A sandbox setting did not take: the instance must not serve."""


def as_directory(path: str) -> str:
    return path.rstrip("/") + "/"


def apply(con: duckdb.DuckDBPyConnection, directories: list[str]) -> None:
    con.execute("SET allowed_directories = ?", [[as_directory(d) for d in directories]])
    for name, value in LOCKED.items():  # dict order: lock_configuration comes last
        con.execute(f"SET {name} = {value}")


def read(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Every sandbox setting as DuckDB reports it (lists as DuckDB prints them)."""
    rows = con.execute("SELECT name, value FROM duckdb_settings() WHERE list_contains(?, name)",
                       [NAMES]).fetchall()
    return dict(sorted(rows))


def verify(con: duckdb.DuckDBPyConnection, directories: list[str],
           attached: list[str]) -> dict[str, str]:
    """Read the sandbox back; raise SandboxError unless it is exactly what apply() set."""
    for name, want in LOCKED.items():
        got = str(scalar(con, "SELECT current_setting(?)", [name])).lower()
        if got != want:
            raise SandboxError(f"setting {name} reads back as {got!r}, expected {want!r}")
    allowed = scalar(con, "SELECT current_setting('allowed_directories')")
    if sorted(allowed) != sorted(as_directory(d) for d in directories):
        raise SandboxError(f"allowed_directories reads back as {allowed}, "
                           f"expected {sorted(as_directory(d) for d in directories)}")
    for path in scalar(con, "SELECT current_setting('allowed_paths')"):
        if not any(path == db or path.startswith(db + ".") for db in attached):
            raise SandboxError(f"allowed_paths holds {path!r}, which is no attached database")
    writable = con.execute("SELECT database_name FROM duckdb_databases() WHERE NOT readonly "
                           "AND NOT internal AND database_name <> 'memory'").fetchall()
    if writable:
        raise SandboxError(f"attached databases are writable: {[r[0] for r in writable]}")
    return read(con)
