"""Token authentication and route permissions, in the gateway (middleware on the event loop).

With auth.enabled, every route but health and the console's page and files (they hold no data:
the page asks for a token and sends it with its API calls) needs a token, accepted as
`Authorization: Bearer <t>`, `Authorization: Token <t>` or `x-api-key: <t>`. No token or an
unknown one: 401 with `WWW-Authenticate: Bearer`. A read-only token may use only GET routes
(metrics, stats, the OpenAPI document), not queries: 403. A token limited to some databases
passes; the gateway hands its databases to the worker with the query, and the worker runs the
query in a DuckDB instance that holds only those databases and may read only their directories
(engine/worker.py, engine/sandbox.py), so no SQL text can reach another database: DuckDB never
sees it.

TokenStore owns the gateway's copy of the token file (engine/tokens.py). It compares the file's
(inode, size, mtime) with what it last read on each authenticated request, a single stat(),
and re-reads it when they differ: a revoked token stops working with the next request.
If the file cannot be read or parsed it fails closed, accepting no token until it is fixed,
and logs why.
"""

from __future__ import annotations

import os

from aiohttp import web

from engine import log as log_mod, tokens as tokens_mod
from engine.errors import Kind, QueryError
from engine.tokens import Token
from gateway import console
from gateway.access import FACTS

log = log_mod.get()
OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/ready"})
READ_ONLY_METHODS = frozenset({"GET", "HEAD"})
SCHEMES = ("bearer", "token")


def needs_token(path: str) -> bool:
    return path not in OPEN_PATHS and path not in console.PATHS


class TokenStore:
    def __init__(self, path: str):
        self.path = path
        self._signature: object = object()  # matches no stat result: the first lookup reads
        self._tokens: list[Token] = []

    def lookup(self, presented: str) -> Token | None:
        self._refresh()
        return tokens_mod.find(self._tokens, presented)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        if signature == self._signature:
            return
        try:
            self._tokens = tokens_mod.load(self.path)
        except tokens_mod.TokenFileError as exc:
            self._tokens = []
            log.error("tokens_file_invalid", path=self.path, error=str(exc),
                      hint="no token is accepted until the file is fixed")
        else:
            log.info("reloaded", what="tokens", path=self.path, tokens=len(self._tokens))
        self._signature = signature


def presented_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() in SCHEMES and value.strip():
            return value.strip()
        return None
    return request.headers.get("x-api-key") or None


def middleware(store: TokenStore):
    @web.middleware
    async def authenticate(request: web.Request, handler):
        if not needs_token(request.path):
            return await handler(request)
        presented = presented_token(request)
        token = store.lookup(presented) if presented else None
        if token is None:
            message = ("a token is required: Authorization: Bearer <token>, "
                       "Authorization: Token <token> or x-api-key: <token>" if presented is None
                       else "the token is not valid (unknown or revoked)")
            raise QueryError(Kind.UNAUTHORIZED, message, {"WWW-Authenticate": "Bearer"})
        request[FACTS].token = token
        if token.read_only and request.method not in READ_ONLY_METHODS:
            raise QueryError(Kind.FORBIDDEN,
                             f"token {token.name!r} may use only read-only (GET) routes")
        return await handler(request)
    return authenticate
