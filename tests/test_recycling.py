"""Fleet management with real processes and real signals: recycling, memory, liveness,
crash recovery, reload and scaling."""

import os
import random
import signal
import threading
import time

import psutil
import pytest

from engine import config as config_mod, memory
from engine.config import ConfigError
from harness.server import assert_no_leaks, wait_for

ENDLESS_SQL = "SELECT sum(i) AS s FROM range(1000000000000) t(i)"


class Load:
    """Closed-loop clients checking every answer until stopped; counts what happened.

    A client thread that dies of anything but OSError (a body that is not JSON, an
    IncompleteRead, a bug in the test) fails the test when the load stops: it is never a
    warning that a passing run hides."""

    def __init__(self, srv, clients: int = 4):
        self.srv = srv
        self.ok = 0
        self.wrong = 0
        self.failures: list[tuple[int, str]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def _client(self, n: int) -> None:
        try:
            self._loop(n)
        except BaseException as exc:  # noqa: BLE001 - reported by __exit__
            self.errors.append(exc)

    def _loop(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            k = n * 100_000 + i
            try:
                resp = self.srv.query(f"SELECT {k} AS k, sum(x) AS s FROM range(1000) t(x)")
            except OSError as exc:
                self.failures.append((0, type(exc).__name__))
                continue
            if resp.status == 200:
                if resp.json()["data"] == [[k, 499500]]:
                    self.ok += 1
                else:
                    self.wrong += 1
            else:
                self.failures.append((resp.status, resp.json().get("error_type")))
            i += 1

    @property
    def answered(self) -> int:
        return self.ok + self.wrong + len(self.failures)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, exc_type, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)
        if exc_type is None:
            assert not any(t.is_alive() for t in self._threads), "a load thread hangs"
            assert not self.errors, f"a load thread died: {self.errors[0]!r}"

    def summary(self) -> str:
        return (f"ok={self.ok} wrong={self.wrong} failures={self.failures[:10]} "
                f"({len(self.failures)}) errors={self.errors[:3]}")


@pytest.mark.parametrize("seconds", [6, pytest.param(30, marks=pytest.mark.slow)])
def test_max_queries_recycling_loses_nothing(make_server, seconds):
    srv = make_server(config="[workers]\nmax_queries = 5\nmax_queries_jitter = 2\n"
                             "[queue]\nqueue_timeout_s = 30\n").start()
    ready_counts = []
    with Load(srv) as load:
        # At least `seconds`, and on until a recycle has completed (boot time varies with load).
        deadline, last_chance = time.monotonic() + seconds, time.monotonic() + 90
        stats = srv.stats()
        while time.monotonic() < deadline or (
                not stats["recycled_by_reason"] and time.monotonic() < last_chance):
            stats = srv.stats()  # one snapshot: serving = connected and not retiring
            ready_counts.append(sum(w["state"] != "retiring" for w in stats["workers"]))
            time.sleep(0.05)
    print("recycling:", load.summary(), srv.stats()["recycled_by_reason"])
    assert load.wrong == 0 and not load.failures, load.summary()
    assert load.ok > 20
    # A retiring worker serves on until its replacement has booted (a second or more here),
    # so the rate of recycling follows boot time, not max_queries.
    assert srv.stats()["recycled_by_reason"].get("max_queries", 0) >= 1
    assert min(ready_counts) >= 2, "capacity dipped below the configured workers"
    assert not srv.events("crashed")


def test_rss_and_age_limits(make_server):
    srv = make_server(config="[workers]\nmax_age_s = 1.5\nheartbeat_s = 0.2\n").start()
    first = set(srv.worker_pids())
    wait_for(lambda: srv.stats()["recycled_by_reason"].get("max_age", 0) >= 2, 30,
             what="both workers to retire of age")
    srv.wait_ready()
    assert not first & set(srv.worker_pids())
    assert srv.query("SELECT 1 AS x").status == 200

    rss = make_server(config="[workers]\nmax_rss_mb = 50\n").start()  # any worker is larger
    assert rss.query("SELECT 1 AS x").status == 200
    wait_for(lambda: rss.stats()["recycled_by_reason"].get("max_rss", 0) >= 1, 30,
             what="a worker to retire over max_rss_mb")
    assert rss.query("SELECT 2 AS x").status == 200


def test_reconnect_after_memory_growth_and_stats(make_server):
    srv = make_server(workers=1, config="[workers]\nreconnect_growth_mb = 1\nheartbeat_s = 0.2\n").start()
    assert srv.query("SELECT * FROM range(2000000)", format="arrow").status == 200
    wait_for(lambda: srv.stats()["workers"][0]["connections"] >= 2, 10,
             what="the worker to report a fresh DuckDB connection")
    worker = srv.stats()["workers"][0]
    assert worker["rss_bytes"] > 0 and worker["duckdb_memory_bytes"] is not None
    assert srv.event("duckdb_reconnected")
    assert srv.query("SELECT count(*) FROM cpu").json()["data"] == [[336_000]]  # catalog back


def test_memory_plan(tmp_path):
    cfg = config_mod.load(None, env={}, overrides={"workers": {"count": 4}})
    plan = memory.plan(cfg, ram=32 * 2**30)
    assert plan.worker_limit == (int(32 * 2**30 * 0.7) - 6 * 200 * 2**20) // 4
    assert plan.total <= plan.budget
    big = config_mod.load(None, env={}, overrides={"workers": {"count": 4},
                                                   "duckdb": {"memory_limit": "8GB"}})
    with pytest.raises(ConfigError, match="does not fit the memory budget") as err:
        memory.plan(big, ram=32 * 2**30)
    assert "budget 22937 MiB" in str(err.value)
    forced = config_mod.load(None, env={}, overrides={"workers": {"count": 4}, "duckdb": {
        "memory_limit": "8GB", "force_memory_limit": True}})
    assert memory.plan(forced, ram=32 * 2**30).worker_limit == 8 * 10**9


def test_oversized_memory_limit_refused_at_start(make_server):
    srv = make_server(config='[duckdb]\nmemory_limit = "100TB"\n')
    with pytest.raises(AssertionError, match="does not fit the memory budget"):
        srv.start()
    srv.process.wait(10)
    assert srv.process.returncode == 2 and not srv.events("spawned")
    srv.process = None  # nothing to stop


def test_query_over_memory_limit_fails_cleanly(make_server):
    srv = make_server(config='[duckdb]\nmemory_limit = "64MB"\n').start()
    resp = srv.query("SELECT list(i) FROM range(30000000) t(i)")  # a list cannot spill
    assert resp.status == 400, resp
    doc = resp.json()
    assert doc["error_type"] == "out_of_memory"
    assert "memory_limit is 61.0 MiB" in doc["error"]
    assert srv.query("SELECT 42 AS x").json()["data"] == [[42]]
    assert srv.stats()["crashed"] == 0


def test_stuck_worker_is_killed_and_client_gets_504(make_server):
    srv = make_server(workers=1, config="[queue]\ncancel_grace_s = 0.5\n"
                                        "[workers]\nkill_grace_s = 0.5\n").start()
    result = {}
    t = threading.Thread(target=lambda: result.update(resp=srv.query(ENDLESS_SQL, timeout_ms=1000)))
    t.start()
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    stuck = srv.worker_pids()[0]
    os.kill(stuck, signal.SIGSTOP)  # deaf to interrupts, silent: as good as hung
    t.join(30)
    assert result["resp"].status == 504 and result["resp"].json()["error_type"] == "timeout"
    wait_for(lambda: not psutil.pid_exists(stuck) or psutil.Process(stuck).status() == "zombie",
             20, what="the stuck worker to be killed")
    assert srv.event("worker_unresponsive")["child_pid"] == stuck
    srv.wait_ready()
    assert srv.query("SELECT 1 AS x").status == 200


def test_idle_silent_worker_is_killed(make_server):
    srv = make_server(workers=1, config="[workers]\nheartbeat_s = 0.2\nheartbeat_timeout_s = 1\n").start()
    silent = srv.worker_pids()[0]
    os.kill(silent, signal.SIGSTOP)
    wait_for(lambda: srv.event("worker_unresponsive"), 20, what="the watchdog")
    wait_for(lambda: silent not in srv.worker_pids(), 20, what="the gateway to notice")
    srv.wait_ready()


def test_crash_loop_backs_off(make_server):
    srv = make_server(workers=1).start()
    for _ in range(4):
        pid = wait_for(lambda: (srv.worker_pids() or [None])[0], 30, what="a worker")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pid not in srv.worker_pids(), 10, what="the gateway to notice")
    delays = [e["delay_s"] for e in srv.events("crash_backoff")]
    assert delays == sorted(delays) and len(delays) >= 2 and delays[-1] > delays[0]
    srv.wait_ready()
    assert srv.query("SELECT 1 AS x").status == 200


