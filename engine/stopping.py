"""The stop sequence of the supervisor: drain, then graceful, or quick; a second signal hurries it.

Owned by the Supervisor (engine/supervisor.py), which calls on_signal() for SIGTERM, SIGINT and
SIGQUIT and advance() on every turn of its loop once a stop has begun; the turn stops
reconciling from then on (nothing is spawned again). Modes, each a phase of the next:

- drain (SIGTERM with server.drain_s > 0): the gateway is told (SIGUSR2) to answer 503 on
  readiness and keeps serving; after drain_s, a graceful stop.
- graceful (SIGINT, or SIGTERM without drain): workers are told the fleet is stopping (SIGUSR2:
  when the gateway lets go of them they leave, quietly), then the gateway gets SIGTERM: it stops
  accepting, lets in-flight queries finish within shutdown_grace_s, answers what is left 503.
- quick (SIGQUIT, or a second SIGINT or SIGTERM during a drain or a graceful stop): the gateway
  gets SIGQUIT: it answers every in-flight request without a response yet 503 with
  Retry-After, drops the streams it is sending, and exits; the workers get QUICK_GRACE_S.

Once the gateway is gone, the workers still there are retired and get the mode's grace; past
a grace, what is left is killed (`killing`, the only warning a stop can log).
"""

from __future__ import annotations

import math
import signal
import time
from typing import TYPE_CHECKING

from engine import log as log_mod
from engine.children import signal_child

if TYPE_CHECKING:
    from engine.supervisor import Supervisor

QUICK_GRACE_S = 1.0
GATEWAY_MARGIN_S = 2.0  # on top of its grace: the gateway answers what is left, then exits
log = log_mod.get()


class Stop:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.mode: str | None = None  # "drain", "graceful", "quick"
        self.phase = ""  # "drain", "gateway" (waiting for it to exit), "workers"
        self.deadline = math.inf  # when the current phase's grace ends (monotonic)
        self.done = False

    def on_signal(self, sig: int) -> None:
        if sig == signal.SIGQUIT or self.mode is not None:
            self.begin("quick")
        elif sig == signal.SIGTERM and self.supervisor.cfg.server.drain_s > 0:
            self.begin("drain")
        else:
            self.begin("graceful")

    def begin(self, mode: str) -> None:
        if self.mode == "quick" or self.mode == mode:
            return
        server = self.supervisor.cfg.server
        self.mode = mode
        now = time.monotonic()
        gateway = self.supervisor.gateway()
        if mode == "drain":
            log.info("stopping", mode=mode, drain_s=server.drain_s)
            self.phase, self.deadline = "drain", now + server.drain_s
            if gateway is not None:
                signal_child(gateway, signal.SIGUSR2)
            return
        grace = self._grace()
        log.info("stopping", mode=mode, grace_s=grace)
        if self.phase == "workers":  # the gateway is gone already: hurry the workers
            self.deadline = min(self.deadline, now + grace)
            return
        for worker in self.supervisor.workers():
            signal_child(worker, signal.SIGUSR2)
        self.phase, self.deadline = "gateway", now + grace + GATEWAY_MARGIN_S
        if gateway is not None:
            signal_child(gateway, signal.SIGTERM if mode == "graceful" else signal.SIGQUIT)

    def advance(self) -> None:
        """One turn of the stop: move on when a phase is over, kill past a grace."""
        now = time.monotonic()
        if self.phase == "drain":
            if now >= self.deadline or self.supervisor.gateway() is None:
                self.begin("graceful")
            return
        if self.phase == "gateway":
            gateway = self.supervisor.gateway()
            if gateway is not None:
                if now >= self.deadline:
                    self._kill([gateway])
                return
            self.phase, self.deadline = "workers", now + self._grace()
            for worker in self.supervisor.workers():
                if worker.retired is None:
                    self.supervisor.retire(worker, "stop")
        workers = self.supervisor.workers()
        if not workers:
            self.done = True
        elif now >= self.deadline:
            self._kill(workers)

    def _grace(self) -> float:
        """How long the current mode lets in-flight queries finish."""
        return self.supervisor.cfg.server.shutdown_grace_s if self.mode == "graceful" \
            else QUICK_GRACE_S

    def _kill(self, children) -> None:
        for child in children:
            log.warning("killing", process=child.role, slot=child.slot, child_pid=child.pid)
            signal_child(child, signal.SIGKILL)
        self.deadline = math.inf  # reaping them ends the phase
