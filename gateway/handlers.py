"""HTTP routes. Each handler parses, asks the run API (gateway/run.py) or reads a component's
stats, and renders; errors become JSON in `errors_middleware`, which with render.STATUS is the
only place a status code is chosen. Query handlers note what they learn (format, rows, times)
in the request's RequestFacts for the access log and the metrics (gateway/access.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from engine import log as log_mod
from engine.config import Config, Priority
from engine.errors import Kind, QueryError
from engine.formats import FORMATS
from gateway import console, openapi, render
from gateway.access import FACTS, METRICS, client_key
from gateway.connections import Connections
from gateway.cache import QueryCache
from gateway.catalog import Catalog
from gateway.fleet import Fleet
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.run import Ask, Runner

FLEET = web.AppKey("fleet", Fleet)
CONFIG = web.AppKey("config", Config)
CACHE = web.AppKey("cache", QueryCache)
CATALOG = web.AppKey("catalog", Catalog)
CONNECTIONS = web.AppKey("connections", Connections)
RUNNER = web.AppKey("runner", Runner)
log = log_mod.get()


class QueryRequest(msgspec.Struct):
    sql: str
    format: Literal[FORMATS] = "json"
    params: list[Any] | None = None
    timeout_ms: Annotated[int, msgspec.Meta(gt=0)] | None = None
    priority: Priority | None = None  # None: the route's default
    cache: bool = True  # false: neither served from nor stored in the result cache


_decoder = msgspec.json.Decoder(QueryRequest)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except QueryError as exc:
        return _error(request, exc.kind, exc.message, headers=exc.headers)
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


def _error(request: web.Request, kind: Kind, message: str, status: int | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    request[FACTS].error_type = str(kind)
    return render.error_response(kind, message, status, headers)


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
    ask = Ask(query.sql, fmt, query.params, query.timeout_ms / 1000 if query.timeout_ms else None,
              query.priority or priority, query.cache, facts.token, facts.request_id, "http",
              client_key(request))
    async with request.app[RUNNER].run(ask) as result:
        return await render.send_result(request, result, fmt,
                                        request.app[CONFIG].results.send_timeout_s, facts)


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
    return web.json_response({**request.app[FLEET].stats(), **request.app[RUNNER].stats(),
                              "connections": request.app[CONNECTIONS].stats()})


async def queries(request: web.Request) -> web.Response:
    """What runs now (waiting, running, sending), as far as the caller's token may see."""
    running = request.app[RUNNER].running.visible(request[FACTS].token)
    return web.json_response({"queries": [activity.describe() for activity in running]})


async def cancel_query(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    count = request.app[RUNNER].running.cancel(request_id, request[FACTS].token)
    log.info("query_cancelled", request_id=request_id, queries=count,
             by=request[FACTS].request_id)
    return web.json_response({"cancelled": count})


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
    cfg = request.app[CONFIG]
    return web.json_response(openapi.document(QueryRequest, cfg.auth.enabled, cfg.server.console))


def routes(console_on: bool) -> list[web.RouteDef]:
    """Every route the gateway serves; the console's (gateway/console/) when server.console."""
    return [*(console.routes() if console_on else ()),
        web.post("/api/v1/query", query),
        web.post("/api/v1/query/arrow", query_arrow),
        web.get("/health", health),
        web.get("/health/live", live),
        web.get("/health/ready", ready),
        web.get("/ready", ready),
        web.get("/api/v1/stats/connections", stats),
        web.get("/api/v1/cache/stats", cache_stats),
        web.get("/api/v1/catalog", catalog),
        web.get("/api/v1/queries", queries),
        web.delete("/api/v1/queries/{request_id}", cancel_query),
        web.post("/api/v1/cache/clear", cache_clear),
        web.get("/api/v1/metrics", metrics_json),
        web.get("/metrics", metrics_text),
        web.get("/api/v1/openapi.json", openapi_json),
    ]