def test_sighup_reload_replaces_workers_without_failures(make_server):
    srv = make_server(config="[queue]\nqueue_timeout_s = 30\n").start()
    before = set(srv.worker_pids())
    srv.config_path.write_text('[queue]\nqueue_timeout_s = 30\n'
                               '[catalog.views]\nanswer = "SELECT 42 AS x"\n')
    with Load(srv) as load:
        wait_for(lambda: load.ok >= 20, 30, what="the load to run before the reload")
        at_hup = load.ok
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.event("reloaded"), 60, what="the reload")
        during = load.ok - at_hup
        wait_for(lambda: load.ok >= at_hup + during + 20, 30, what="queries after the reload")
    print(f"reload: {during} queries answered while it ran;", load.summary())
    assert load.wrong == 0 and not load.failures, load.summary()
    assert during > 0, "no query was answered while the workers were replaced"
    srv.wait_ready()
    assert not before & set(srv.worker_pids()), "every worker was replaced"
    assert srv.query("SELECT x FROM answer").json()["data"] == [[42]]
    assert srv.stats()["recycled_by_reason"].get("replaced") == 2


def test_bad_reload_keeps_serving(make_server):
    srv = make_server().start()
    before = set(srv.worker_pids())
    srv.config_path.write_text("[queue]\nqueue_timeout_s = 'soon'\n")
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: srv.event("reload_failed"), 20, what="the refusal")
    assert set(srv.worker_pids()) == before
    assert srv.query("SELECT 1 AS x").status == 200


