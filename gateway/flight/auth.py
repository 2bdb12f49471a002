"""Flight authentication: a duckfleet token as a Bearer value, or as the password of Basic auth.

Owns how a gRPC call proves who it is. With auth.enabled every call but the Handshake's own
RPC needs a token; the checking is gateway/auth.py's TokenStore (the same file, the same
re-reading on change, the same constant-time comparison), run here on gRPC threads at the start
of each call (TokenStore's state is a few attribute assignments: safe to share with the loop).

- `authorization: Bearer <token>` (or `Token <token>`, or `x-api-key`) on every call; or
- `authorization: Basic base64(user:token)`, the form clients send in a Handshake (any user
  name; ADBC sends base64 without padding). The answer carries `authorization: Bearer <token>`,
  which clients then send on every call.

A call without a valid token fails UNAUTHENTICATED before its handler runs. Which token it was
(name, scope, read-only) reaches the handler through `token_of(context)`. pyarrow needs an
auth handler for Handshake to exist at all; ours accepts everything, since this middleware has
already checked the call's headers.
"""

from __future__ import annotations

import base64
import binascii

import pyarrow.flight as fl

from engine.tokens import Token
from gateway.auth import SCHEMES, TokenStore

KEY = "duckfleet-auth"
_HELP = ("a token is required: authorization: Bearer <token>, or Basic auth with the token as "
         "the password (any user name)")


class TokenMiddleware(fl.ServerMiddleware):
    def __init__(self, token: Token, bearer: str | None):
        self.token = token
        self._bearer = bearer  # the token, to hand back after Basic auth

    def sending_headers(self):
        return {"authorization": f"Bearer {self._bearer}"} if self._bearer else {}


class TokenAuth(fl.ServerMiddlewareFactory):
    def __init__(self, store: TokenStore):
        self.store = store

    def start_call(self, info, headers):
        presented, basic = presented_token(headers)
        if presented is None:
            raise fl.FlightUnauthenticatedError(_HELP)
        token = self.store.lookup(presented)
        if token is None:
            raise fl.FlightUnauthenticatedError("the token is not valid (unknown or revoked)")
        return TokenMiddleware(token, presented if basic else None)


class AcceptHandshake(fl.ServerAuthHandler):
    """Handshake itself proves nothing here: TokenAuth checked its headers already."""

    def authenticate(self, outgoing, incoming):
        pass

    def is_valid(self, token):
        return b""


def presented_token(headers: dict[str, list]) -> tuple[str | None, bool]:
    """(token, whether it came as Basic auth's password); None if the headers hold none."""
    values = headers.get("authorization") or []
    if values:
        scheme, _, value = _text(values[0]).partition(" ")
        value = value.strip()
        if scheme.lower() in SCHEMES and value:
            return value, False
        if scheme.lower() == "basic" and value:
            try:
                decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
                _, sep, password = decoded.decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, False
            return (password, True) if sep and password else (None, False)
        return None, False
    api_key = headers.get("x-api-key") or []
    return (_text(api_key[0]), False) if api_key and api_key[0] else (None, False)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def token_of(context) -> Token | None:
    """The token the call presented; None when auth is off."""
    middleware = context.get_middleware(KEY)
    return middleware.token if middleware is not None else None
