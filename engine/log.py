"""Structured logging: one JSON object a line on stderr, in every process.

Each line carries the process role and pid; callers pass fields as keyword arguments:
log.info("worker_spawned", worker=3, pid=1234).
"""

from __future__ import annotations

import logging
import os
import sys

import msgspec

_encoder = msgspec.json.Encoder()


class _JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                "role": self._role, "pid": os.getpid(), "event": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode()


class Logger:
    """A thin wrapper so call sites read log.info("event", key=value)."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger

    def _log(self, level: int, event: str, exc_info=False, **fields) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields) -> None:
        self._log(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields) -> None:
        self._log(logging.INFO, event, **fields)

    def warning(self, event: str, **fields) -> None:
        self._log(logging.WARNING, event, **fields)

    def error(self, event: str, exc_info=False, **fields) -> None:
        self._log(logging.ERROR, event, exc_info=exc_info, **fields)


def reopen(path: str) -> None:
    """Point this process's stderr (and so its log) at path, appending; for log rotation."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)


def setup(role: str, level: str = "info", log_file: str = "",
          libraries: tuple[str, ...] = ()) -> Logger:
    """JSON lines on stderr (or log_file) for duckfleet's logger, and for the named libraries'
    loggers (warnings and worse), so that no plain-text line or traceback ends up in the log."""
    reopen(log_file)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(role))
    root = logging.getLogger("duckfleet")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in libraries:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(max(logging.WARNING, root.level))
        library.propagate = False
    return Logger(root)


def get() -> Logger:
    return Logger(logging.getLogger("duckfleet"))

