"""Object storage as the data directory: `catalog.data_dir = "s3://bucket/prefix"`.

Owns three things, each used where the local directory's equivalent is:
  - listing and footers for the file index (engine/index.py, gateway/listing.py): pyarrow's
    S3 file system (pyarrow is a dependency already), one paged LIST of the prefix giving every
    object's size and modification time, and Parquet footers read by range requests;
  - DuckDB's access (engine/instances.py, gateway/catalog.py): the httpfs extension, loaded
    from its pip package before the sandbox locks, and the credentials as a temporary secret
    scoped to the prefix (DuckDB shows it redacted, and no query may list secrets anyway);
  - the guard on remote paths in user SQL (engine/policy.py): `check_url`.

DuckDB's allowed_directories compares the URL's text with the prefix, and the server behind
it normalises paths: `s3://bucket/prefix/../other/x` passes DuckDB's check and reads another
bucket, `?s3_endpoint=host` sends the signed request to another host. So every remote path a
query names must be under the prefix, in plain segments: no dot segments, no percent escapes,
no query string, no other scheme. Keys that do not follow that rule are not indexed either.
Pure functions and small helpers; nothing here runs at import.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import duckdb

from engine.config import S3Config
from engine.extensions import extension_path
from engine.errors import Kind, QueryError
from engine.sqltree import literal

SECRET_NAME = "duckfleet_storage"
# Objects are immutable in Arc's layout (new data, new keys; compaction writes new keys and
# deletes old ones), so an instance keeps what it learnt of each: its size and date (no HEAD
# per object per query) and, in DuckDB's external file cache, its bytes. A warm panel over 24
# objects took 5 ms instead of 70 ms here. A key rewritten in place is caught by the gateway's
# listing, which then has every worker open fresh instances (engine/index.catalog_version).
CACHED = {"enable_http_metadata_cache": True, "enable_external_file_cache": True}
# One path segment under the prefix: what Arc writes, and DuckDB's glob stars.
_SEGMENT = re.compile(r"^[A-Za-z0-9_\-*=][A-Za-z0-9_.\-*=]*$")
FOOTER_THREADS = 8  # footers are read by range requests: latency-bound, not CPU-bound
SCHEMES = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")  # anything that names a file system


def split(data_dir: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, prefix = data_dir[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def safe_relative(rel: str) -> bool:
    """Whether a key below the prefix is plain segments that no server normalises away."""
    return all(_SEGMENT.match(part) and part not in (".", "..") for part in rel.split("/"))


def check_url(path: str, data_dir: str) -> None:
    """Refuse (403) a path that names anything but plain objects under data_dir's prefix. Used
    for every string a query hands a file reader; local paths are DuckDB's sandbox's to judge."""
    looks_remote = bool(SCHEMES.match(path)) or "://" in path or path.startswith("//")
    if not looks_remote:
        return
    root = data_dir.rstrip("/") + "/"
    if path.startswith(root) and safe_relative(path[len(root):]):
        return
    raise QueryError(Kind.FORBIDDEN, f"reading {path[:200]!r} is not allowed: only objects under "
                                     f"the data directory, named by plain path segments (no "
                                     "'.', '..', '%', '?', '#' or other schemes and hosts)")


# --- listing and footers (pyarrow) ---

def filesystem(s3: S3Config):
    import pyarrow.fs as pafs  # only where storage is listed or footers are read

    return pafs.S3FileSystem(
        access_key=s3.key_id or None, secret_key=s3.secret or None,
        session_token=s3.session_token or None, region=s3.region or None,
        endpoint_override=s3.endpoint or None, scheme="https" if s3.use_ssl else "http",
        force_virtual_addressing=s3.url_style == "vhost", anonymous=not s3.key_id,
        connect_timeout=5, request_timeout=30)


class Store:
    """One data directory on object storage: list it, read footers."""

    def __init__(self, data_dir: str, s3: S3Config):
        self.data_dir = data_dir.rstrip("/")
        self.bucket, self.prefix = split(self.data_dir)
        self.s3 = s3
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:
            self._fs = filesystem(self.s3)
        return self._fs

    def _base(self) -> str:
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def list(self) -> dict[str, tuple[int, int]]:
        """{relative key: (size, mtime_ns)} of every Parquet object of the layout
        (<database>/<measurement>/...): one paged LIST. Dot-names and unsafe keys are skipped."""
        import pyarrow.fs as pafs

        from engine.index import NAME  # the layout's rules, in one place

        base = self._base()
        found = {}
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise OSError(f"cannot list {self.data_dir}: {exc}") from None
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            rel = info.path[len(base) + 1:]
            parts = rel.split("/")
            if len(parts) < 3 or not (NAME.match(parts[0]) and NAME.match(parts[1])) \
                    or any(p.startswith(".") for p in parts) or not safe_relative(rel):
                continue
            found[rel] = (info.size, info.mtime_ns or 0)
        return found

    def read_metadata(self, rel: str):
        import pyarrow.parquet as pq

        return pq.read_metadata(f"{self._base()}/{rel}", filesystem=self.fs)

    def read_many(self, rels: list[str]):
        """Footers of many objects at once (range requests wait on the network): yields
        (rel, metadata or the exception) in the order given."""
        def one(rel):
            try:
                return rel, self.read_metadata(rel)
            except Exception as exc:  # noqa: BLE001 - being written, not Parquet: no bounds
                return rel, exc
        with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="footers") as pool:
            yield from pool.map(one, rels)


# --- DuckDB ---

def attach_storage(con: duckdb.DuckDBPyConnection, data_dir: str, s3: S3Config) -> None:
    """httpfs and the credentials, before the sandbox locks (the lock forbids both after)."""
    con.load_extension(extension_path("httpfs"))
    fields = {"SCOPE": data_dir.rstrip("/") + "/", "REGION": s3.region,
              "URL_STYLE": s3.url_style, "ENDPOINT": s3.endpoint}
    if s3.key_id:
        fields.update(KEY_ID=s3.key_id, SECRET=s3.secret)
    if s3.session_token:
        fields["SESSION_TOKEN"] = s3.session_token
    options = ", ".join(f"{k} {literal(v)}" for k, v in fields.items() if v)
    con.execute(f"CREATE TEMPORARY SECRET {SECRET_NAME} (TYPE s3, {options}, "
                f"USE_SSL {'true' if s3.use_ssl else 'false'})")
    for name, value in CACHED.items():
        con.execute(f"SET {name} = {str(value).lower()}")
