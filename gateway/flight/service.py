"""The Flight front end's side on the gateway's event loop: queries through the run API.

Owns what a Flight call asks of the gateway, as coroutines the gRPC threads submit through
gateway/flight/bridge.py: a query (`pump`: the run API's result bytes into a Pipe), a small
result read whole (`fetch`: a prepared statement's schema), the catalog's description within
a token's scope, and each call's access line and metrics sample (`record`, on the loop, as
HTTP's). Every query goes through the same Runner as HTTP (gateway/run.py): the same admission
queue and priorities, timeouts, cancellation, cache, tokens and scopes, and it is listed in
GET /api/v1/queries with route "flight" (DELETE there cancels it: CANCELLED).
Cancelling the task running `pump` (the bridge does, when the gRPC call is cancelled or its
deadline passes) leaves the run's `async with`, which interrupts the query in its worker.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from engine import log as log_mod
from engine.errors import Kind, QueryError
from engine.tokens import Token
from gateway import access
from gateway.access import RequestFacts
from gateway.catalog import Catalog
from gateway.flight.bridge import Pipe
from gateway.metrics import Metrics
from gateway.run import Ask, Runner

log = log_mod.get()
ROUTE = "flight"


def client_key(token: Token | None, peer: str) -> str:
    """Whom per-client limits count, as on HTTP: the token, or the client's address (gRPC
    names a peer `ipv4:127.0.0.1:50912` or `ipv6:[::1]:50912`: the port is the connection's)."""
    if token is not None:
        return f"token:{token.name}"
    return f"client:{peer_address(peer)}"


def peer_address(peer: str) -> str:
    return peer.partition(":")[2].rpartition(":")[0].strip("[]") or peer


class FlightService:
    def __init__(self, runner: Runner, catalog: Catalog, priority: str,
                 loop: asyncio.AbstractEventLoop, metrics: Metrics, slow_query_ms: float):
        self.runner = runner
        self.catalog = catalog
        self.priority = priority
        self.loop = loop
        self.metrics = metrics
        self.slow_query_ms = slow_query_ms

    @staticmethod
    def facts(token: Token | None) -> RequestFacts:
        return RequestFacts(secrets.token_hex(16), time.perf_counter(), token=token)

    def ask(self, sql: str, params, facts: RequestFacts, peer: str) -> Ask:
        return Ask(sql=sql, fmt="arrow", params=params, timeout_s=None, priority=self.priority,
                   use_cache=True, token=facts.token, request_id=facts.request_id,
                   route=ROUTE, client=client_key(facts.token, peer))

    async def pump(self, ask: Ask, pipe: Pipe, facts: RequestFacts) -> None:
        """The query's Arrow IPC stream into the pipe; its error, if any, ends the pipe."""
        error: BaseException | None = None
        try:
            async with self.runner.run(ask) as result:
                try:
                    async for piece in result:
                        async for buf in piece.buffers():
                            pipe.feed(buf)
                        await pipe.drained()  # the next piece may reuse this one's segment
                finally:
                    pipe.withdraw()
                facts.note(result)
        except QueryError as exc:
            error = exc
        except asyncio.CancelledError:
            error = QueryError(Kind.CANCELLED, "the call was cancelled")
            raise
        except Exception:
            log.error("flight_query_failed", exc_info=True, request_id=ask.request_id)
            error = QueryError(Kind.INTERNAL, "internal error")
        finally:
            pipe.finish(error)

    async def fetch(self, ask: Ask) -> bytes:
        """A small result whole (a schema: no rows)."""
        out = bytearray()
        async with self.runner.run(ask) as result:
            async for piece in result:
                async for buf in piece.buffers():
                    out += buf
        return bytes(out)

    async def describe(self, token: Token | None) -> dict:
        return await self.catalog.describe(token.databases if token is not None else None)

    def record(self, facts: RequestFacts, rpc: str, command: str, status: int, sent: int,
               peer: str) -> None:
        """From any thread: the call's access line and metrics, written on the loop."""
        if self.loop.is_closed():  # a stream dropped after the gateway stopped
            return
        self.loop.call_soon_threadsafe(
            access.record, self.metrics, self.slow_query_ms, facts, ROUTE, status, sent, rpc,
            command, peer_address(peer))
