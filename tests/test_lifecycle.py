"""The supervisor with real processes and real signals: concurrency, crashes, stops."""

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from engine.memory import system_memory_bytes
from harness.server import REPO, assert_no_leaks, fleet_segments, wait_for

SLOW_SQL = "SELECT sum(i) AS s FROM range(1000000000) t(i)"  # about 2 s on one thread
SLOW_SUM = 999_999_999 * 1_000_000_000 // 2
ENDLESS_SQL = "SELECT sum(i) AS s FROM range(1000000000000) t(i)"
HEAVY_SQL = "SELECT sum(i) AS s FROM range(150000000) t(i)"  # about 0.3 s on one thread
HEAVY_SUM = 149_999_999 * 150_000_000 // 2


def small_query(i: int) -> tuple[str, list]:
    return (f"SELECT {i} AS i, sum(x) AS s FROM range({i * 1000}) t(x)",
            [[i, (i * 1000 - 1) * i * 1000 // 2 if i else None]])


def test_64_concurrent_queries_on_2_workers(make_server):
    srv = make_server(config="[queue]\nqueue_timeout_s = 60\n").start()
    mixed = [small_query(i) for i in range(48)] + [
        (f"SELECT host, count(*) AS n FROM cpu WHERE host = 'server{h:02d}' GROUP BY host",
         [[f"server{h:02d}", 33600]]) for h in range(1, 11)] + [
        (f"SELECT count(*) AS n FROM mem WHERE region = '{r}'", [[n]])
        for r, n in (("us-east", 4 * 33600), ("us-west", 3 * 33600), ("eu-west", 3 * 33600))] * 2
    assert len(mixed) == 64
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda q: srv.query(q[0]), mixed))
    for (sql, expected), resp in zip(mixed, results):
        assert resp.status == 200, (sql, resp)
        assert resp.json()["data"] == expected, sql
    stats = srv.stats()
    assert stats["served"] >= 64 and stats["crashed"] == 0 and stats["worker_count"] == 2
    assert {w["state"] for w in stats["workers"]} == {"idle"}


def test_memory_limit_from_budget(make_server):
    srv = make_server().start()
    # (RAM x 0.7 - 4 processes x 200 MiB overhead) / 2 workers
    expected = (int(system_memory_bytes() * 0.7) - 4 * 200 * 2**20) // 2
    for worker in srv.stats()["workers"]:
        assert worker["memory_limit"] == expected
    assert srv.event("listening")["memory_limit_bytes"] == expected


def test_sigkill_worker_under_load(make_server):
    """A worker killed while it runs a query: that query is retried on the other worker,
    the client never sees it, and the other worker answers throughout."""
    srv = make_server(config="[queue]\nqueue_timeout_s = 30\n").start()
    outcomes, stop, errors = [], threading.Event(), []

    def client(n):
        try:
            i = 0
            while not stop.is_set():
                # One client in four runs a heavier query, so that a worker seen busy
                # is most often still running it when it is killed.
                sql, expected = (HEAVY_SQL, [[HEAVY_SUM]]) if n == 0 else \
                    small_query(100 + n * 1000 + i % 50)
                resp = srv.query(sql)
                outcomes.append((time.monotonic(), resp.status,
                                 resp.json().get("data") == expected if resp.status == 200
                                 else resp.json()["error_type"]))
                i += 1
        except BaseException as exc:  # noqa: BLE001 - fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(outcomes) >= 20, 30, what="the load to run")
    killed_at = replaced_at = None
    for _ in range(10):  # until a kill lands on a worker that is running a query
        before = srv.stats()
        victim = wait_for(lambda: next((w["pid"] for w in srv.stats()["workers"]
                                        if w["state"] == "busy"), None), 20, what="a busy worker")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def replaced():
            pids = srv.worker_pids()
            return len(pids) == 2 and victim not in pids
        wait_for(replaced, 60, what="a replacement worker")
        replaced_at = time.monotonic()
        if srv.stats()["crashed"] > before["crashed"]:
            break
    after = srv.stats()
    assert after["crashed"] >= 1, "no kill landed on a running query"
    wait_for(lambda: srv.stats()["retried"] == srv.stats()["crashed"], 30,
             what="every lost query to be retried")
    done = len(outcomes)
    wait_for(lambda: len(outcomes) >= done + 20, 30, what="queries after the replacement")
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, f"a client thread died: {errors[0]!r}"
    print(f"replacement serving {replaced_at - killed_at:.3f} s after SIGKILL; "
          f"crashed {after['crashed']}, retried {srv.stats()['retried']}")
    answered_during = [o for o in outcomes if killed_at < o[0] < replaced_at and o[1] == 200]
    failures = [o for o in outcomes if o[1] != 200]
    assert all(o[2] is True for o in outcomes if o[1] == 200), "a wrong answer"
    assert not failures, failures  # the query the victim was running was retried
    assert srv.events("query_retried")
    assert answered_during or replaced_at - killed_at < 0.05, "the other worker stopped answering"
    new = next(p for p in srv.worker_pids() if p != victim)
    assert srv.query("SELECT 1 AS x").status == 200 and psutil.pid_exists(new)


def test_graceful_stop_finishes_in_flight_query(make_server):
    sig = signal.SIGTERM
    srv = make_server().start()
    result = {}
    t = threading.Thread(target=lambda: result.update(resp=srv.query(SLOW_SQL)))
    t.start()
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    srv.send_signal(sig)
    t.join(60)
    assert result["resp"].status == 200, result["resp"]
    assert result["resp"].json()["data"] == [[SLOW_SUM]]
    assert srv.stop() == 0
    assert_no_leaks(srv)
    assert srv.event("stopped")["exit_code"] == 0


def endless_query_running(srv):
    """A query that would run for half an hour, started in a thread: (thread, outcome)."""
    result = {}

    def run():
        try:
            result["resp"] = srv.query(ENDLESS_SQL, timeout=60)
        except OSError as exc:
            result["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    return t, result


@pytest.mark.parametrize("signals", [(signal.SIGQUIT,), (signal.SIGINT, signal.SIGINT),
                                     (signal.SIGTERM, signal.SIGINT)], ids=["quit", "int-int", "term-int"])
def test_quick_stop(make_server, signals):
    """SIGQUIT, or a second SIGINT or SIGTERM during a graceful stop (the first one waits up to
    shutdown_grace_s, 30 s): the server exits promptly, and the client still gets an answer."""
    srv = make_server().start()
    t, result = endless_query_running(srv)
    *first, last = signals
    for sig in first:
        srv.send_signal(sig)
        wait_for(lambda: srv.event("gateway_stopping"), 20, what="the graceful stop to begin")
        assert srv.event("stopping")["mode"] == "graceful" and t.is_alive()
    assert srv.stop(last, timeout=30) == 0
    t.join(30)
    assert "error" in result or result["resp"].status >= 500
    assert result["resp"].status == 503 and result["resp"].headers["Retry-After"], result
    assert result["resp"].json()["error_type"] == "overloaded"
    assert srv.event("stopped")["quick"] is True
    assert_no_leaks(srv)


def test_grace_period_then_kill(make_server):
    srv = make_server(config="[server]\nshutdown_grace_s = 1\n").start()
    t, result = endless_query_running(srv)
    started = time.monotonic()
    assert srv.stop(signal.SIGTERM, timeout=30) == 0
    print(f"stopped {time.monotonic() - started:.2f} s after SIGTERM with a 1 s grace period")
    t.join(30)
    # Past the grace period the query is interrupted (or its worker killed): the client sees
    # an error or a closed connection, never a hang.
    assert "error" in result or result["resp"].status >= 500
    assert not [e for e in srv.events("exited") if e.get("process") == "worker"
                and e.get("exit_code") not in (0, None) and "signal" not in e]
    assert_no_leaks(srv)


def test_supervisor_sigkill_takes_children_along(make_server):
    srv = make_server().start()
    srv.query("SELECT * FROM range(1000)", format="arrow")  # a segment exists now
    children = [p.pid for p in srv.children()]
    assert len(children) == 3
    srv.stop(signal.SIGKILL)
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in children), 10, what="every child to die")
    # The gateway cleaned its segments as it went; the runtime dir waits for the next start.
    wait_for(lambda: not fleet_segments(srv.process.pid), 10, what="segments to go")
    stale = list(srv.runtime_base.iterdir())
    assert stale
    again = make_server()
    again.runtime_base.rmdir()
    again.runtime_base = srv.runtime_base
    again.env["DUCKFLEET_SERVER_RUNTIME_DIR"] = str(srv.runtime_base)
    again.start()
    assert not any(p.exists() for p in stale), "a restart sweeps what the dead fleet left"
    assert again.stop() == 0
    assert_no_leaks(again)