def test_ttin_ttou_scale(make_server):
    srv = make_server().start()
    srv.send_signal(signal.SIGTTIN)
    srv.wait_ready(3)
    srv.send_signal(signal.SIGTTOU)
    # Unix does not queue a signal that is already pending: wait before sending the next.
    wait_for(lambda: len(srv.events("workers")) == 2, 30, what="the first scale-down")
    srv.send_signal(signal.SIGTTOU)
    wait_for(lambda: srv.stats()["worker_count"] == 1 and len(srv.processes("engine.worker")) == 1,
             30, what="one worker left")
    assert srv.query("SELECT 1 AS x").status == 200
    assert not srv.events("crashed")


def test_sigusr1_reopens_log_files(make_server, tmp_path):
    log_file = tmp_path / "duckfleet.log"
    srv = make_server(config=f'[server]\nlog_file = "{log_file}"\n')
    srv.log_path = log_file  # the harness reads events where the server writes them
    srv.start()
    rotated = tmp_path / "duckfleet.log.1"
    log_file.rename(rotated)
    srv.send_signal(signal.SIGUSR1)
    wait_for(log_file.exists, 10, what="the new log file")
    srv.send_signal(signal.SIGTTIN)  # something every process will log about
    srv.wait_ready(3)
    wait_for(lambda: '"role":"supervisor"' in log_file.read_text()
             and '"role":"worker-2"' in log_file.read_text(), 10, what="lines in the new file")
    assert '"event":"listening"' in rotated.read_text()


def test_gateway_restart_keeps_workers_and_connections(make_server):
    srv = make_server().start()
    workers = set(srv.worker_pids())
    old = srv.gateway_pid()
    os.kill(old, signal.SIGKILL)
    # The supervisor holds the listening socket: this waits in the backlog, never refused.
    resp = srv.query("SELECT 1 AS x", timeout=30)
    assert resp.status == 200
    srv.wait_ready()
    assert set(srv.worker_pids()) == workers, "workers rejoin the new gateway, warm"
    assert not [e for e in srv.events("crashed") if e["process"] == "worker"]


@pytest.mark.parametrize("seconds", [5, pytest.param(20, marks=pytest.mark.slow)])
def test_chaos_sigkill_random_workers(make_server, seconds):
    srv = make_server(config="[queue]\nqueue_timeout_s = 30\n").start()
    killed: list[int] = []
    with Load(srv, clients=6) as load:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            # Kill only once the fleet has answered more since the last kill: chaos, and
            # still a fleet that serves (a worker may be booting or backing off meanwhile).
            answered = load.answered
            wait_for(lambda: load.answered >= answered + 5 or load.errors, 60,
                     what="progress between kills")
            pids = srv.processes("engine.worker")
            if pids:
                victim = random.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                except ProcessLookupError:
                    pass
        wait_for(lambda: srv.stats()["worker_count"] == 2, 60, what="the fleet to recover")
        answered = load.answered
        wait_for(lambda: load.answered >= answered + 20, 30, what="queries after the chaos")
    print(f"chaos: {len(killed)} SIGKILLs in {seconds} s; {load.summary()}; "
          f"retried {srv.stats()['retried']}")
    assert len(killed) >= 3, "the chaos killed (almost) nothing"
    wait_for(lambda: set(killed) <= {e["child_pid"] for e in srv.events("crashed")
                                     if e["process"] == "worker"}, 20,
             what="every SIGKILL to be seen as a crash")
    assert srv.stats()["crashed"] >= 1, "no worker was killed while running a query"
    assert load.wrong == 0, load.summary()
    assert all(failure == (503, "worker_lost") for failure in load.failures), load.summary()
    assert load.ok >= 0.8 * load.answered, load.summary()
    srv.wait_ready()
    assert srv.query("SELECT 1 AS x").status == 200
    assert srv.stop() == 0
    assert_no_leaks(srv)


def test_worker_that_cannot_boot_stops_the_server(make_server):
    srv = make_server(config='[catalog.views]\nbroken = "SELECT * FROM nowhere"\n')
    with pytest.raises(AssertionError, match="supervisor exited with 1"):
        srv.start()
    assert "nowhere" in srv.event("worker_boot_failed")["error"]
    assert srv.event("worker_cannot_boot")
    assert len(srv.events("spawned")) <= 3, "it must not spin"
    assert_no_leaks(srv)
    srv.process = None
