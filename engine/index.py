"""The file index: what every Parquet file of the Arc layout holds, read once from its footer.

For each file under <data_dir>/<database>/<measurement>/**: its path (relative to data_dir),
size, mtime, row count, schema (interned: files share few schemas) and the minimum and maximum
of the time column from the row-group statistics, in microseconds since the epoch (widened by
one unit of the column's resolution, so comparisons at microsecond precision stay
conservative). A file without usable statistics has no bounds: pruning always keeps it.

Who runs it: the supervisor, in a child process before anything is spawned
(`python -m engine.index`, which logs progress and writes the index file), so a server is ready
only once its index is; the gateway, which loads that file at start and keeps it current from
inotify events, or for object storage from listings (gateway/catalog.py, gateway/listing.py).
Pure and synchronous: no asyncio, no DuckDB. On object storage (`store`, engine/objectstore.py)
the walk is one listing and footers are read by range requests, several at once.

Persistence: one msgpack file (catalog.index_file, default <data_dir>/.duckfleet-index), written
to a temporary name and renamed, keyed by path, size and mtime, so a restart reads only the
footers of files that changed. A file that cannot be written (a read-only data directory) is
logged and skipped: the index is then rebuilt at each start. Dot-files and dot-directories are
never indexed (the index file itself, writers' temporary files).
"""

from __future__ import annotations

import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from engine.objectstore import Store

FORMAT = 1
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")  # databases and measurements that become tables
INDEX_NAME = ".duckfleet-index"

# Time column kinds pruning understands, and how many microseconds one stored unit spans.
_UNIT_US = {"milliseconds": 1000, "microseconds": 1, "nanoseconds": 0.001}
DAY_US = 86_400_000_000


class FileEntry(msgspec.Struct, array_like=True, frozen=True):
    path: str          # relative to data_dir, with '/'
    size: int
    mtime_ns: int
    rows: int
    schema: int        # index into Snapshot.schemas; -1: the footer could not be read
    kind: str          # time column: "timestamp", "timestamptz", "date", or "" (no bounds)
    time_min: int = 0  # microseconds since the epoch, inclusive (when kind is set)
    time_max: int = 0

    @property
    def table(self) -> str:
        """'<database>/<measurement>'."""
        return self.path.split("/", 2)[0] + "/" + self.path.split("/", 2)[1]


class Snapshot(msgspec.Struct, frozen=True):
    """What the index file holds."""
    format: int
    time_column: str
    schemas: list[list[tuple[str, str]]]  # [(column, parquet type)], as the footer says
    files: list[FileEntry]


Listing = dict[str, tuple[int, int]]  # relative path -> (size, mtime_ns)


