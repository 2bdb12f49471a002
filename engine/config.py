"""Configuration: engine.toml, then DUCKFLEET_<SECTION>_<KEY> variables, then command-line flags.

Parsed once, in the supervisor, into frozen msgspec structs; children receive the resolved
result as JSON and decode it into the same structs, so every process sees one configuration.
Any bad file, key or value raises ConfigError naming the key, before any process is spawned.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]


class ConfigError(Exception):
    """A configuration problem, with the offending key in the message."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    unix_socket: str = ""  # also serve HTTP on this Unix socket path (sidecars)
    unix_socket_mode: Annotated[str, Meta(pattern=r"^0?[0-7]{3}$")] = "0600"  # 0660: a group too
    runtime_dir: str = ""  # parent of the private runtime directory; "" = $XDG_RUNTIME_DIR or /tmp
    max_body_kb: PositiveInt = 1024
    shutdown_grace_s: PositiveFloat = 30.0  # a graceful stop waits this long for in-flight queries
    drain_s: NonNegFloat = 0.0  # on SIGTERM, readiness says 503 and the node serves on this long
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: str = ""  # "" = stderr; reopened on SIGUSR1 (log rotation)
    slow_query_ms: NonNegFloat = 1000.0  # queries at least this long are logged; 0 logs every one
    rate_limit_per_s: NonNegFloat = 0.0  # requests a second per token (or client address); 0 = off
    rate_limit_burst: PositiveInt = 20  # how many requests a client may make at once
    # Connections (gateway/connections.py): how many, and how long a client may take.
    max_connections: PositiveInt = 4096  # open HTTP connections; past it only health is answered
    keepalive_timeout_s: PositiveFloat = 30.0  # an idle kept-alive connection is closed after this
    header_timeout_s: PositiveFloat = 10.0  # from a request's first byte to its last header line
    body_timeout_s: PositiveFloat = 30.0  # to read a request's whole body
    raise_fd_limit: bool = True  # raise the open-file limit to its hard limit at start
    console: bool = True  # the web console at / and /console (gateway/console/); false: no such routes


class WorkersConfig(_Section):
    count: NonNegInt = 0  # 0 = one per core
    boot_timeout_s: PositiveFloat = 30.0
    # Recycling: a worker is recycled after any of these (0 = never); its replacement is ready first.
    max_queries: NonNegInt = 0
    max_queries_jitter: NonNegInt = 0  # each worker's limit gets a random 0..jitter more
    max_rss_mb: NonNegInt = 0
    max_age_s: Annotated[float, Meta(ge=0)] = 0.0
    # Memory hygiene between queries.
    hygiene: bool = True
    gc_full_every: PositiveInt = 100  # queries between full collections
    trim_growth_mb: PositiveInt = 32  # RSS growth that triggers malloc_trim(0)
    reconnect_growth_mb: PositiveInt = 512  # RSS growth since connect that recreates DuckDB
    reconnect_after_rows: NonNegInt = 0  # Arc's trigger (it used 5000); 0 = off, for comparison
    # Liveness: heartbeats from the work loop.
    heartbeat_s: PositiveFloat = 1.0
    heartbeat_timeout_s: PositiveFloat = 15.0  # an idle worker silent this long is killed
    kill_grace_s: PositiveFloat = 5.0  # past query deadline (or a cancel) + cancel grace, before SIGKILL
    # Hard memory cap: a worker whose RSS passes memory_limit + rss_margin_mb while a query runs
    # is stopped at once and replaced; the query fails with out_of_memory. 0 = no cap.
    rss_margin_mb: NonNegInt = 512
    rss_check_ms: Annotated[int, Meta(ge=10, le=1000)] = 50  # how often RSS is read during a query
    crash_backoff_max_s: PositiveFloat = 8.0
    # How often a running query reports its progress (GET /api/v1/queries); 0 = never.
    progress_ms: NonNegInt = 500


