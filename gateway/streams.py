"""How many large results one client may be sent at once (results.max_streams_per_client).

Runs on the gateway's event loop; the run API (gateway/run.py) holds a slot per large result. A large result is one that streams: more than one
shared-memory segment (chunk_mb). Each holds stream buffer, spill space and a connection for as
long as its client takes to read it, so a token (a client address without auth: the same key
as the rate limits) may have at most `limit` of them being sent; the next one is refused with
429 `rate_limited` before its first byte (its query is cancelled), and may be retried once one
of the others is done. 0 = no limit.
"""

from __future__ import annotations

import contextlib

from engine.errors import Kind, QueryError


class StreamSlots:
    def __init__(self, limit: int):
        self.limit = limit
        self.sending: dict[str, int] = {}  # key -> large results being sent
        self.refused = 0

    @contextlib.contextmanager
    def hold(self, key: str):
        """One slot of this client (gateway/access.py client_key) for the duration of a large
        result, or refuse."""
        if not self.limit:
            yield
            return
        if self.sending.get(key, 0) >= self.limit:
            self.refused += 1
            raise QueryError(Kind.RATE_LIMITED,
                             f"this client is already being sent {self.limit} large result(s), "
                             f"the most results.max_streams_per_client = {self.limit} allows; "
                             "retry when one is done")
        self.sending[key] = self.sending.get(key, 0) + 1
        try:
            yield
        finally:
            self.sending[key] -= 1
            if not self.sending[key]:
                del self.sending[key]

    def stats(self) -> dict:
        return {"streams_sending": sum(self.sending.values()), "streams_refused": self.refused}

