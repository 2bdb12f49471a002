"""A worker's DuckDB instances: opened with the worker's settings, the catalog loaded, locked
into the sandbox, every setting read back.

Used by the worker's main thread only (engine/worker.py). One instance holds the whole
catalog; a token limited to some databases gets one of its own, whose sandbox admits only
their directories, so what a token may read is decided by DuckDB's catalog and file checks.
A setting that does not read back as set raises: the worker then refuses to serve.
On object storage the instance loads httpfs and the storage credentials (a temporary secret,
engine/objectstore.py) before the sandbox locks, and the tables come from one listing.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from engine import catalog, config as config_mod, index, log as log_mod, objectstore, sandbox
from engine.sqltree import scalar

log = log_mod.get()
MAX_EXPRESSION_DEPTH = 300


def open_database(cfg: config_mod.Config, memory_limit: int, temp_dir: str,
                  scope: list[str] | None = None, evolved: set[str] | None = None,
                  keys: list[str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB instance: settings applied, catalog (or the scope's part) loaded, sandboxed,
    everything verified by reading it back."""
    Path(temp_dir).mkdir(mode=0o700, parents=True, exist_ok=True)  # DuckDB makes only the last level
    con = duckdb.connect(":memory:", config={
        "threads": cfg.duckdb.threads,
        "memory_limit": f"{memory_limit}B",
        "temp_directory": temp_dir,
        # Binding an expression N deep costs DuckDB's relational API about N^2.5 (300: 1 s,
        # 600: 10 s, uninterruptible); deeper is refused by its parser at once, a clear 400.
        "max_expression_depth": MAX_EXPRESSION_DEPTH,
    })
    con.execute("SET TimeZone = 'UTC'")
    # query_progress() for GET /api/v1/queries (engine/progress.py), never printed.
    con.execute("SET enable_progress_bar = true")
    con.execute("SET enable_progress_bar_print = false")
    if config_mod.is_remote(cfg.catalog.data_dir):
        objectstore.attach_storage(con, cfg.catalog.data_dir, cfg.s3)
    for statement in catalog.boot_statements(cfg.catalog, scope, evolved, keys):
        con.execute(statement)
    for statement in catalog.view_statements(cfg.catalog):
        try:
            con.execute(statement)
        except duckdb.Error:
            if scope is None:
                raise
            # The view reads a database out of this scope: it does not exist here.
    directories = [*catalog.directories(cfg.catalog, scope, keys), temp_dir]
    sandbox.apply(con, directories)
    attached = [p for name, p in cfg.catalog.databases.items() if scope is None or name in scope]
    sandbox.verify(con, directories, attached)
    remote = {name: str(value) for name, value in objectstore.CACHED.items()} \
        if config_mod.is_remote(cfg.catalog.data_dir) else {}  # as read_settings prints them
    verify_settings(con, {"threads": str(cfg.duckdb.threads), "memory_limit": memory_limit,
                          "temp_directory": temp_dir, "TimeZone": "UTC",
                          "max_expression_depth": str(MAX_EXPRESSION_DEPTH),
                          "enable_progress_bar": "True", **remote})
    return con


class Instances:
    """The worker's DuckDB instances: the whole catalog, and one per scope (a token's databases).

    Scoped instances open on first use and the least recently used is closed beyond MAX_SCOPED:
    only one query runs at a time, so an idle instance holds little memory. Main thread only.
    """

    MAX_SCOPED = 4

    def __init__(self, cfg: config_mod.Config, memory_limit: int, temp_root: Path,
                 full: duckdb.DuckDBPyConnection, version: int = 0,
                 evolved: set[str] | None = None, keys: list[str] | None = None):
        self.cfg = cfg
        self.version = version  # engine.index.catalog_version of the tables it has views for
        self.evolved = evolved  # tables read by name (several schemas); None: all of them
        self.keys = keys  # the tables, as listed on object storage; None: walk data_dir
        self.memory_limit = memory_limit
        self.temp_root = temp_root
        self.full = full
        self._scoped: dict[tuple[str, ...], tuple[duckdb.DuckDBPyConnection, Path]] = {}
        self._opened = 0

    @classmethod
    def open(cls, cfg: config_mod.Config, memory_limit: int, temp_root: Path,
             evolved: set[str] | None = None) -> "Instances":
        """`evolved` as the gateway last said; at boot, from the index file the supervisor
        built. Listed before the views are made: a table that appears meanwhile costs a
        reopen at the next query, never a wrong view."""
        data = cfg.catalog
        if evolved is None:
            evolved = index.evolved_tables(data.data_dir, data.time_column, data.index_file)
        store = index.store_for(cfg)
        keys = index.table_keys(data.data_dir, store)
        version = index.catalog_version(keys, keys if evolved is None else evolved)
        listed = keys if store is not None else None
        return cls(cfg, memory_limit, temp_root,
                   open_database(cfg, memory_limit, str(temp_root / "all"), None, evolved, listed),
                   version, evolved, listed)

    def get(self, scope: list[str] | None) -> duckdb.DuckDBPyConnection:
        if scope is None:
            return self.full
        key = tuple(sorted(set(scope)))
        if key in self._scoped:
            self._scoped[key] = self._scoped.pop(key)  # most recently used goes last
            return self._scoped[key][0]
        if len(self._scoped) >= self.MAX_SCOPED:
            self._close(next(iter(self._scoped)))
        self._opened += 1
        temp_dir = self.temp_root / f"scope-{self._opened}"
        con = open_database(self.cfg, self.memory_limit, str(temp_dir), list(key), self.evolved,
                            self.keys)
        self._scoped[key] = (con, temp_dir)
        log.info("scope_opened", databases=list(key))
        return con

    def outside_scope(self, sql: str, error: duckdb.Error) -> bool:
        """Whether a SELECT that failed to bind in a scoped instance gets further against the
        whole catalog: then it names something the scope leaves out. Binding reads no rows
        (the relation is never executed); this only chooses 403 over 400."""
        try:
            if self.full.extract_statements(sql)[0].type != duckdb.StatementType.SELECT:
                return False
            self.full.sql(sql)  # without the parameters: binding them would execute
        except duckdb.Error as exc:
            # Compare first lines: DuckDB's "Did you mean" hints differ between catalogs.
            return str(exc).partition("\n")[0] != str(error).partition("\n")[0]
        return True

    def close(self) -> None:
        for key in list(self._scoped):
            self._close(key)
        self.full.close()
        _remove_tree(self.temp_root)

    def _close(self, key) -> None:
        con, temp_dir = self._scoped.pop(key)
        con.close()
        _remove_tree(temp_dir)


def read_settings(con: duckdb.DuckDBPyConnection, names) -> dict[str, str]:
    return {name: str(scalar(con, "SELECT current_setting(?)", [name]))
            for name in names}


def verify_settings(con: duckdb.DuckDBPyConnection, expected: dict) -> dict[str, str]:
    actual = read_settings(con, expected)
    for name, want in expected.items():
        if isinstance(want, int):  # a size: DuckDB prints it as format_bytes does ("1.9 GiB")
            want = scalar(con, "SELECT format_bytes(?::BIGINT)", [want])
        if actual[name] != want:
            raise RuntimeError(f"setting {name} reads back as {actual[name]!r}, expected {want!r}")
    return actual


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink(missing_ok=True)
        path.rmdir()
