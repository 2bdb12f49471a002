"""The Arrow Flight SQL server: gRPC handlers in the gateway process (`[flight]` in engine.toml).

Owns the RPCs: which Flight SQL command each call carries (gateway/flight/codec.py), what
answers it, and how every failure becomes a gRPC status (gateway/flight/status.py). pyarrow
runs each handler on a gRPC thread; queries and catalog lookups cross into the gateway's event
loop (gateway/flight/bridge.py, gateway/flight/service.py), and a cancelled call or an expired
deadline cancels its query there, which interrupts it in its worker.

- GetFlightInfo: one endpoint with no locations (clients reuse their connection; Grafana wants
  exactly one), a ticket that holds the statement (stateless: see statements.py); no schema
  for queries (clients read it from DoGet), the exact schema for catalog commands.
- DoGet: the worker's Arrow IPC stream, decoded by pyarrow's stream reader from the bytes the
  run API hands over, batch by batch, never row by row; catalog answers as small tables.
- DoAction: CreatePreparedStatement (its dataset schema from LocalDuckDB.describe_sql's query,
  run through the same queue and cache as any query, remembered until a file changes) and
  ClosePreparedStatement (nothing to free).
- DoPut: a prepared query's parameters (answered with a new handle holding them). Updates,
  ingestion and transactions: PERMISSION_DENIED or UNIMPLEMENTED, as HTTP refuses writes.

The server is started by gateway/app.py on the port the supervisor holds (engine/startup.py)
and closed before the fleet; `close` waits for calls in flight.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from importlib import metadata as importlib_metadata

import pyarrow as pa
import pyarrow.flight as fl

from engine import log as log_mod
from engine.config import Config
from engine.errors import Kind, QueryError
from gateway import render
from gateway.access import CLIENT_CLOSED, RequestFacts
from gateway.auth import TokenStore
from gateway.flight import bridge, codec, metadata, statements
from gateway.flight.auth import KEY, AcceptHandshake, TokenAuth, token_of
from gateway.flight.prepared import Started, StartedQueries
from gateway.flight.service import FlightService
from gateway.flight.status import flight_error

log = log_mod.get()
# gRPC clients refuse messages over 16 MiB by default (the Go driver behind ADBC does): a
# larger batch of the worker's (wide rows) goes out in slices of about this much (no copy).
MESSAGE_BYTES = 8 * 2**20
END_WAIT_S = 5.0  # after the last batch, for the query's own end (its rows, its error)
SCHEMA_WAIT_S = 1.0  # a prepare waits this long for a started query's schema, then describes it
SCHEMAS_KEPT = 4096
WRITES = ("CommandStatementUpdate", "CommandPreparedStatementUpdate", "CommandStatementIngest")
METADATA = {
    "CommandGetSqlInfo": metadata.SQL_INFO, "CommandGetCatalogs": metadata.CATALOGS,
    "CommandGetDbSchemas": metadata.DB_SCHEMAS, "CommandGetTableTypes": metadata.TABLE_TYPES,
    "CommandGetPrimaryKeys": metadata.PRIMARY_KEYS,
    "CommandGetExportedKeys": metadata.FOREIGN_KEYS,
    "CommandGetImportedKeys": metadata.FOREIGN_KEYS,
    "CommandGetCrossReference": metadata.FOREIGN_KEYS,
    "CommandGetXdbcTypeInfo": metadata.XDBC_TYPE_INFO,
}
# pyarrow puts a Python traceback in the status of a non-Flight exception (ArrowInvalid, our
# INVALID_ARGUMENT): the frames that raise it are given this name instead of the server's path.
FRAME_NAME = "<duckfleet flight>"


def _anonymous(function):
    function.__code__ = function.__code__.replace(co_filename=FRAME_NAME)
    return function


class Call:
    """One RPC: its context, and what its access line will say (gateway/access.py)."""

    def __init__(self, context, service: FlightService, rpc: str):
        self.context = context
        self.service = service
        self.rpc = rpc
        self.command = ""  # the Flight SQL command, once decoded
        self.facts = service.facts(token_of(context))
        self.streaming = False  # recorded when its stream ends, not when the handler returns

    def record(self, error: BaseException | None = None, sent: int = 0) -> None:
        status = 200
        if isinstance(error, QueryError):
            status, self.facts.error_type = render.STATUS[error.kind], str(error.kind)
        elif isinstance(error, fl.FlightCancelledError):
            status, self.facts.error_type = CLIENT_CLOSED, str(Kind.CANCELLED)
        elif error is not None:
            status = 500
        self.service.record(self.facts, self.rpc, self.command or self.rpc, status, sent,
                            self.context.peer())


def guarded(method):
    """Every failure of a handler as a gRPC status (a bug is logged and answered INTERNAL),
    and every call's access line (method: the RPC, as gRPC names it; path: the command)."""
    rpc = "".join(word.title() for word in method.__name__.split("_"))  # do_get: DoGet
    @functools.wraps(method)
    def handler(self, context, *args):
        call = Call(context, self.service, rpc)
        try:
            answer = method(self, call, *args)
            if not call.streaming:
                call.record()
            return answer
        except fl.FlightError as exc:
            call.record(exc)
            raise
        except QueryError as exc:
            call.record(exc)
            error = flight_error(exc.kind, exc.message)
        except codec.CodecError as exc:
            call.record(QueryError(Kind.BAD_REQUEST, str(exc)))
            error = flight_error(Kind.BAD_REQUEST, str(exc))
        except pa.ArrowNotImplementedError as exc:  # raised again here: no frame of ours in it
            call.record(QueryError(Kind.BAD_REQUEST, str(exc)))
            error = pa.ArrowNotImplementedError(str(exc))
        except Exception as exc:
            log.error("flight_handler_failed", exc_info=True, rpc=rpc)
            call.record(exc)
            error = flight_error(Kind.INTERNAL, "internal error")
        raise error from None
    return _anonymous(handler)


