"""The OpenAPI 3.1 document served at GET /api/v1/openapi.json.

Pure: `document()` builds it from the request struct (its JSON schema comes from msgspec, so
the document and the parser cannot drift apart) and from whether auth is on (then every route
but health and the console lists the three ways to present a token) and whether the console is
on (its page and files are described too). tests/test_observability.py checks that every route
the app serves is described, and runs a bounded property-based test
(schemathesis) against a live server: no 5xx, and every response matches this document.
"""

from __future__ import annotations

import msgspec

from engine.errors import Kind
from engine.formats import FORMATS, MEDIA_TYPES
from gateway import console
from gateway.auth import OPEN_PATHS, needs_token

REF = "#/components/schemas/{name}"
_HEADER = {"schema": {"type": "string"}}


def _ref(name: str) -> dict:
    return {"$ref": REF.format(name=name)}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = {name: {"description": text, **_HEADER} for name, text in headers.items()}
    return response


def _error(description: str, headers: dict | None = None) -> dict:
    return _json(_ref("Error"), description, headers)


RETRY = {"Retry-After": "seconds to wait before retrying"}
UNAUTHORIZED = _error("no token, or not a valid one", {"WWW-Authenticate": "Bearer"})
RATE_LIMITED = _error("over the token's (or client's) request rate", RETRY)

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["success", "error", "error_type"],
        "properties": {
            "success": {"const": False},
            "error": {"type": "string"},
            "error_type": {"enum": [str(kind) for kind in Kind]},
        },
    },
    "QueryResult": {
        "type": "object",
        "required": ["success", "columns", "data", "row_count", "execution_time_ms",
                     "wait_time_ms", "timestamp", "error"],
        "properties": {
            "success": {"const": True},
            "columns": {"type": "array", "items": {"type": "string"}},
            "data": {"type": "array", "items": {"type": "array"}},
            "row_count": {"type": "integer", "minimum": 0},
            "execution_time_ms": {"type": "number"},
            "wait_time_ms": {"type": "number"},
            "timestamp": {"type": "string"},
            "error": {"type": "null"},
        },
    },
    "Health": {
        "type": "object", "required": ["status", "workers_ready"],
        "properties": {"status": {"enum": ["ok", "starting"]},
                       "workers_ready": {"type": "integer", "minimum": 0}},
    },
    "Live": {"type": "object", "required": ["status"], "properties": {"status": {"const": "alive"}}},
    "Ready": {
        "type": "object", "required": ["ready", "workers_ready"],
        "properties": {"ready": {"type": "boolean"},
                       "workers_ready": {"type": "integer", "minimum": 0}},
    },
    "Stats": {
        "type": "object",
        "required": ["worker_count", "busy", "idle", "queued", "served", "recycled", "crashed",
                     "timeouts", "workers"],
        "properties": {
            **{name: {"type": "integer", "minimum": 0} for name in (
                "worker_count", "busy", "idle", "queued", "served", "recycled", "crashed",
                "timeouts", "shm_segments_in_use", "shm_segments_idle")},
            "workers": {"type": "array", "items": {
                "type": "object", "required": ["id", "pid", "state", "served", "rss_bytes"],
                "properties": {"id": {"type": "integer"}, "pid": {"type": "integer"},
                               "state": {"type": "string"},
                               "served": {"type": "integer", "minimum": 0},
                               "rss_bytes": {"type": ["integer", "null"]},
                               "memory_limit": {"type": "integer"}}}},
        },
    },
    "CacheStats": {
        "type": "object", "required": ["enabled"],
        "properties": {
            "enabled": {"type": "boolean"},
            **{name: {"type": "integer", "minimum": 0} for name in (
                "entries", "bytes", "hits", "misses", "coalesced", "bypassed", "hit_bytes",
                "evicted", "in_flight")},
            "evicted_by_reason": {"type": "object",
                                  "additionalProperties": {"type": "integer", "minimum": 0}},
        },
    },
    "Catalog": {
        "type": "object", "required": ["databases", "time_column", "default_database"],
        "properties": {
            "time_column": {"type": "string"},
            "default_database": {"type": "string",
                                 "description": "the database whose tables need no prefix"},
            "databases": {"type": "array", "items": {
                "type": "object", "required": ["name", "tables"],
                "properties": {"name": {"type": "string"}, "tables": {"type": "array", "items": {
                    "type": "object",
                    "required": ["name", "files", "bytes", "rows", "columns", "time_min", "time_max"],
                    "properties": {
                        "name": {"type": "string"},
                        **{n: {"type": "integer", "minimum": 0} for n in ("files", "bytes", "rows")},
                        "columns": {"type": "array", "items": {
                            "type": "object", "required": ["name", "type"],
                            "properties": {"name": {"type": "string"}, "type": {"type": "string"}}}},
                        "time_column": {"type": ["string", "null"]},
                        "time_min": {"type": ["string", "null"]},
                        "time_max": {"type": ["string", "null"]},
                        "error": {"type": "string"}}}}}}},
        },
    },
    "Queries": {
        "type": "object", "required": ["queries"],
        "properties": {"queries": {"type": "array", "items": {
            "type": "object",
            "required": ["request_id", "route", "token", "priority", "state", "worker",
                         "elapsed_ms", "rows", "sent_bytes", "progress", "sql"],
            "properties": {
                "request_id": {"type": "string"}, "route": {"type": "string"},
                "token": {"type": ["string", "null"]}, "priority": {"type": "string"},
                "state": {"enum": ["waiting", "running", "sending"]},
                "worker": {"type": ["integer", "null"]},
                "elapsed_ms": {"type": "number", "minimum": 0},
                "rows": {"type": ["integer", "null"]},
                "sent_bytes": {"type": "integer", "minimum": 0},
                "progress": {"type": ["number", "null"],
                             "description": "DuckDB's estimate, percent; null when unknown"},
                "sql": {"type": "string", "description": "its first 200 characters"}}}}},
    },
    "Cancelled": {"type": "object", "required": ["cancelled"],
                  "properties": {"cancelled": {"type": "integer", "minimum": 1}}},
    "CacheCleared": {"type": "object", "required": ["cleared"],
                     "properties": {"cleared": {"type": "integer", "minimum": 0}}},
    "Metrics": {
        "description": "Every Prometheus sample by name: a number; a list of labelled values; "
                       "or, for a histogram, its count, sum and cumulative buckets.",
        "type": "object",
        "additionalProperties": {"anyOf": [
            {"type": "number"},
            {"type": "array", "items": {
                "type": "object", "required": ["labels", "value"],
                "properties": {"labels": {"type": "object",
                                          "additionalProperties": {"type": "string"}},
                               "value": {"type": "number"}}}},
            {"type": "object", "required": ["count", "sum", "buckets"],
             "properties": {"count": {"type": "number"}, "sum": {"type": "number"},
                            "buckets": {"type": "object",
                                        "additionalProperties": {"type": "number"}}}},
        ]},
    },
}