@dataclass
class Index:
    """The live index: entries by relative path, schemas interned."""
    data_dir: Path
    time_column: str
    store: "Store | None" = None  # object storage; None: data_dir is a local directory
    rewritten: int = 0  # files seen again with another size or mtime (since this process began)
    files: dict[str, FileEntry] = field(default_factory=dict)
    schemas: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    _schema_ids: dict[tuple[tuple[str, str], ...], int] = field(default_factory=dict)

    # --- persistence ---

    @classmethod
    def load(cls, data_dir: str | Path, time_column: str, path: str | Path,
             store: "Store | None" = None) -> "Index":
        """The index file's content if it is readable and for this time column, else empty."""
        index = cls(Path(data_dir), time_column, store)
        try:
            snap = msgspec.msgpack.decode(Path(path).read_bytes(), type=Snapshot)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return index
        if snap.format != FORMAT or snap.time_column != time_column:
            return index
        index.schemas = [tuple(map(tuple, s)) for s in snap.schemas]
        index._schema_ids = {s: i for i, s in enumerate(index.schemas)}
        index.files = {f.path: f for f in snap.files}
        return index

    def save(self, path: str | Path) -> str | None:
        """Write the index file atomically; the reason it could not be written, else None."""
        path = Path(path)
        snap = Snapshot(FORMAT, self.time_column, [list(s) for s in self.schemas],
                        sorted(self.files.values(), key=lambda f: f.path))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(msgspec.msgpack.encode(snap))
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return str(exc)
        return None

    # --- keeping it current ---

    def refresh(self, progress=None, listing: Listing | None = None) -> tuple[int, int]:
        """Walk the whole layout (or take this listing of it): read new or changed footers,
        forget vanished files. Returns (footers read, files dropped)."""
        if listing is not None:
            seen = listing
        elif self.store is not None:
            seen = self.store.list()
        else:
            seen = {}
            for db in _subdirs(self.data_dir):
                for measurement in _subdirs(db):
                    _walk(measurement, self.data_dir, seen)
        return self._apply(seen, set(self.files) - set(seen), progress)

    def update(self, paths: set[str]) -> tuple[int, int]:
        """Look again at these relative paths (files or directories, as inotify named them)."""
        seen: Listing = {}
        gone: set[str] = set()
        for rel in paths:
            parts = rel.split("/")
            if any(p.startswith(".") for p in parts) or not all(NAME.match(p) for p in parts[:2]):
                continue
            full, prefix = self.data_dir / rel, rel + "/"
            if full.is_dir():
                for directory in (_subdirs(full) if len(parts) == 1 else [full]):
                    _walk(directory, self.data_dir, seen)
                gone |= {p for p in self.files if p.startswith(prefix) and p not in seen}
            elif len(parts) > 2 and _is_parquet_file(full):
                st = full.stat()
                seen[rel] = (st.st_size, st.st_mtime_ns)
            else:  # removed: a file, or a directory and everything under it
                gone |= {p for p in self.files if p == rel or p.startswith(prefix)}
        return self._apply(seen, gone)

    def _apply(self, seen: Listing, gone: set[str], progress=None):
        todo = [rel for rel, facts in seen.items()
                if (old := self.files.get(rel)) is None or (old.size, old.mtime_ns) != facts]
        self.rewritten += sum(rel in self.files for rel in todo)
        for n, (rel, meta) in enumerate(self._footers(todo), 1):
            self.files[rel] = self._entry(rel, *seen[rel], meta)
            if progress is not None and n % 1000 == 0:
                progress(n, len(todo))
        for rel in gone:
            self.files.pop(rel, None)
        return len(todo), len(gone)

    def _footers(self, rels: list[str]):
        """(rel, footer metadata or the exception that reading it raised), in order."""
        if self.store is not None:
            yield from self.store.read_many(rels)
            return
        import pyarrow.parquet as pq  # only where footers are read

        for rel in rels:
            try:
                yield rel, pq.read_metadata(self.data_dir / rel)
            except Exception as exc:  # noqa: BLE001 - being written, truncated, not Parquet
                yield rel, exc

    def _entry(self, rel: str, size: int, mtime_ns: int, meta) -> FileEntry:
        if isinstance(meta, Exception):  # no bounds: always scanned
            return FileEntry(rel, size, mtime_ns, 0, -1, "")
        schema = meta.schema
        columns = tuple((schema.column(j).path, _type_name(schema.column(j)))
                        for j in range(len(schema)))
        kind, low, high = "", 0, 0
        for j in range(len(schema)):
            if schema.column(j).path == self.time_column:
                kind, low, high = _bounds(meta, j, schema.column(j))
                break
        return FileEntry(rel, size, mtime_ns, meta.num_rows, self._intern(columns),
                         kind, low, high)

    def _intern(self, columns: tuple[tuple[str, str], ...]) -> int:
        if columns not in self._schema_ids:
            self._schema_ids[columns] = len(self.schemas)
            self.schemas.append(columns)
        return self._schema_ids[columns]

    # --- reading it ---

    def tables(self) -> dict[str, list[FileEntry]]:
        """{'<database>/<measurement>': [files, by path]}."""
        found: dict[str, list[FileEntry]] = {}
        for rel in sorted(self.files):
            entry = self.files[rel]
            found.setdefault(entry.table, []).append(entry)
        return found


def table_keys(data_dir: str | Path, store: "Store | None" = None) -> list[str]:
    """'<database>/<measurement>' of every directory pair holding at least one Parquet file:
    the tables, by the same rules the index uses (on object storage: one listing)."""
    if store is not None:
        return sorted({"/".join(rel.split("/", 2)[:2]) for rel in store.list()})
    found = []
    for db in _subdirs(Path(data_dir)):
        for measurement in _subdirs(db):
            if _any_parquet(measurement):
                found.append(f"{db.name}/{measurement.name}")
    return found


def catalog_version(keys, evolved, rewritten: int = 0) -> int:
    """A number that changes when the set of tables does, or the set of those whose files have
    more than one schema (`evolved`); workers and the gateway compute it from their own
    knowledge, so a worker knows when its views are out of date. On object storage the gateway
    also folds in how many objects it saw rewritten in place (`rewritten`): workers cache
    objects' metadata and bytes, and a new version makes them open fresh instances."""
    evolved = set(evolved)
    text = "\n".join(sorted(k + "*" * (k in evolved) for k in keys))
    return zlib.crc32((text + f"\n#{rewritten}" if rewritten else text).encode())


