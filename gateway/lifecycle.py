"""The gateway's part of a stop: draining, and answering in-flight requests when it must go.

Owned by the gateway process (gateway/app.py), on its event loop. The supervisor decides
(engine/stopping.py) and signals: SIGUSR2 drain (readiness answers 503, everything else is
served as before, so a balancer moves traffic away), SIGTERM graceful stop, SIGQUIT quick stop.
The middleware keeps the task of every request in flight; cut() cancels them: a request that
has no response yet is answered 503 `overloaded` with Retry-After (the client may retry on
another node), and a response already being sent is cut short (nothing else can be done).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from engine.errors import Kind, QueryError

ANSWERED = "duckfleet.answered"  # request key: its response has started


class Lifecycle:
    """Whether the node drains, and the requests a stop may have to cut."""

    def __init__(self) -> None:
        self.draining = False
        self._running: dict[asyncio.Task, web.Request] = {}
        self._cut: set[asyncio.Task] = set()

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        task = asyncio.current_task()
        self._running[task] = request
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if task not in self._cut or request.get(ANSWERED):
                raise
            task.uncancel()
            raise QueryError(Kind.OVERLOADED, "the server is stopping; retry the query "
                                              "(on another node, or here once it is back)") from None
        finally:
            del self._running[task]
            self._cut.discard(task)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        request[ANSWERED] = True

    def cut(self) -> int:
        """Cancel every request in flight; returns how many."""
        for task in self._running:
            if task not in self._cut:
                self._cut.add(task)
                task.cancel()
        return len(self._running)


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
