"""HTTP routes. Each handler parses, asks the fleet, and renders; errors become JSON in
`errors_middleware`, which with render.STATUS is the only place a status code is chosen."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from engine import log as log_mod
from engine.config import Config
from engine.errors import Kind, QueryError
from gateway import render
from gateway.fleet import Fleet

FLEET = web.AppKey("fleet", Fleet)
CONFIG = web.AppKey("config", Config)
log = log_mod.get()


class QueryRequest(msgspec.Struct):
    sql: str
    format: Literal["json", "arrow", "csv", "ndjson", "parquet"] = "json"
    params: list[Any] | None = None
    timeout_ms: Annotated[int, msgspec.Meta(gt=0)] | None = None
    priority: Literal["high", "normal", "low"] | None = None  # None: the route's default


_decoder = msgspec.json.Decoder(QueryRequest)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except QueryError as exc:
        return render.error_response(exc.kind, exc.message)
    except web.HTTPRequestEntityTooLarge as exc:
        return render.error_response(Kind.TOO_LARGE, f"request body is over the limit "
                                     f"({exc.text or 'server.max_body_kb'})")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = Kind.BAD_REQUEST if exc.status < 500 else Kind.INTERNAL
        return render.error_response(kind, exc.reason, status=exc.status)
    except Exception:
        log.error("handler_failed", exc_info=True, path=request.path)
        return render.error_response(Kind.INTERNAL, "internal error")


async def parse_query(request: web.Request) -> QueryRequest:
    body = await request.read()
    try:
        query = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise QueryError(Kind.BAD_REQUEST, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise QueryError(Kind.BAD_REQUEST, f"request body is not valid JSON: {exc}") from None
    if not query.sql.strip():
        raise QueryError(Kind.BAD_REQUEST, "sql is empty")
    if "\x00" in query.sql:
        raise QueryError(Kind.BAD_REQUEST, "sql contains a NUL byte")
    return query


async def run_query(request: web.Request, fmt: str | None, priority: str) -> web.StreamResponse:
    query = await parse_query(request)
    fmt = fmt or query.format
    timeout = query.timeout_ms / 1000 if query.timeout_ms else None
    fleet = request.app[FLEET]
    for attempt in (1, 2):
        job = await fleet.submit(query.sql, fmt, query.params, timeout, query.priority or priority)
        try:
            return await render.send_result(request, job, fmt,
                                            request.app[CONFIG].results.send_timeout_s)
        except QueryError as exc:
            # Every query is a read: one that lost its worker before a byte was sent runs
            # once more elsewhere (send_result aborts the stream itself after the first byte).
            if exc.kind != Kind.WORKER_LOST or attempt == 2:
                raise
            fleet.retried += 1
            log.warning("query_retried", query_id=job.id, error=exc.message)
        finally:
            job.close()


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
    status = 200 if fleet.ready else 503
    return web.json_response({"ready": bool(fleet.ready), "workers_ready": fleet.ready},
                             status=status)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[FLEET].stats())


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/v1/query", query),
        web.post("/api/v1/query/arrow", query_arrow),
        web.get("/health", health),
        web.get("/health/live", live),
        web.get("/health/ready", ready),
        web.get("/ready", ready),
        web.get("/api/v1/stats/connections", stats),
    ]