EXAMPLES = {
    **{fmt: {"value": {"sql": "SELECT 42 AS answer, 'duck' AS name", "format": fmt}}
       for fmt in FORMATS},
    "params": {"value": {"sql": "SELECT $1::INTEGER + 1 AS n", "params": [41], "timeout_ms": 5000}},
    "forbidden": {"value": {"sql": "DROP TABLE t"}},
}


def _query_operation(summary: str, formats: list[str]) -> dict:
    result_headers = {"X-Row-Count": "rows in the result", "X-Execution-Time-Ms": "worker time",
                      "X-Wait-Time-Ms": "time spent waiting for a worker",
                      "X-Cache": "with the cache on: hit, miss, coalesced or bypass",
                      "Age": "seconds since a cached result was computed",
                      "X-Files-Scanned": "Parquet files of Arc tables the query reads",
                      "X-Files-Pruned": "files of those tables that pruning spared"}
    content = {}
    for fmt in formats:
        media = MEDIA_TYPES[fmt].split(";")[0]
        content[media] = {"schema": _ref("QueryResult") if fmt == "json"
                          else {"type": "string", "format": "binary"}}
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _ref("QueryRequest"), "examples": EXAMPLES}}},
        "responses": {
            "200": {"description": "the result", "content": content,
                    "headers": {n: {"description": t, **_HEADER} for n, t in result_headers.items()}},
            "400": _error("malformed body, wrong field types, SQL that DuckDB rejects, or a query "
                          "quarantined because it crashed a worker"),
            "403": _error("not one read statement, a file outside the sandbox, "
                          "or a database or route the token may not use"),
            "413": _error("the body or the result is over its limit"),
            "409": _error("an operator cancelled the query"),
            "503": _error("overloaded (queue full or no worker in time) or the worker died", RETRY),
            "504": _error("the query ran past its deadline"),
        },
    }