class DuckDBConfig(_Section):
    memory_limit: str = "auto"  # "auto" = budget / workers, or a size such as "2GB"
    memory_fraction: Annotated[float, Meta(gt=0, le=1)] = 0.7
    threads: Annotated[int, Meta(ge=1, le=1)] = 1  # one per worker: parallelism comes from workers
    process_overhead_mb: NonNegInt = 200  # RSS of each process beside DuckDB's own memory
    force_memory_limit: bool = False  # start even if workers x limit + overhead exceeds the budget


PRIORITIES = ("high", "normal", "low")  # first served first (gateway/fleet.py)
Priority = Literal[PRIORITIES]


class QueueConfig(_Section):
    max_queue_size: PositiveInt = 256
    queue_timeout_s: PositiveFloat = 5.0
    query_timeout_s: PositiveFloat = 300.0
    cancel_grace_s: PositiveFloat = 5.0  # after an interrupt, how long a worker has to answer
    priority_aging_s: Annotated[float, Meta(ge=0)] = 2.0  # head start of each priority level
    default_priority: Priority = "normal"
    arrow_priority: Priority = "normal"  # default on /api/v1/query/arrow (bulk exports)
    quarantine_s: NonNegFloat = 300.0  # a query that crashed a worker is refused this long


class ResultsConfig(_Section):
    max_result_mb: PositiveInt = 2048
    batch_rows: PositiveInt = 122880
    chunk_mb: Annotated[int, Meta(ge=1, le=1024)] = 8  # segment size; larger results stream
    shm_budget_mb: PositiveInt = 1024  # all segments in existence, lent or idle
    shm_prealloc_mb: NonNegInt = 64  # segments allocated (pages touched) at start
    shm_idle_mb: NonNegInt = 256  # free segments kept for reuse
    stream_buffer_mb: PositiveInt = 256  # a slow client's result may wait in this much memory
    send_timeout_s: PositiveFloat = 60.0  # a client that takes no bytes for this long is dropped
    # Slow clients (gateway/spill.py, gateway/render.py, gateway/streams.py).
    spill_max_mb: NonNegInt = 4096  # results past stream_buffer_mb wait on disk, all together; 0 = off
    min_send_kbps: NonNegInt = 32  # KB (1000 bytes) a second a client must read on average; 0 = off
    max_streams_per_client: NonNegInt = 4  # streamed results a token (or address) is sent at once


class QueryCacheConfig(_Section):
    enabled: bool = False
    ttl_seconds: PositiveFloat = 60.0
    max_size: PositiveInt = 100  # entries
    max_result_mb: PositiveInt = 10  # a larger result is not cached
    max_total_mb: PositiveInt = 256  # all entries; least recently used go first
    volatile_ttl_seconds: NonNegFloat = 0.0  # now(), random()...: 0 = never cached


class AuthConfig(_Section):
    enabled: bool = False  # every route but health needs a token (engine/tokens.py)
    tokens_file: str = "tokens.json"  # hashes only; relative to engine.toml; re-read when it changes


class CatalogConfig(_Section):
    data_dir: str = "data"
    default_database: str = "default"
    time_column: str = "time"  # what pruning reads: files' min/max of it skip whole files
    index_file: str = ""  # "" = <data_dir>/.duckfleet-index; kept across restarts
    analyze_max_kb: PositiveInt = 64  # longer SQL runs as sent: not analyzed, cached or pruned
    demo: bool = True  # write the demo dataset when data_dir holds no database
    refresh_s: PositiveFloat = 10.0  # object storage: how often the file index lists the prefix
    views: dict[str, str] = {}
    databases: dict[str, str] = {}  # name -> DuckDB file, attached read-only