class FlightSqlServer(fl.FlightServerBase):
    def __init__(self, location: str, service: FlightService, loop: asyncio.AbstractEventLoop,
                 store: TokenStore | None, max_param_bytes: int, send_timeout: float,
                 tls=None):
        self.service = service
        self.send_timeout = send_timeout
        self.loop = loop
        self.max_param_bytes = max_param_bytes
        self.sql_info = metadata.sql_info_values(_version())
        self._schemas: collections.OrderedDict[tuple, tuple[tuple, pa.Schema]] = \
            collections.OrderedDict()  # statement schemas (see _describe), shared by gRPC threads
        self._lock = threading.Lock()
        self._started = StartedQueries(loop)  # queries started by a prepare, for their DoGet
        self.duckdb = statements.LocalDuckDB()
        super().__init__(location, auth_handler=AcceptHandshake(),
                         middleware={KEY: TokenAuth(store)} if store is not None else None,
                         tls_certificates=tls or [])

    def close(self) -> None:
        """Stop serving; waits for the calls in flight (so: not on the loop they need)."""
        self._started.close()
        self.shutdown()
        self.duckdb.close()

    # --- RPCs ---

    @guarded
    def get_flight_info(self, call, descriptor):
        name, body = _unpack(call, descriptor.command)
        if name in METADATA or name == "CommandGetTables":
            return self._info(descriptor, descriptor.command, self._metadata_schema(name, body))
        handle = self._handle(call, name, body)
        ticket = codec.pack("TicketStatementQuery", statement_handle=handle)
        return self._info(descriptor, ticket, None)

    @guarded
    def get_schema(self, call, descriptor):
        name, body = _unpack(call, descriptor.command)
        if name in METADATA or name == "CommandGetTables":
            return fl.SchemaResult(self._metadata_schema(name, body))
        sql, _ = statements.decode_handle(self._handle(call, name, body))
        return fl.SchemaResult(self._describe(call, sql) or pa.schema([]))

    @guarded
    def do_get(self, call, ticket):
        name, body = _unpack(call, ticket.ticket)
        if name == "TicketStatementQuery":
            handle = codec.decode(name, body)["statement_handle"] or b""
            sql, params = statements.decode_handle(handle)
            return self._stream(call, sql, params)
        if name in METADATA or name == "CommandGetTables":
            return fl.RecordBatchStream(self._metadata(call, name, body))
        raise QueryError(Kind.BAD_REQUEST, f"{name} is not a ticket of this server")

    @guarded
    def do_put(self, call, descriptor, reader, writer):
        name, body = _unpack(call, descriptor.command)
        if name != "CommandPreparedStatementQuery":
            self._refuse(name)
        handle = codec.decode(name, body)["prepared_statement_handle"] or b""
        sql, _ = statements.decode_handle(handle)
        params = statements.parameters(reader.read_all(), self.max_param_bytes)
        result = codec.encode("DoPutPreparedStatementResult",
                              prepared_statement_handle=statements.encode_handle(sql, params))
        writer.write(pa.py_buffer(result))

    @guarded
    def do_action(self, call, action):
        kind = call.command = action.type
        if kind == "CreatePreparedStatement":
            _, body = codec.unpack(action.body.to_pybytes())
            sql = codec.decode("ActionCreatePreparedStatementRequest", body)["query"] or ""
            self._may_query(call)
            schema = self._describe(call, sql, start=True)
            answer = codec.pack("ActionCreatePreparedStatementResult",
                                prepared_statement_handle=statements.encode_handle(sql, None),
                                dataset_schema=schema.serialize().to_pybytes() if schema else b"")
            return [fl.Result(pa.py_buffer(answer))]
        if kind == "ClosePreparedStatement":  # handles are stateless: only a started query
            _, body = codec.unpack(action.body.to_pybytes())
            handle = codec.decode("ActionClosePreparedStatementRequest", body)[
                "prepared_statement_handle"] or b""
            self._started.drop(_caller(call), statements.decode_handle(handle)[0])
            return []
        if kind in ("BeginTransaction", "BeginSavepoint"):
            raise QueryError(Kind.FORBIDDEN, "duckfleet is read-only: no transactions")
        raise pa.ArrowNotImplementedError(f"action {kind!r} is not supported")

    def list_actions(self, context):
        return [("CreatePreparedStatement", "prepare a query (the handle is the statement)"),
                ("ClosePreparedStatement", "release a prepared statement (nothing to free)")]

    # --- queries ---

    def _handle(self, call: Call, name: str, body: bytes) -> bytes:
        """The statement a query command names, as a handle; writes are refused."""
        if name == "CommandStatementQuery":
            self._may_query(call)
            return statements.encode_handle(codec.decode(name, body)["query"] or "", None)
        if name == "CommandPreparedStatementQuery":
            self._may_query(call)
            handle = codec.decode(name, body)["prepared_statement_handle"] or b""
            statements.decode_handle(handle)  # a bad one fails here, not at DoGet
            return handle
        self._refuse(name)

    def _refuse(self, name: str):
        if name in WRITES:
            raise QueryError(Kind.FORBIDDEN, f"duckfleet only reads: {name} is refused (an "
                                             "update, an ingestion, or executemany, which ADBC "
                                             "sends as an update); run queries with execute()")
        if name == "CommandStatementSubstraitPlan":
            raise pa.ArrowNotImplementedError("Substrait plans are not supported; send SQL")
        raise QueryError(Kind.BAD_REQUEST, f"{name} is not a command this call takes")

    def _may_query(self, call: Call) -> None:
        token = call.facts.token
        if token is not None and token.read_only:
            raise QueryError(Kind.FORBIDDEN, f"token {token.name!r} may read metadata only, "
                                             "not run queries")

    def _ask(self, call: Call, sql: str, params, facts: RequestFacts | None = None):
        if not sql.strip():
            raise QueryError(Kind.BAD_REQUEST, "sql is empty")
        if "\x00" in sql:
            raise QueryError(Kind.BAD_REQUEST, "sql contains a NUL byte")
        return self.service.ask(sql, params, facts or call.facts, call.context.peer())

    def _describe(self, call: Call, sql: str, start: bool = False) -> pa.Schema | None:
        """The schema of the statement's result; None if it cannot be had without running it
        (not a plain query, or DuckDB cannot type it with NULL parameters). Remembered per
        statement and scope until any file of the catalog changes: clients prepare every
        statement they run, and a schema costs a worker a round trip. With `start` (a
        prepare), a statement without parameters starts running, for its DoGet to take over
        (gateway/flight/prepared.py), and its first bytes tell the schema if they come within
        SCHEMA_WAIT_S."""
        token = call.facts.token
        key = (sql, tuple(token.databases) if token and token.databases else None)
        catalog = self.service.catalog
        generation = (catalog.changes, catalog.generation)  # file changes heard, and applied
        with self._lock:
            known = self._schemas.get(key)
            if known is not None and known[0] == generation:
                self._schemas.move_to_end(key)
                return known[1]
        described = self.duckdb.describe_sql(sql)
        if described is None:
            return None
        try:
            schema = self._start(call, sql, generation[0]) if start and not described[1] else None
            if schema is None:
                ask = self._ask(call, *described)
                schema = statements.schema_of(bridge.call(self.loop, call.context,
                                                          self.service.fetch(ask)))
        except QueryError as exc:
            if exc.kind == Kind.SQL_ERROR:
                return None  # the statement itself says what is wrong when it runs
            raise
        with self._lock:
            self._schemas[key] = (generation, schema)
            if len(self._schemas) > SCHEMAS_KEPT:
                self._schemas.popitem(last=False)
        return schema

    def _pipe(self, call: Call, sql: str, params, facts: RequestFacts) -> bridge.Pipe:
        """The statement's result, started: the loop pumps it into the pipe."""
        facts.sql, facts.format = sql, "arrow"
        pipe = bridge.Pipe(self.loop, call.context, self.send_timeout)
        pipe.start(self.service.pump(self._ask(call, sql, params, facts), pipe, facts))
        return pipe

    def _start(self, call: Call, sql: str, changes: int) -> pa.Schema | None:
        """Start the statement for the DoGet that follows; its schema, if its first bytes come
        within SCHEMA_WAIT_S (else it keeps running, and None)."""
        facts = self.service.facts(call.facts.token)
        pipe = self._pipe(call, sql, None, facts)
        started = Started(pipe, facts, changes)
        if pipe.started(SCHEMA_WAIT_S):
            started.reader = _open(pipe, call.context)
        self._started.put(_caller(call), sql, started)
        return started.reader.schema if started.reader is not None else None

    def _stream(self, call: Call, sql: str, params):
        self._may_query(call)
        started = None if params else self._started.take(_caller(call), sql,
                                                         self.service.catalog.changes)
        if started is not None:  # begun by its prepare: this call reads it, and records it
            call.facts, pipe, reader = started.facts, started.pipe, started.reader
            pipe.adopt(call.context)
        else:
            pipe, reader = self._pipe(call, sql, params, call.facts), None
        if reader is None:
            reader = _open(pipe, call.context)
        call.streaming = True
        batches = _batches(reader, pipe, call)
        if _has_dictionary(reader.schema.types):
            # pyarrow's GeneratorStream sends no dictionary batches (clients then refuse the
            # stream); RecordBatchStream does, but a Flight error raised midway reaches the
            # client as UNKNOWN (its message still names the kind)
            return fl.RecordBatchStream(pa.RecordBatchReader.from_batches(reader.schema, batches))
        return fl.GeneratorStream(reader.schema, batches)

    # --- catalog ---

    def _metadata_schema(self, name: str, body: bytes) -> pa.Schema:
        if name == "CommandGetTables":
            include = codec.decode(name, body)["include_schema"]
            return metadata.TABLES_WITH_SCHEMA if include else metadata.TABLES
        return METADATA[name]

    def _metadata(self, call: Call, name: str, body: bytes) -> pa.Table:
        command = codec.decode(name, body) if codec.MESSAGES[name] else {}
        if name == "CommandGetSqlInfo":
            return metadata.sql_info_table(self.sql_info, command["info"])
        if name == "CommandGetCatalogs":
            return metadata.catalogs()
        if name == "CommandGetTableTypes":
            return metadata.table_types()
        if name in ("CommandGetDbSchemas", "CommandGetTables"):
            described = bridge.call(self.loop, call.context,
                                    self.service.describe(call.facts.token))
            if name == "CommandGetDbSchemas":
                return metadata.db_schemas(described, command["catalog"],
                                           command["db_schema_filter_pattern"])
            return metadata.tables(described, command, self.duckdb.arrow_schema)
        return METADATA[name].empty_table()  # keys (duckfleet has none), XDBC type info

    @staticmethod
    def _info(descriptor, ticket: bytes, schema: pa.Schema | None) -> fl.FlightInfo:
        return fl.FlightInfo(schema, descriptor, [fl.FlightEndpoint(ticket, [])], -1, -1)


