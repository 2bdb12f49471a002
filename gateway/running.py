"""The queries the gateway holds right now, for GET /api/v1/queries and their cancellation.

Event-loop only. The run API (gateway/run.py) adds an Activity when a query arrives and removes
it when its caller is done; a query is `waiting` (planned, queued for a worker, or waiting for
the same query already running), `running` (on a worker, nothing handed to its caller yet) or
`sending`. Who sees what: a token limited to some databases sees and cancels only the queries
it sent (their SQL could show what others read); an unrestricted token, or any caller when
auth is off, sees and cancels all of them.

Cancelling (DELETE /api/v1/queries/{request_id}) interrupts the query in its worker and makes
its caller fail with CANCELLED (error_type "cancelled"): a waiting query's task is cancelled
(the run API turns that into the error), a running one's worker is told to stop, and a query
being sent is cut before its next piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from engine.errors import Kind, QueryError
from engine.tokens import Token

if TYPE_CHECKING:
    from gateway.job import Job
    from gateway.run import Ask

SQL_SHOWN = 200  # characters of SQL in a listing


class Activity:
    """One query in the gateway, as the registry shows it."""

    def __init__(self, ask: Ask):
        self.ask = ask
        self.started = time.monotonic()
        self.state = "waiting"
        self.job: Job | None = None
        self.sent_bytes = 0
        self.rows: int | None = None  # known once the worker has answered
        self.cancelled_by: str | None = None
        self.task = asyncio.current_task()

    def describe(self) -> dict:
        ask, job = self.ask, self.job
        progress = job.progress if job is not None and not job.finished else None
        rows = self.rows if self.rows is not None else progress.rows if progress else None
        return {"request_id": ask.request_id, "route": ask.route,
                "token": ask.token.name if ask.token else None, "priority": ask.priority,
                "state": self.state,
                "worker": job.link.worker_id if job is not None else None,
                "elapsed_ms": round((time.monotonic() - self.started) * 1000, 1),
                "rows": rows, "sent_bytes": self.sent_bytes,
                "progress": progress.percent if progress and progress.percent >= 0 else None,
                "sql": ask.sql[:SQL_SHOWN]}

    def error(self) -> QueryError:
        return QueryError(Kind.CANCELLED, f"the query was cancelled by {self.cancelled_by}")

    def cancel(self, by: str) -> None:
        if self.cancelled_by is not None:
            return
        self.cancelled_by = by
        if self.job is not None:
            self.job.interrupt(self.error())  # the worker stops; the caller's next read fails
        elif self.state == "waiting" and self.task is not None:
            self.task.cancel()  # planning or queued: converted by `cancellable`
        # sending from the cache: its next piece fails (Result.__anext__ checks)

    @contextlib.contextmanager
    def cancellable(self):
        """Around a wait: a cancellation that came from `cancel` becomes its QueryError."""
        try:
            yield
        except asyncio.CancelledError:
            if self.cancelled_by is None or self.task is None:
                raise
            self.task.uncancel()
            raise self.error() from None

    def check(self) -> None:
        if self.cancelled_by is not None:
            raise self.error()


class Running:
    def __init__(self):
        self._activities: set[Activity] = set()
        self.cancelled = 0

    def add(self, ask: Ask) -> Activity:
        activity = Activity(ask)
        self._activities.add(activity)
        return activity

    def remove(self, activity: Activity) -> None:
        self._activities.discard(activity)

    def __len__(self) -> int:
        return len(self._activities)

    def visible(self, token: Token | None) -> list[Activity]:
        """What this caller may see and cancel, oldest first."""
        return sorted((a for a in self._activities if _may_see(token, a)),
                      key=lambda a: a.started)

    def cancel(self, request_id: str, token: Token | None) -> int:
        """Cancel the queries with that request id; how many. NOT_FOUND if none runs,
        FORBIDDEN if none is the caller's to cancel."""
        matching = [a for a in self._activities if a.ask.request_id == request_id]
        if not matching:
            raise QueryError(Kind.NOT_FOUND, f"no query with request id {request_id!r} is "
                                             "waiting, running or being sent")
        mine = [a for a in matching if _may_see(token, a)]
        if not mine:
            raise QueryError(Kind.FORBIDDEN, f"token {token.name!r} did not send query "
                                             f"{request_id!r}: only its own token or an "
                                             "unrestricted one may cancel it")
        for activity in mine:
            activity.cancel(f"token {token.name!r}" if token else "an operator")
        self.cancelled += len(mine)
        return len(mine)


def _may_see(token: Token | None, activity: Activity) -> bool:
    sender = activity.ask.token
    return (token is None or token.databases is None
            or (sender is not None and sender.name == token.name))