class S3Config(_Section):
    """Object storage, when catalog.data_dir is "s3://bucket/prefix". Empty fields are taken
    from the usual AWS_* variables at load. The secret never appears in a repr or a log."""
    endpoint: str = ""  # host:port (a scheme, http:// or https://, is accepted); "" = AWS
    region: str = ""
    url_style: Literal["path", "vhost", ""] = ""  # "" = "path" with an endpoint, else "vhost"
    use_ssl: bool = True
    key_id: str = ""
    secret: str = ""
    session_token: str = ""

    def __repr__(self) -> str:
        return (f"S3Config(endpoint={self.endpoint!r}, region={self.region!r}, "
                f"url_style={self.url_style!r}, use_ssl={self.use_ssl}, key_id={self.key_id!r}, "
                "secret=<redacted>)")


class FlightConfig(_Section):
    """Arrow Flight SQL (gRPC) in the gateway process (gateway/flight/)."""
    enabled: bool = True
    host: str = ""  # "" = server.host
    port: Port = 8815  # 0 = a free port, chosen by the supervisor and logged
    tls_cert: str = ""  # PEM files; both or neither (plain gRPC)
    tls_key: str = ""


class Config(_Section):
    server: ServerConfig = ServerConfig()
    workers: WorkersConfig = WorkersConfig()
    duckdb: DuckDBConfig = DuckDBConfig()
    queue: QueueConfig = QueueConfig()
    results: ResultsConfig = ResultsConfig()
    query_cache: QueryCacheConfig = QueryCacheConfig()
    auth: AuthConfig = AuthConfig()
    catalog: CatalogConfig = CatalogConfig()
    s3: S3Config = S3Config()
    flight: FlightConfig = FlightConfig()

    @property
    def worker_count(self) -> int:
        return self.workers.count or os.cpu_count() or 1