def evolved_tables(data_dir: str, time_column: str, index_file: str) -> set[str] | None:
    """Tables whose files have more than one schema, from the index file (None: unknown)."""
    path = default_path(data_dir, index_file)
    if not path.exists():
        return None
    index = Index.load(data_dir, time_column, path)
    return {key for key, files in index.tables().items()
            if len({f.schema for f in files if f.schema >= 0}) > 1}  # as gateway/tables.py


def _any_parquet(directory: Path) -> bool:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return False
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            if _any_parquet(Path(entry.path)):
                return True
        elif entry.name.endswith(".parquet") and entry.is_file(follow_symlinks=False):
            return True
    return False


def _subdirs(directory: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(directory)
                      if e.is_dir(follow_symlinks=False) and NAME.match(e.name))
    except OSError:
        return []


def _is_parquet_file(path: Path) -> bool:
    # A directory named x.parquet is not a file (DuckDB's logging can create one).
    return path.name.endswith(".parquet") and not path.name.startswith(".") and path.is_file()


def _walk(directory: Path, root: Path, seen: Listing) -> None:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), root, seen)
        elif entry.name.endswith(".parquet") and entry.is_file(follow_symlinks=False):
            try:
                st = entry.stat()
                seen[Path(entry.path).relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass  # gone again


def _type_name(column) -> str:
    logical = column.logical_type.type
    return logical if logical not in (None, "NONE") else column.physical_type


def _bounds(meta, j: int, column) -> tuple[str, int, int]:
    """(kind, min_us, max_us) of column j over every row group, or ('', 0, 0) if unknown."""
    logical = column.logical_type
    if logical.type == "TIMESTAMP":
        info = msgspec.json.decode(logical.to_json())
        kind = "timestamptz" if info.get("isAdjustedToUTC") else "timestamp"
        unit = _UNIT_US.get(info.get("timeUnit"))
        pad = 1 if unit is None else max(1, int(unit))  # one unit, at least a microsecond
    elif logical.type == "DATE":
        kind, unit, pad = "date", DAY_US, DAY_US
    else:
        return "", 0, 0
    if unit is None or column.physical_type not in ("INT64", "INT32") or meta.num_row_groups == 0:
        return "", 0, 0
    low = high = None
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(j).statistics
        if meta.row_group(g).num_rows == 0:
            continue
        if stats is None or not stats.has_min_max:
            return "", 0, 0
        a, b = stats.min_raw, stats.max_raw
        low = a if low is None else min(low, a)
        high = b if high is None else max(high, b)
    if low is None:  # only empty row groups: any range excludes it, keep it anyway
        return "", 0, 0
    return kind, int(low * unit) - pad, int(high * unit) + pad


def default_path(data_dir: str, index_file: str) -> Path:
    return Path(index_file) if index_file else Path(data_dir) / INDEX_NAME


def build(data_dir: str, time_column: str, index_file: str, log,
          store: "Store | None" = None) -> Index:
    """Load, refresh and save: what a start does. Progress and the outcome go to `log`."""
    path = default_path(data_dir, index_file)
    if store is not None:  # the index lives in a cache directory, not in the bucket
        path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    index = Index.load(data_dir, time_column, path, store)
    known = len(index.files)
    read, dropped = index.refresh(
        lambda n, total: log.info("index_progress", footers_read=n, of=total))
    failed = index.save(path) if (read or dropped or not path.exists()) else None
    if failed:
        log.warning("index_not_saved", path=str(path), error=failed,
                    hint="set catalog.index_file to a writable place to keep it across restarts")
    log.info("index_ready", files=len(index.files), tables=len(index.tables()),
             loaded=known, footers_read=read, dropped=dropped, path=str(path),
             seconds=round(time.monotonic() - started, 3))
    return index


def store_for(cfg) -> "Store | None":
    """The object store a configuration's data_dir names, or None for a local directory."""
    from engine.config import is_remote
    from engine.objectstore import Store

    return Store(cfg.catalog.data_dir, cfg.s3) if is_remote(cfg.catalog.data_dir) else None


def main(argv: list[str]) -> int:
    """`python -m engine.index` with the resolved configuration (JSON) on standard input: run
    by the supervisor before it spawns anything (credentials never reach a command line)."""
    from engine import config as config_mod, log as log_mod

    cfg = config_mod.decode(sys.stdin.buffer.read())
    log = log_mod.setup("index", cfg.server.log_level, cfg.server.log_file)
    catalog = cfg.catalog
    build(catalog.data_dir, catalog.time_column, catalog.index_file, log, store_for(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
