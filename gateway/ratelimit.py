"""Request rate limits: a token bucket per token, or per client address without auth.

Off unless server.rate_limit_per_s > 0. Middleware on the gateway's event loop, inside auth
(so the token is known) and outside the handlers; health routes are never limited. Each key
(clients of the HTTP Unix socket have no address and share one key) gets a bucket of
server.rate_limit_burst requests that refills at rate_limit_per_s; a request
that finds it empty gets 429 with `Retry-After` (whole seconds until one request's worth has
refilled). The gateway holds at most MAX_KEYS buckets: the least recently used goes first,
which at worst lets a long-idle client start over with a full bucket.
"""

from __future__ import annotations

import collections
import math
import time

from aiohttp import web

from engine.errors import Kind, QueryError
from gateway.access import client_key
from gateway.auth import OPEN_PATHS

MAX_KEYS = 10_000


class TokenBuckets:
    def __init__(self, rate: float, burst: int, max_keys: int = MAX_KEYS):
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """Take one request from key's bucket: 0.0 if allowed, else seconds until it would be."""
        now = time.monotonic() if now is None else now
        level, then = self._buckets.pop(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - then) * self.rate)
        wait = 0.0
        if level >= 1.0:
            level -= 1.0
        else:
            wait = (1.0 - level) / self.rate
        self._buckets[key] = (level, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def middleware(buckets: TokenBuckets):
    @web.middleware
    async def limit(request: web.Request, handler):
        if request.path in OPEN_PATHS:
            return await handler(request)
        wait = buckets.take(client_key(request))
        if wait:
            raise QueryError(Kind.RATE_LIMITED,
                             f"over the rate limit of {buckets.rate:g} requests a second "
                             f"(burst {buckets.burst}); retry later",
                             {"Retry-After": str(max(1, math.ceil(wait)))})
        return await handler(request)
    return limit
