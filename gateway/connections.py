"""Bounded HTTP connections: how many, how long a client may take to send a request.

Runs on the gateway's event loop. aiohttp 3.14 closes an idle keep-alive connection after
keepalive_timeout (server.keepalive_timeout_s), counted from the connection's start or the end
of its last response; it has no limit on how long a client may take to send request headers
once it has started (a line every few seconds keeps a connection forever), none on the body,
and no limit on open connections. This module adds those:

- `Guard`, a protocol wrapped around each aiohttp RequestHandler (`GuardedSite` installs it),
  times the headers: from the connection's start, or from the first byte of the next request
  on a kept-alive connection, until a request reaches the middleware. Past header_timeout_s
  the client gets 408 and the connection is closed.
- `body_middleware` reads the body within body_timeout_s (408 and close otherwise) before
  the handler, which then finds it read.
- `Connections` counts open connections. Up to max_connections they are served; the next
  HEALTH_RESERVE are answered only on the health routes (503 `overloaded` otherwise), closed
  after one response, and get at most OVERFLOW_HEADER_S for their headers, so health checks
  are answered while the server is full; past that a connection is closed unread.

Failure: whatever a client does, it holds a connection for at most header_timeout_s before its
request is read and body_timeout_s while its body is; slow result readers are handled by
gateway/render.py.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from aiohttp import web

from engine import log as log_mod
from engine.errors import Kind
from gateway import render
from gateway.access import FACTS
from gateway.auth import OPEN_PATHS

log = log_mod.get()

HEALTH_RESERVE = 64  # connections past max_connections that may still ask for health
OVERFLOW_HEADER_S = 2.0  # header timeout of those: a health check sends its request at once
TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: "
             b"application/json\r\nContent-Length: %d\r\n\r\n%s")


class Connections:
    """The gateway's open HTTP connections, their limits and counts."""

    def __init__(self, max_connections: int, header_timeout_s: float, body_timeout_s: float):
        self.max = max_connections
        self.header_timeout = header_timeout_s
        self.body_timeout = body_timeout_s
        self.open = 0
        self.guards: dict[object, Guard] = {}  # aiohttp's RequestHandler -> its guard
        self.counts = {"refused": 0, "over_limit": 0, "header_timeout": 0, "body_timeout": 0}

    def factory(self, make_handler: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: Guard(self, make_handler())

    def stats(self) -> dict:
        return {"open": self.open, "max": self.max, **self.counts}


class Guard(asyncio.Protocol):
    """One connection: forwards every protocol call to aiohttp's handler, and times headers."""

    def __init__(self, connections: Connections, inner: asyncio.Protocol):
        self.connections = connections
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.overflow = False  # past max_connections: health routes only
        self.in_request = False
        self._timer: asyncio.TimerHandle | None = None
        self._dropped = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.Transport) -> None:
        c = self.connections
        c.open += 1
        self.transport = transport
        if c.open > c.max + HEALTH_RESERVE:
            c.counts["refused"] += 1
            self._dropped = True
            transport.abort()  # aiohttp never sees it: nothing else to undo
            return
        self.overflow = c.open > c.max
        c.guards[self.inner] = self
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is None and not self.in_request and data:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.connections.open -= 1
        self._disarm()
        if self._dropped:
            return
        self.connections.guards.pop(self.inner, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # --- the request's progress, from the middleware ---

    def request_started(self) -> None:
        self._disarm()
        self.in_request = True

    def request_finished(self) -> None:
        self.in_request = False

    # --- header timer ---

    def _arm(self) -> None:
        timeout = self.connections.header_timeout
        if self.overflow:
            timeout = min(timeout, OVERFLOW_HEADER_S)
        self._timer = asyncio.get_running_loop().call_later(timeout, self._expired, timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, timeout: float) -> None:
        self._timer = None
        if self.in_request or self.transport is None or self.transport.is_closing():
            return
        self.connections.counts["header_timeout"] += 1
        log.debug("header_timeout", timeout_s=timeout)
        body = render.error_body(Kind.REQUEST_TIMEOUT,
                                 f"no complete request headers within {timeout:g} s")
        self.transport.write(TIMED_OUT % (len(body), body))
        self.transport.close()


class GuardedSite(web.SockSite):
    """aiohttp's SockSite, with every connection's protocol wrapped in a Guard."""

    __slots__ = ("_connections",)

    def __init__(self, runner: web.BaseRunner, sock, connections: Connections, backlog: int):
        super().__init__(runner, sock, backlog=backlog)
        self._connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        factory = self._connections.factory(self._runner.server)
        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=self._backlog)


def middleware(connections: Connections):
    """Outermost but for observe and errors: marks the headers read, and refuses requests on
    overflow connections but for health routes."""

    @web.middleware
    async def guard_connection(request: web.Request, handler):
        guard = connections.guards.get(request.protocol)
        if guard is None:  # the HTTP Unix socket is guarded too; only a closed one is not
            return await handler(request)
        guard.request_started()
        try:
            if not guard.overflow:
                return await handler(request)
            if request.path not in OPEN_PATHS:
                connections.counts["over_limit"] += 1
                return _close(_error(request, Kind.OVERLOADED,
                                     f"too many open connections (server.max_connections = "
                                     f"{connections.max}); retry later"))
            return _close(await handler(request))
        finally:
            guard.request_finished()

    return guard_connection


def body_middleware(connections: Connections):
    """Innermost (after auth and rate limits, so anonymous bodies are never read): the body
    within body_timeout_s, kept by aiohttp for the handler's own read."""

    @web.middleware
    async def read_body(request: web.Request, handler):
        if request.body_exists:
            try:
                async with asyncio.timeout(connections.body_timeout):
                    await request.read()
            except TimeoutError:
                connections.counts["body_timeout"] += 1
                return _close(_error(request, Kind.REQUEST_TIMEOUT,
                                     f"the request body did not arrive within "
                                     f"server.body_timeout_s = {connections.body_timeout:g} s"))
        return await handler(request)

    return read_body


def _error(request: web.Request, kind: Kind, message: str) -> web.Response:
    request[FACTS].error_type = str(kind)
    return render.error_response(kind, message)


def _close(response: web.StreamResponse) -> web.StreamResponse:
    response.force_close()
    return response