def test_private_runtime_dir_and_modes(make_server):
    srv = make_server().start()
    srv.query("SELECT 42", format="arrow")
    runtime = srv.runtime_dir
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert stat.S_IMODE((runtime / "workers.sock").stat().st_mode) == 0o600
    assert stat.S_IMODE((runtime / "config.json").stat().st_mode) == 0o600
    segments = fleet_segments(srv.process.pid)
    assert segments
    for name in segments:
        assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
    # Nothing else was written: the runtime base holds only the runtime dir.
    assert list(srv.runtime_base.iterdir()) == [runtime]


def test_unix_socket_http(make_server, tmp_path):
    import http.client

    path = tmp_path / "http.sock"
    srv = make_server(config=f'[server]\nunix_socket = "{path}"\n').start()

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(path))

    conn = UnixConnection("localhost", timeout=30)
    conn.request("POST", "/api/v1/query", body=b'{"sql": "SELECT 7 AS x"}')
    assert conn.getresponse().read().startswith(b'{"success":true,"columns":["x"],"data":[[7]]')
    conn.close()
    assert srv.stop() == 0
    assert not path.exists()


def test_demo_data_written_when_asked(make_server, tmp_path):
    data = tmp_path / "fresh-data"
    srv = make_server(data_dir=data, args=["--demo"]).start()
    assert srv.query("SELECT count(*) FROM cpu").json()["data"] == [[336_000]]
    assert sorted(p.name for p in (data / "default").iterdir()) == ["cpu", "disk", "mem"]
    # No staging directory left; the file index is the only other entry.
    assert sorted(p.name for p in data.iterdir()) == [".duckfleet-index", "default"]


