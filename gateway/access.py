"""Per-request facts, request ids, the access log, the slow-query log, request metrics.

`observe` is the outermost middleware, on the gateway's event loop: it gives each request a
RequestFacts (request[FACTS]) that the inner layers fill in (auth: the token; handlers: format,
rows, wait, execution and send times; errors_middleware: the error type), and when the request
ends, however it ends, writes one `access` log line and records it in the metrics. A query at
least server.slow_query_ms long end to end also gets a `slow_query` line with its SQL.

X-Request-Id: a client's value is kept if it is 1-128 characters of [A-Za-z0-9._:+/=-];
anything else is replaced by a fresh random id (never refused: it is only a label). The id is
put on every response, streamed ones included, by `add_request_id` (on_response_prepare).

Requests aiohttp cannot parse never reach a middleware; BadHttpFilter turns aiohttp's report
of each (an error with a traceback) into one `bad_http_request` warning line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass

from aiohttp import http_exceptions, web

from engine import log as log_mod
from engine.tokens import Token
from gateway.metrics import Metrics

log = log_mod.get()
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:+/=\-]{1,128}$")
SQL_LOGGED = 2000  # characters of SQL in a slow_query line
CLIENT_CLOSED = 499  # nginx's code for a client that went away before its answer


@dataclass
class RequestFacts:
    request_id: str
    started: float
    token: Token | None = None
    sql: str | None = None  # set for query routes once the body parsed
    format: str | None = None
    rows: int | None = None
    wait_ms: float | None = None
    execution_ms: float | None = None
    send_ms: float | None = None
    cache: str | None = None  # hit, miss, coalesced or bypass, when the cache is on
    files_scanned: int | None = None  # Parquet files the plan reads, and those pruning spared
    files_pruned: int | None = None
    error_type: str | None = None
    aborted: str | None = None  # why a response was cut after its first byte: an error kind,
    #                             too_slow or client_gone
    status_sent: int | None = None  # a streamed response's status, once its headers went out
    body_sent: int | None = None  # its body bytes handed to the kernel

    def note(self, result) -> None:
        """What a run's result (gateway/run.py) tells about this request."""
        self.cache, self.rows, self.wait_ms = result.cache, result.rows, result.wait_ms
        self.execution_ms = result.execution_ms
        self.files_scanned, self.files_pruned = result.files_scanned, result.files_pruned


FACTS = web.RequestKey("facts", RequestFacts)
METRICS = web.AppKey("metrics", Metrics)
SLOW_QUERY_MS = web.AppKey("slow_query_ms", float)


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if REQUEST_ID.match(given) else secrets.token_hex(16)


@web.middleware
async def observe(request: web.Request, handler):
    facts = RequestFacts(request_id(request), time.perf_counter())
    request[FACTS] = facts
    status, sent = 500, 0
    try:
        response = await handler(request)
        status = response.status
        sent = response.body_length if response.prepared else (response.content_length or 0)
        return response
    except web.HTTPException as exc:  # below 400 only: errors_middleware renders the rest
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = facts.status_sent or CLIENT_CLOSED  # the status line may be out already
        if facts.status_sent:
            facts.aborted = facts.aborted or "client_gone"
        raise
    finally:
        if facts.body_sent is not None:  # streamed: what went out, cut or not
            sent = facts.body_sent
        _record(request, facts, status, sent)


def client_key(request: web.Request) -> str:
    """Whom a per-client limit counts: the token, or the client's address without auth."""
    facts = request[FACTS]
    return f"token:{facts.token.name}" if facts.token else f"client:{request.remote or 'unix'}"


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    facts = request.get(FACTS)
    if facts is not None:
        response.headers["X-Request-Id"] = facts.request_id


def _record(request: web.Request, facts: RequestFacts, status: int, sent: int) -> None:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    record(request.app[METRICS], request.app[SLOW_QUERY_MS], facts, route, status, sent,
           request.method, request.path, request.remote)


def record(metrics: Metrics, slow_query_ms: float, facts: RequestFacts, route: str, status: int,
           sent: int, method: str, path: str, client: str | None) -> None:
    """One request's access line, metrics sample and, if slow, slow_query line. HTTP's come
    from `observe`; another front end (Flight SQL) calls this itself, with the HTTP status
    its outcome would have had."""
    duration_ms = (time.perf_counter() - facts.started) * 1000
    metrics.observe_request(route, status, sent)
    token = facts.token.name if facts.token else None
    fields = {"request_id": facts.request_id, "method": method, "path": path,
              "status": status, "token": token, "client": client, "bytes": sent,
              "duration_ms": round(duration_ms, 3)}
    if facts.error_type:
        fields["error_type"] = facts.error_type
    if facts.aborted:
        fields["aborted"] = facts.aborted
    if facts.format is not None:  # a query route
        metrics.observe_query(status, facts.format, facts.rows, facts.wait_ms,
                              facts.execution_ms, facts.send_ms, facts.files_scanned,
                              facts.files_pruned, facts.aborted)
        fields.update(format=facts.format, rows=facts.rows, wait_ms=_ms(facts.wait_ms),
                      execution_ms=_ms(facts.execution_ms), send_ms=_ms(facts.send_ms),
                      files_scanned=facts.files_scanned, files_pruned=facts.files_pruned)
        if facts.cache:
            fields["cache"] = facts.cache
    log.info("access", **fields)
    if facts.sql is not None and duration_ms >= slow_query_ms:
        log.warning("slow_query", request_id=facts.request_id, token=token, status=status,
                    duration_ms=round(duration_ms, 3), wait_ms=_ms(facts.wait_ms),
                    execution_ms=_ms(facts.execution_ms), rows=facts.rows,
                    files_scanned=facts.files_scanned, files_pruned=facts.files_pruned,
                    threshold_ms=slow_query_ms, sql=facts.sql[:SQL_LOGGED])


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class BadHttpFilter(logging.Filter):
    """aiohttp logs each request it cannot parse as an error with a traceback, before any
    middleware runs. It is the client's mistake: make it one `bad_http_request` warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info = "bad_http_request", (), None
            record.fields = {"status": exc.code, "error": str(exc.message).splitlines()[0][:200]}
        return True
