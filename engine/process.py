"""Process plumbing shared by every child: die with the supervisor, malloc_trim, the fd limit.

Children are started by exec (never fork: DuckDB starts threads), then call
die_with_parent() first thing, so that a supervisor killed with SIGKILL takes them along
(PR_SET_PDEATHSIG), even if it died before the call (the parent pid check).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
BOOT_FAILED = 3  # a worker's exit code when it cannot start: respawning it would only spin
OVER_MEMORY = 4  # a worker's exit code when a query took it past its memory cap (engine/memwatch.py)

# Signals a process gets from its own faults (a crash in DuckDB's code): a worker that died of
# one while running a query was killed by that query. SIGKILL and SIGTERM come from outside.
FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                           signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP})
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent:
        sys.exit(1)  # the supervisor is already gone


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's open-file limit to its hard limit (children inherit it); returns
    (soft, hard) after. Each HTTP connection is a descriptor: a soft limit of 1024 is soon hit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel allows at most fs.nr_open
        with open("/proc/sys/fs/nr_open") as nr_open:
            target = int(nr_open.read())
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep what we have; the gateway sizes max_connections to it
    return soft, hard