def test_missing_data_dir_is_an_error(tmp_path):
    missing = tmp_path / "no-such-dir"
    done = subprocess.run([sys.executable, "-m", "engine.supervisor", "--data-dir", str(missing),
                           "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not a directory" in done.stderr
    assert not missing.exists()


def test_empty_data_dir_starts_with_a_warning(make_server, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = make_server(data_dir=empty).start()
    assert srv.event("data_dir_empty")["data_dir"] == str(empty)
    assert not (empty / "default").exists()
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]


def test_readiness_boot_timeout_and_crash_backoff(make_server, tmp_path):
    """Workers that cannot boot: /ready and /health/ready say 503 while no worker is connected
    (and a query gets 503 overloaded); each is killed at boot_timeout_s and restarted after a
    backoff that doubles up to crash_backoff_max_s. (Ready once workers are connected:
    tests/test_requests.py.)

    The gate is a FIFO attached as a database: opening it blocks until a writer comes, which
    never does, so every worker hangs in its boot (if it gets that far before its timeout)."""
    gate = tmp_path / "gate.duckdb"
    os.mkfifo(gate)
    srv = make_server(workers=1, config=(
        "[workers]\nboot_timeout_s = 1\ncrash_backoff_max_s = 0.15\n"
        "[queue]\nqueue_timeout_s = 0.5\n"
        f'[catalog.databases]\ngate = "{gate}"\n'))
    srv.start(wait_ready=False)
    wait_for(lambda: any(e.get("process") == "gateway" for e in srv.events("ready")), 30,
             what="the gateway")
    for path in ("/ready", "/health/ready"):
        resp = srv.get(path)
        assert resp.status == 503, (path, resp)
        assert resp.json() == {"ready": False, "workers_ready": 0}
    assert srv.get("/health").json() == {"status": "starting", "workers_ready": 0}
    assert srv.get("/health/live").status == 200
    no_worker = srv.query("SELECT 1", timeout=30)
    assert no_worker.status == 503 and no_worker.json()["error_type"] == "overloaded"
    # Four boot timeouts: no delay, then 0.1 s, then 0.2 s capped to 0.15 s, twice.
    wait_for(lambda: len(srv.events("crash_backoff")) >= 3, 60, what="three backoffs")
    assert [e["delay_s"] for e in srv.events("crash_backoff")][:3] == [0.1, 0.15, 0.15]
    unresponsive = srv.events("worker_unresponsive")
    assert len(unresponsive) >= 4 and not any(e["ready"] for e in unresponsive)
    assert [e["signal"] for e in srv.events("crashed")][:4] == ["SIGKILL"] * 4
    assert srv.get("/ready").status == 503 and not srv.events("worker_ready")


def test_host_flag_overrides_file_and_environment(make_server):
    srv = make_server(config='[server]\nhost = "127.0.0.3"\n',
                      env={"DUCKFLEET_SERVER_HOST": "127.0.0.4"}, args=["--host", "127.0.0.2"])
    srv.start(wait_ready=False)
    assert srv.event("listening")["host"] == "127.0.0.2"
    srv.host = "127.0.0.2"
    srv.wait_ready()
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]
    for other in ("127.0.0.1", "127.0.0.3", "127.0.0.4"):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((other, srv.port), timeout=5).close()
