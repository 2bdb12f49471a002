"""Error kinds: the one vocabulary in which failures cross process boundaries.

Workers raise QueryError(kind, message); the kind crosses the socket in a Failure message;
the gateway maps each kind to one HTTP status (gateway/render.py). Nothing else decides a
status code.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Kind(StrEnum):
    BAD_REQUEST = "bad_request"      # malformed body, unknown format, missing sql
    SQL_ERROR = "sql_error"          # DuckDB rejected the SQL (parser, binder, conversion)
    UNAUTHORIZED = "unauthorized"    # no token, or not a valid one
    FORBIDDEN = "forbidden"          # not a read, outside the sandbox, or not for this token
    TOO_LARGE = "too_large"          # body or result over its limit
    REQUEST_TIMEOUT = "request_timeout"  # the client did not send its headers or body in time
    OUT_OF_MEMORY = "out_of_memory"  # the query needed more than the worker's memory_limit
    RATE_LIMITED = "rate_limited"    # this token (or client) is over its request rate
    OVERLOADED = "overloaded"        # no worker within the queue timeout, or the queue is full
    TIMEOUT = "timeout"              # the query ran past its deadline and was interrupted
    WORKER_LOST = "worker_lost"      # the worker died while running the query
    FILE_MISSING = "file_missing"    # a file the query read is not there (or vanished meanwhile)
    QUARANTINED = "quarantined"      # this query crashed a worker; refused for a while
    CANCELLED = "cancelled"          # an operator cancelled the query (DELETE /api/v1/queries/...)
    NOT_FOUND = "not_found"          # no such query is running (an unknown route: bad_request)
    INTERNAL = "internal"            # a bug: logged with its traceback, reported without it


class QueryError(Exception):
    """A failure to report to the caller; `headers` go on the HTTP response (Retry-After,
    WWW-Authenticate)."""

    def __init__(self, kind: Kind, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = headers


_DUCKDB_ERROR = re.compile(r"[A-Z][A-Za-z]*( [A-Za-z]+)* Error: ")  # "Conversion Error: ..."


def duckdb_kind(text: str) -> Kind | None:
    """The kind of a DuckDB error known only by its text (pyarrow raises DuckDB's errors found
    while it reads a result as OSError); None if the text is not DuckDB's."""
    if not _DUCKDB_ERROR.match(text):
        return None
    if text.startswith(("INTERNAL Error", "FATAL Error")):
        return Kind.INTERNAL
    if text.startswith("Out of Memory Error"):
        return Kind.OUT_OF_MEMORY
    if text.startswith("Permission Error"):
        return Kind.FORBIDDEN
    if text.startswith("INTERRUPT Error"):
        return Kind.TIMEOUT
    if text.startswith("IO Error") and ("No such file" in text or "No files found" in text):
        return Kind.FILE_MISSING
    return Kind.SQL_ERROR
