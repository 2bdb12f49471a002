"""Engine errors as gRPC statuses: the Flight front end's one mapping of engine.errors.Kind,
as gateway/render.py is HTTP's.

Owns STATUS (Kind -> gRPC status code name) and `flight_error`, which builds the exception
pyarrow.flight turns into that status, carrying the JSON error body HTTP would send (with its
`error_type`) as the status's binary details. Called on gRPC threads.

pyarrow has an exception class for most codes, not for INVALID_ARGUMENT (ArrowInvalid gives
it), NOT_FOUND (ArrowKeyError) nor RESOURCE_EXHAUSTED: a limit that waiting will not lift (result size, memory) is the
query's doing, so it is INVALID_ARGUMENT too, as HTTP answers it with a 4xx; the kind is named
in every message.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as fl

from engine.errors import Kind
from gateway import render

STATUS: dict[Kind, str] = {
    Kind.BAD_REQUEST: "INVALID_ARGUMENT",
    Kind.SQL_ERROR: "INVALID_ARGUMENT",
    Kind.UNAUTHORIZED: "UNAUTHENTICATED",
    Kind.FORBIDDEN: "PERMISSION_DENIED",
    Kind.TOO_LARGE: "INVALID_ARGUMENT",
    Kind.REQUEST_TIMEOUT: "DEADLINE_EXCEEDED",
    Kind.OUT_OF_MEMORY: "INVALID_ARGUMENT",
    Kind.RATE_LIMITED: "UNAVAILABLE",
    Kind.OVERLOADED: "UNAVAILABLE",
    Kind.TIMEOUT: "DEADLINE_EXCEEDED",
    Kind.WORKER_LOST: "UNAVAILABLE",
    Kind.FILE_MISSING: "INVALID_ARGUMENT",
    Kind.QUARANTINED: "INVALID_ARGUMENT",
    Kind.CANCELLED: "CANCELLED",
    Kind.NOT_FOUND: "NOT_FOUND",
    Kind.INTERNAL: "INTERNAL",
}
_CLASSES = {
    "UNAUTHENTICATED": fl.FlightUnauthenticatedError,
    "PERMISSION_DENIED": fl.FlightUnauthorizedError,
    "DEADLINE_EXCEEDED": fl.FlightTimedOutError,
    "UNAVAILABLE": fl.FlightUnavailableError,
    "CANCELLED": fl.FlightCancelledError,
    "INTERNAL": fl.FlightInternalError,
}


def flight_error(kind: Kind, message: str) -> Exception:
    """The exception whose gRPC status says `kind`: message `[<kind>] <message>`."""
    text = f"[{kind}] {message}"
    name = STATUS[kind]
    if name == "INVALID_ARGUMENT":
        return pa.ArrowInvalid(text)
    if name == "NOT_FOUND":
        return pa.ArrowKeyError(text)
    return _CLASSES[name](text, render.error_body(kind, message))