SECTIONS = {name: typ for name, typ in Config.__annotations__.items()}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str, key: str) -> int:
    """'2GB' -> bytes (DuckDB's units: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{key}: {text!r} is not a size such as '2GB' or '512MiB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def load(path: str | os.PathLike | None, env: dict[str, str] | None = None,
         overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read the file, apply environment and flag overrides, validate; resolve relative paths."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        base = path.resolve().parent
    for key, value in _env_overrides(os.environ if env is None else env).items():
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = value
    for section, fields in (overrides or {}).items():
        raw.setdefault(section, {}).update(fields)
    try:
        # strict=False lets environment strings such as "8000" or "true" convert to their types.
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_key(str(exc), path)) from None
    config = _resolve_paths(config, base)
    if is_remote(config.catalog.data_dir):
        config = _remote_storage(config, os.environ if env is None else env)
    if bool(config.flight.tls_cert) != bool(config.flight.tls_key):
        raise ConfigError("flight.tls_cert, flight.tls_key: set both (TLS) or neither (plain gRPC)")
    if config.duckdb.memory_limit != "auto":
        parse_size(config.duckdb.memory_limit, "duckdb.memory_limit")
    if config.server.log_file:
        config = msgspec.structs.replace(config, server=msgspec.structs.replace(
            config.server, log_file=str((base / config.server.log_file).resolve())))
    margin, overhead = config.workers.rss_margin_mb, config.duckdb.process_overhead_mb
    if 0 < margin < overhead:
        raise ConfigError(f"workers.rss_margin_mb: {margin} MiB is below duckdb.process_overhead_mb "
                          f"({overhead} MiB): a worker would pass its cap doing nothing; 0 turns "
                          "the cap off")
    results = config.results
    if results.shm_budget_mb < 2 * results.chunk_mb * config.worker_count:
        raise ConfigError(f"results.shm_budget_mb: {results.shm_budget_mb} MiB cannot hold two "
                          f"{results.chunk_mb} MiB segments for each of {config.worker_count} workers")
    return config


def _env_overrides(env: dict[str, str]) -> dict[str, str]:
    found = {}
    for name, value in env.items():
        if not name.startswith("DUCKFLEET_"):
            continue
        rest = name[len("DUCKFLEET_"):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"{name}: no config section matches (sections: {', '.join(SECTIONS)})")
        found[f"{section}.{rest[len(section) + 1:]}"] = value
    return found


def _name_key(message: str, path) -> str:
    # msgspec says "... - at `$.server.port`"; operators think in "server.port".
    message = re.sub(r" - at `\$\.?([^`]*)`", lambda m: f" (key: {m.group(1) or 'top level'})", message)
    return f"{path or 'configuration'}: {message}"


def is_remote(data_dir: str) -> bool:
    """Whether data_dir names object storage rather than a local directory."""
    return data_dir.startswith("s3://")


# [s3] fields filled from the environment when empty, as the AWS tools name them.
_AWS_ENV = {"key_id": ("AWS_ACCESS_KEY_ID",), "secret": ("AWS_SECRET_ACCESS_KEY",),
            "session_token": ("AWS_SESSION_TOKEN",), "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
            "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")}
_BUCKET = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*/?$")


def _remote_storage(config: Config, env) -> Config:
    """An s3:// data_dir: a bucket and a clean prefix, credentials from [s3] or AWS_*, and an
    index file on local disk (the bucket is read-only to us)."""
    catalog, s3 = config.catalog, config.s3
    if not _BUCKET.match(catalog.data_dir) or "/./" in catalog.data_dir + "/" \
            or "/../" in catalog.data_dir + "/":
        raise ConfigError(f"catalog.data_dir: {catalog.data_dir!r} is not s3://bucket or "
                          "s3://bucket/prefix (letters, digits, '_', '-', '.' in each part)")
    filled = {name: next((env[v] for v in names if env.get(v)), "")
              for name, names in _AWS_ENV.items() if not getattr(s3, name)}
    s3 = msgspec.structs.replace(s3, **{k: v for k, v in filled.items() if v})
    endpoint = s3.endpoint
    if endpoint.startswith(("http://", "https://")):
        scheme, _, endpoint = endpoint.partition("://")
        s3 = msgspec.structs.replace(s3, endpoint=endpoint.rstrip("/"), use_ssl=scheme == "https")
    if "/" in s3.endpoint:
        raise ConfigError(f"s3.endpoint: {s3.endpoint!r} must be host or host:port")
    if not s3.url_style:
        s3 = msgspec.structs.replace(s3, url_style="path" if s3.endpoint else "vhost")
    if not s3.region:
        s3 = msgspec.structs.replace(s3, region="us-east-1")
    data_dir = catalog.data_dir.rstrip("/")
    index_file = catalog.index_file
    if not index_file:  # one file per bucket, prefix and endpoint, in the user's cache
        cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "duckfleet"
        digest = hashlib.sha256(f"{s3.endpoint}|{data_dir}".encode()).hexdigest()[:16]
        index_file = str(cache / f"index-{digest}")
    catalog = msgspec.structs.replace(catalog, data_dir=data_dir, index_file=index_file)
    return msgspec.structs.replace(config, catalog=catalog, s3=s3)


def _resolve_paths(config: Config, base: Path) -> Config:
    catalog = config.catalog
    resolve = lambda p: str((base / p).resolve()) if p else p  # noqa: E731
    catalog = msgspec.structs.replace(
        catalog,
        data_dir=catalog.data_dir if is_remote(catalog.data_dir) else resolve(catalog.data_dir),
        index_file=resolve(catalog.index_file),
        databases={name: resolve(p) for name, p in catalog.databases.items()},
    )
    server = msgspec.structs.replace(config.server, unix_socket=resolve(config.server.unix_socket),
                                     runtime_dir=resolve(config.server.runtime_dir))
    auth = msgspec.structs.replace(config.auth, tokens_file=resolve(config.auth.tokens_file))
    flight = msgspec.structs.replace(config.flight, tls_cert=resolve(config.flight.tls_cert),
                                     tls_key=resolve(config.flight.tls_key))
    return msgspec.structs.replace(config, catalog=catalog, server=server, auth=auth, flight=flight)


def encode(config: Config) -> bytes:
    return msgspec.json.encode(config)


def decode(data: bytes) -> Config:
    return msgspec.json.decode(data, type=Config)
