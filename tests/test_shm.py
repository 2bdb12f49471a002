"""Shared-memory segments: one owner, reused within a bound, never leaked.

A segment is either lent to one request or idle in the gateway's pool (at most shm_idle_mb,
all of them at most shm_budget_mb); on every path (success, client disconnect, worker crash,
gateway crash, shutdown) it goes back to the pool or is unlinked.
"""

import os
import signal
import threading

from harness.server import assert_no_leaks, fleet_segments, http_post, raw_socket_request, wait_for

BIG_ARROW = "SELECT i, i * 2 AS j FROM range(10000000) t(i)"  # about 160 MB of Arrow
SLOW_SQL = "SELECT sum(i) AS s FROM range(1000000000000) t(i)"


def segment_bytes(pid: int) -> int:
    return sum(os.stat(f"/dev/shm/{name}").st_size for name in fleet_segments(pid))


def non_segment_fds(pid: int) -> int:
    """Open fds of a process, not counting the idle segments the pool holds by design."""
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/") for fd in fds
               if os.path.exists(f"/proc/{pid}/fd/{fd}"))


def settle(srv):
    wait_for(lambda: srv.stats()["shm_segments_in_use"] == 0 and srv.stats()["busy"] == 0, 20,
             what="every segment and worker back")


def test_success_reuses_preallocated_segments(make_server):
    srv = make_server(config="[results]\nshm_prealloc_mb = 32\nchunk_mb = 8\n").start()
    at_start = fleet_segments(srv.process.pid)
    assert len(at_start) == 4 and srv.stats()["shm_segments_created"] == 4
    for _ in range(20):
        assert srv.query("SELECT * FROM range(100000)", format="arrow").status == 200
    settle(srv)
    # Sequential requests reuse the pre-allocated segments instead of creating new ones.
    assert fleet_segments(srv.process.pid) == at_start
    assert srv.stats()["shm_segments_created"] == 4


def test_pool_is_bounded(make_server):
    srv = make_server(config="[results]\nshm_idle_mb = 64\nshm_budget_mb = 128\n").start()
    for _ in range(3):
        assert srv.query(BIG_ARROW, format="arrow").status == 200
    settle(srv)
    assert segment_bytes(srv.process.pid) <= 64 * 2**20
    assert srv.stats()["shm_segments_created"] <= 128 // 8


def test_client_disconnect_while_sending(make_server):
    srv = make_server().start()
    gateway = srv.gateway_pid()
    fds_before = non_segment_fds(gateway)
    for _ in range(3):
        sock = raw_socket_request(srv.port, http_post({"sql": BIG_ARROW, "format": "arrow"}))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
    settle(srv)
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]
    # Closed connections' descriptors go as the gateway's loop notices each close.
    wait_for(lambda: non_segment_fds(gateway) <= fds_before + 1, 10,
             what="the gateway to close the dropped connections")


def test_client_disconnect_while_running(make_server):
    srv = make_server(config="[queue]\nquery_timeout_s = 2\n").start()
    sock = raw_socket_request(srv.port, http_post({"sql": SLOW_SQL}))
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    sock.close()
    # The worker finishes (here: hits its deadline) and everything comes back.
    settle(srv)
    assert srv.query("SELECT 2 AS x").json()["data"] == [[2]]


def test_worker_crash_mid_query(make_server):
    # One worker, so the retry that every lost query gets has nowhere to go but the
    # replacement; here the replacement is killed too, so the client sees worker_lost.
    srv = make_server(workers=1).start()
    result = {}
    t = threading.Thread(target=lambda: result.update(resp=srv.query(SLOW_SQL)))
    t.start()
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    for _ in range(2):
        busy = wait_for(lambda: next((w["pid"] for w in srv.stats()["workers"]
                                      if w["state"] == "busy"), None), 60, what="a busy worker")
        os.kill(busy, signal.SIGKILL)
        wait_for(lambda: busy not in srv.worker_pids(), 10, what="the gateway to notice")
    t.join(30)
    resp = result["resp"]
    assert resp.status == 503 and resp.json()["error_type"] == "worker_lost"
    assert resp.headers["Retry-After"]
    srv.wait_ready()
    settle(srv)
    assert srv.stats()["crashed"] == 2 and srv.stats()["retried"] == 1


def test_gateway_crash_sweeps_its_segments(make_server):
    srv = make_server().start()
    assert srv.query("SELECT * FROM range(1000)", format="arrow").status == 200
    old_gateway = srv.gateway_pid()
    old = {n for n in fleet_segments(srv.process.pid) if f".{old_gateway}." in n}
    assert old
    os.kill(old_gateway, signal.SIGKILL)
    wait_for(lambda: not (old & fleet_segments(srv.process.pid)), 10, what="the sweep")
    # Same port, new gateway: the supervisor kept the listening socket.
    srv.wait_ready()
    assert srv.gateway_pid() != old_gateway
    assert srv.query("SELECT 3 AS x").json()["data"] == [[3]]


def test_timeout_returns_504_and_worker_serves_on(make_server):
    srv = make_server(workers=1).start()
    resp = srv.query(SLOW_SQL, timeout_ms=300)
    assert resp.status == 504 and resp.json()["error_type"] == "timeout"
    assert srv.query("SELECT 4 AS x").json()["data"] == [[4]]
    stats = srv.stats()
    assert stats["timeouts"] == 1 and stats["crashed"] == 0


def test_result_over_limit_is_413(make_server):
    srv = make_server(config="[results]\nmax_result_mb = 1\n").start()
    resp = srv.query("SELECT * FROM range(1000000)", format="arrow")
    assert resp.status == 413 and resp.json()["error_type"] == "too_large"
    assert "max_result_mb" in resp.json()["error"]
    assert srv.query("SELECT 5 AS x").json()["data"] == [[5]]


def test_shutdown_unlinks_everything(make_server):
    srv = make_server().start()
    for _ in range(4):
        srv.query("SELECT * FROM range(10000)", format="arrow")
    assert fleet_segments(srv.process.pid)
    assert srv.stop() == 0
    assert_no_leaks(srv)