def _caller(call: Call) -> tuple:
    """One client connection with one token."""
    token = call.facts.token
    return call.context.peer(), token.name if token is not None else None


def _unpack(call: Call, data) -> tuple[str, bytes]:
    name, body = codec.unpack(data)
    call.command = name
    return name, body


@_anonymous
def _batches(reader: pa.RecordBatchStreamReader, pipe: bridge.Pipe, call: Call):
    """The result's batches as pyarrow decodes them; the query's error, if it failed midway.
    Closed early (the client went away), it cancels the query. Its end is the call's end."""
    failed = False
    try:
        for batch in reader:
            parts = -(-batch.nbytes // MESSAGE_BYTES)
            if parts <= 1:
                yield batch
                continue
            step = -(-batch.num_rows // parts)
            for start in range(0, batch.num_rows, step):
                yield batch.slice(start, step)
        pipe.ended(END_WAIT_S)
    except Exception:
        failed = True  # the stream ended early: the pipe or the call says why
    except GeneratorExit:
        call.record(fl.FlightCancelledError("the client went away"), pipe.bytes)
        raise
    finally:
        pipe.cancel()
    failure = _stream_failure(pipe, call.context)
    if failure is None and failed:
        failure = QueryError(Kind.INTERNAL, "the result stream could not be read")
    call.record(failure, pipe.bytes)
    if isinstance(failure, QueryError):
        failure = flight_error(failure.kind, failure.message)
    if failure is not None:
        raise failure from None


def _open(pipe: bridge.Pipe, context) -> pa.RecordBatchStreamReader:
    """The result's stream reader; it waits for the first bytes, so errors come first: the
    query's, or the call's cancellation (the query is cancelled either way)."""
    try:
        return pa.ipc.open_stream(pipe)
    except Exception:
        pipe.cancel()
        if (failure := _stream_failure(pipe, context)) is not None:
            raise failure from None
        raise


def _has_dictionary(types) -> bool:
    return any(pa.types.is_dictionary(t) or _has_dictionary(
        [t.field(i).type for i in range(t.num_fields)]) for t in types)


def _stream_failure(pipe: bridge.Pipe, context) -> Exception | None:
    """Why a result stream ended early: the query's error, or the call's cancellation."""
    if isinstance(pipe.error, QueryError):
        return pipe.error
    if context.is_cancelled():
        return fl.FlightCancelledError("the call was cancelled")
    return None


def _version() -> str:
    try:
        return importlib_metadata.version("duckfleet")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def start(cfg: Config, port: int, service: FlightService,
          loop: asyncio.AbstractEventLoop) -> FlightSqlServer:
    """Listen on [flight] host and the port the supervisor holds (gateway/app.py calls this)."""
    flight = cfg.flight
    host = flight.host or cfg.server.host
    if ":" in host:
        host = f"[{host}]"
    tls = []
    if flight.tls_cert:
        with open(flight.tls_cert, "rb") as cert, open(flight.tls_key, "rb") as key:
            tls = [(cert.read(), key.read())]
    store = TokenStore(cfg.auth.tokens_file) if cfg.auth.enabled else None
    return FlightSqlServer(f"{'grpc+tls' if tls else 'grpc'}://{host}:{port}", service, loop,
                           store, cfg.server.max_body_kb * 1024, cfg.results.send_timeout_s,
                           tls)