def _get(summary: str, response: dict) -> dict:
    return {"summary": summary, "responses": {"200": response}}


def _console_paths() -> dict:
    """The console's page and the files it loads (gateway/console/); they need no token."""
    def served(summary: str, media: str) -> dict:
        return {"get": _get(summary, {"description": summary, "content": {
            media.split(";")[0]: {"schema": {"type": "string"}}}})}
    return {**{path: served("the web console's page", "text/html") for path in console.PAGE_PATHS},
            **{f"/console/{name}": served(f"the console's {name}", media)
               for name, media in console.ASSETS.items()}}


def document(request_struct: type, auth_enabled: bool, console_on: bool) -> dict:
    _, components = msgspec.json.schema_components([request_struct], ref_template=REF)
    schemas = {**components, **SCHEMAS}
    health = _get("liveness and workers connected", _json(_ref("Health"), "health"))
    ready = {"summary": "ready when a worker is connected",
             "responses": {"200": _json(_ref("Ready"), "ready"),
                           "503": _json(_ref("Ready"), "no worker connected yet")}}
    paths = {
        "/api/v1/query": {"post": _query_operation("run one read-only SQL statement", FORMATS)},
        "/api/v1/query/arrow": {"post": _query_operation("run a query, answer Arrow IPC", ["arrow"])},
        "/health": {"get": health},
        "/health/live": {"get": _get("the gateway answers", _json(_ref("Live"), "alive"))},
        "/health/ready": {"get": ready},
        "/ready": {"get": ready},
        "/api/v1/stats/connections": {"get": _get("fleet totals and each worker",
                                                  _json(_ref("Stats"), "stats"))},
        "/api/v1/cache/stats": {"get": _get("the result cache's counts",
                                            _json(_ref("CacheStats"), "cache stats"))},
        "/api/v1/catalog": {"get": _get("databases, tables, columns, files, rows and time "
                                        "ranges (within the token's scope)",
                                        _json(_ref("Catalog"), "the catalog"))},
        "/api/v1/queries": {"get": _get("queries waiting, running or being sent (a token "
                                        "limited to some databases sees its own)",
                                        _json(_ref("Queries"), "running queries"))},
        "/api/v1/queries/{request_id}": {"delete": {
            "summary": "cancel a query: its caller gets error_type cancelled",
            "parameters": [{"name": "request_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("Cancelled"), "queries cancelled"),
                          "403": _error("the query is another token's"),
                          "404": _error("no such query is waiting, running or being sent")}}},
        "/api/v1/cache/clear": {"post": {
            "summary": "drop every cached result",
            "responses": {"200": _json(_ref("CacheCleared"), "entries dropped"),
                          "403": _error("a token limited to some databases")}}},
        "/api/v1/metrics": {"get": _get("the Prometheus metrics as JSON",
                                        _json(_ref("Metrics"), "metrics"))},
        "/metrics": {"get": _get("Prometheus text format", {
            "description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}})},
        "/api/v1/openapi.json": {"get": _get("this document", {
            "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}})},
    }
    if console_on:
        paths.update(_console_paths())
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "duckfleet", "version": "1",
                 "description": "A read-only SQL query tier over a fleet of DuckDB workers."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth_enabled:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            "token": {"type": "apiKey", "in": "header", "name": "Authorization",
                      "description": "`Token <token>`"},
        }
    for path, item in paths.items():
        if path in OPEN_PATHS:
            continue
        for operation in item.values():
            operation["responses"]["429"] = RATE_LIMITED
            # past server.max_connections only health routes are answered
            operation["responses"].setdefault("503", _error("too many open connections", RETRY))
            if "requestBody" in operation:
                operation["responses"]["408"] = _error("the body did not arrive within body_timeout_s")
            if auth_enabled and needs_token(path):
                operation["security"] = [{"bearer": []}, {"apiKey": []}, {"token": []}]
                operation["responses"]["401"] = UNAUTHORIZED
    return doc
