"""HTTP routes. Each handler parses, asks the fleet, and renders; errors become JSON in
`errors_middleware`, which with render.STATUS is the only place a status code is chosen.
Query handlers note what they learn (format, rows, times) in the request's RequestFacts for
the access log and the metrics (gateway/access.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from engine import log as log_mod
from engine.config import Config
from engine.errors import Kind, QueryError
from gateway import openapi, render
from gateway.access import FACTS, METRICS
from gateway.connections import Connections
from gateway.cache import BYPASS, RETRY, CacheKey, Entry, Flight, QueryCache
from gateway.catalog import Catalog, Plan
from gateway.fleet import Fleet
from gateway.lifecycle import LIFECYCLE
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.streams import STREAMS

FLEET = web.AppKey("fleet", Fleet)
CONFIG = web.AppKey("config", Config)
CACHE = web.AppKey("cache", QueryCache)
CATALOG = web.AppKey("catalog", Catalog)
CONNECTIONS = web.AppKey("connections", Connections)
log = log_mod.get()


class QueryRequest(msgspec.Struct):
    sql: str
    format: Literal["json", "arrow", "csv", "ndjson", "parquet"] = "json"
    params: list[Any] | None = None
    timeout_ms: Annotated[int, msgspec.Meta(gt=0)] | None = None
    priority: Literal["high", "normal", "low"] | None = None  # None: the route's default
    cache: bool = True  # false: neither served from nor stored in the result cache


_decoder = msgspec.json.Decoder(QueryRequest)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except QueryError as exc:
        return _error(request, exc.kind, exc.message)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(request, Kind.TOO_LARGE, f"request body is over the limit "
                                               f"({exc.text or 'server.max_body_kb'})")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = Kind.BAD_REQUEST if exc.status < 500 else Kind.INTERNAL
        response = _error(request, kind, exc.reason, status=exc.status)
        if "Allow" in exc.headers:  # 405 says which methods the route has
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.error("handler_failed", exc_info=True, path=request.path)
        return _error(request, Kind.INTERNAL, "internal error")


def _error(request: web.Request, kind: Kind, message: str, status: int | None = None) -> web.Response:
    request[FACTS].error_type = str(kind)
    return render.error_response(kind, message, status)


async def parse_query(request: web.Request) -> QueryRequest:
    body = await request.read()
    try:
        query = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise QueryError(Kind.BAD_REQUEST, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise QueryError(Kind.BAD_REQUEST, f"request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise QueryError(Kind.BAD_REQUEST, "request body is not valid UTF-8") from None
    except RecursionError:  # params nested thousands deep
        raise QueryError(Kind.BAD_REQUEST, "request body is nested too deeply") from None
    if not query.sql.strip():
        raise QueryError(Kind.BAD_REQUEST, "sql is empty")
    if "\x00" in query.sql:
        raise QueryError(Kind.BAD_REQUEST, "sql contains a NUL byte")
    if query.params:
        try:  # they travel to the worker as msgpack, whose integers are 64-bit
            msgspec.msgpack.encode(query.params)
        except (OverflowError, msgspec.EncodeError) as exc:
            raise QueryError(Kind.BAD_REQUEST, f"params cannot be passed to DuckDB: {exc}") from None
    return query


async def run_query(request: web.Request, fmt: str | None, priority: str) -> web.StreamResponse:
    facts = request[FACTS]
    facts.format = fmt or "json"  # the route's default, so a body that does not parse counts too
    query = await parse_query(request)
    fmt = facts.format = fmt or query.format
    facts.sql = query.sql
    run = Run(request, query, fmt, priority)
    plan = await run.replan()
    cache = request.app.get(CACHE)
    if cache is None:
        return await run.execute()
    key = cache.key(plan.analysis if query.cache else None, fmt, query.params, run.databases)
    if key is None:
        return await run.execute(cache_state="bypass")
    return await run.cached(cache, key)


class Run:
    """One query request: planned (gateway/catalog.py), then executed by a worker or answered
    by the cache."""

    def __init__(self, request: web.Request, query: QueryRequest, fmt: str, priority: str):
        self.request = request
        self.query = query
        self.fmt = fmt
        self.priority = query.priority or priority
        self.facts = request[FACTS]
        self.databases = self.facts.token.databases if self.facts.token else None
        self.timeout = query.timeout_ms / 1000 if query.timeout_ms else None
        self.send_timeout = request.app[CONFIG].results.send_timeout_s
        self.plan: Plan | None = None

    async def replan(self) -> Plan:
        self.plan = await self.request.app[CATALOG].plan(self.query.sql, self.databases)
        self.facts.files_scanned = self.plan.files_scanned
        self.facts.files_pruned = self.plan.files_pruned
        return self.plan

    async def execute(self, keeper=None, cache_state: str | None = None) -> web.StreamResponse:
        fleet = self.request.app[FLEET]
        self.facts.cache = cache_state
        if (refused := fleet.quarantine.check(self.query.sql, self.query.params)) is not None:
            raise refused
        lost = 0
        for attempt in (1, 2, 3):
            job = await fleet.submit(self.plan.sql, self.fmt, self.query.params, self.timeout,
                                     self.priority, self.databases, self.plan.catalog,
                                     self.plan.evolved)
            try:
                response = await render.send_result(self.request, job, self.fmt,
                                                    self.send_timeout, keeper, cache_state)
                if job.lost:  # after the first byte: send_result cut the stream; no retry
                    await self._contain(fleet, job)
                if job.result is not None:  # timings of answered queries only
                    self.facts.rows, self.facts.execution_ms = job.result.rows, job.result.execution_ms
                    self.facts.wait_ms, self.facts.send_ms = job.wait_ms, job.send_ms
                return response
            except QueryError as exc:
                if exc.kind == Kind.SQL_ERROR:
                    exc.message = self.request.app[CATALOG].explain(self.plan, exc.message)
                if exc.kind == Kind.FILE_MISSING and attempt < 3:
                    # A file of its plan vanished (compaction): plan again from the index.
                    log.info("query_replanned", query_id=job.id, error=exc.message)
                    await self.replan()
                    continue
                # Every query is a read: one that lost its worker before a byte was sent runs
                # once more elsewhere (send_result aborts the stream itself after the first byte),
                # unless the worker died of a fault of its own: then the query killed it, and
                # would kill the next one too.
                if exc.kind != Kind.WORKER_LOST:
                    raise
                if (refusal := await self._contain(fleet, job)) is not None:
                    raise refusal from None
                lost += 1
                if lost == 2:
                    raise
                fleet.retried += 1
                log.warning("query_retried", query_id=job.id, error=exc.message)
            finally:
                job.close()

    async def _contain(self, fleet: Fleet, job) -> QueryError | None:
        """If the job's worker died of a fault of its own, quarantine the query; the error.
        Shielded: the client may be gone (a cut stream), and the query must be kept out anyway."""
        async def contain() -> QueryError | None:
            fault = await fleet.cause_of_death(job.link.pid)
            if fault is None:
                return None
            log.warning("query_killed_worker", query_id=job.id, worker=job.link.worker_id,
                        signal=fault, sql=self.query.sql[:2000])
            return fleet.quarantine.add(self.query.sql, self.query.params, fault)
        task = asyncio.ensure_future(contain())
        fleet.tasks.add(task)
        task.add_done_callback(fleet.tasks.discard)
        return await asyncio.shield(task)

    async def cached(self, cache: QueryCache, key: CacheKey) -> web.StreamResponse:
        """A hit; or wait for the same query already running; or run it, keeping the result."""
        while True:
            if (entry := cache.get(key)) is not None:
                return await self._send(entry, "hit")
            if (flight := cache.flight(key)) is None:
                break
            outcome = await self._wait(flight)
            if isinstance(outcome, Entry):
                cache.coalesced += 1
                return await self._send(outcome, "coalesced")
            if outcome is BYPASS:
                return await self.execute(cache_state="bypass")
            # RETRY: its leader left before the result; ask again (the first asker leads)
            if not self.request.app[CATALOG].current(self.plan):
                await self.replan()  # files changed while it waited: its plan may not hold
        flight, keeper = cache.lead(key)
        outcome = RETRY  # if this request is cancelled, a waiter takes over
        try:
            response = await self.execute(keeper, cache_state="miss")
            outcome = BYPASS  # unless the keeper stored an entry and landed the flight already
            return response
        except QueryError as exc:
            outcome = exc
            raise
        finally:
            keeper.give_up()
            cache.land(flight, outcome)

    async def _wait(self, flight: Flight):
        fleet = self.request.app[FLEET]
        limit = min(self.timeout or fleet.query_timeout, fleet.query_timeout)
        try:
            async with asyncio.timeout(limit + fleet.cancel_grace):
                return await flight.wait()
        except TimeoutError:
            raise QueryError(Kind.TIMEOUT, f"the same query, already running, did not finish "
                                           f"within the {limit:g} s deadline") from None

    async def _send(self, entry: Entry, state: str) -> web.StreamResponse:
        self.facts.cache, self.facts.rows, self.facts.wait_ms = state, entry.rows, 0.0
        started = time.perf_counter()
        try:
            return await render.send_entry(self.request, entry, self.fmt, state, self.send_timeout)
        finally:
            entry.unpin()
            self.facts.send_ms = (time.perf_counter() - started) * 1000


async def query(request: web.Request) -> web.StreamResponse:
    return await run_query(request, None, request.app[CONFIG].queue.default_priority)


async def query_arrow(request: web.Request) -> web.StreamResponse:
    return await run_query(request, "arrow", request.app[CONFIG].queue.arrow_priority)


async def health(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    return web.json_response({"status": "ok" if fleet.ready else "starting",
                              "workers_ready": fleet.ready})


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def ready(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    if request.app[LIFECYCLE].draining:  # SIGTERM with server.drain_s: balancers move away
        return web.json_response({"ready": False, "workers_ready": fleet.ready, "draining": True},
                                 status=503)
    status = 200 if fleet.ready else 503
    return web.json_response({"ready": bool(fleet.ready), "workers_ready": fleet.ready},
                             status=status)


async def stats(request: web.Request) -> web.Response:
    return web.json_response({**request.app[FLEET].stats(), **request.app[STREAMS].stats(),
                              "connections": request.app[CONNECTIONS].stats()})


async def cache_stats(request: web.Request) -> web.Response:
    cache = request.app.get(CACHE)
    watching = request.app[CATALOG].stats()["watching"]
    return web.json_response({**cache.stats(), "watching": watching} if cache
                             else {"enabled": False})


async def catalog(request: web.Request) -> web.Response:
    """Databases, tables, columns, files, bytes, rows and time range (within a token's scope)."""
    token = request[FACTS].token
    scope = token.databases if token is not None else None
    return web.json_response(await request.app[CATALOG].describe(scope))


async def cache_clear(request: web.Request) -> web.Response:
    """For operators: a token limited to some databases may not clear everyone's entries."""
    token = request[FACTS].token
    if token is not None and token.databases is not None:
        raise QueryError(Kind.FORBIDDEN, f"token {token.name!r} is limited to some databases; "
                                         "clearing the cache needs an unrestricted token")
    cache = request.app.get(CACHE)
    cleared = cache.clear() if cache else 0
    log.info("cache_cleared", entries=cleared, token=token.name if token else None)
    return web.json_response({"cleared": cleared})


async def metrics_text(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].text(),
                        headers={"Content-Type": METRICS_CONTENT_TYPE})


async def metrics_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[METRICS].as_json())


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(QueryRequest, request.app[CONFIG].auth.enabled))


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/v1/query", query),
        web.post("/api/v1/query/arrow", query_arrow),
        web.get("/health", health),
        web.get("/health/live", live),
        web.get("/health/ready", ready),
        web.get("/ready", ready),
        web.get("/api/v1/stats/connections", stats),
        web.get("/api/v1/cache/stats", cache_stats),
        web.get("/api/v1/catalog", catalog),
        web.post("/api/v1/cache/clear", cache_clear),
        web.get("/api/v1/metrics", metrics_json),
        web.get("/metrics", metrics_text),
        web.get("/api/v1/openapi.json", openapi_json),
    ]
