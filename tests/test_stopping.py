"""Stopping with real processes and real signals: Ctrl-C lets in-flight queries answer, a
clean stop logs no warning, and SIGTERM with server.drain_s drains before it stops.
(Quick stops, and a second signal that hurries a graceful stop: tests/test_lifecycle.py.)"""

import json
import signal
import threading

import pytest

from harness.server import assert_no_leaks, wait_for

SLOW_SQL = "SELECT sum(i) AS s FROM range(1000000000) t(i)"  # about 2 s on one thread
SLOW_SUM = 999_999_999 * 1_000_000_000 // 2
QUIET = "[server]\nslow_query_ms = 600000\n"  # the slow query is no slow_query warning here


def warnings(srv) -> list[str]:
    found = []
    for line in srv.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            found.append(line)  # anything that is not our JSON (a traceback) counts too
            continue
        if record.get("level") in ("warning", "error", "critical"):
            found.append(line)
    return found


def slow_query_in_flight(srv) -> tuple[threading.Thread, dict]:
    result = {}
    t = threading.Thread(target=lambda: result.update(resp=srv.query(SLOW_SQL)))
    t.start()
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    return t, result


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_clean_stop_answers_in_flight_queries_and_logs_no_warning(make_server, sig):
    """Ctrl-C (SIGINT) and SIGTERM are graceful: the query in flight gets its answer."""
    srv = make_server(config=QUIET).start()
    for fmt in ("json", "arrow", "csv"):
        assert srv.query("SELECT * FROM cpu LIMIT 1000", format=fmt).status == 200
    t, result = slow_query_in_flight(srv)
    assert srv.stop(sig, timeout=60) == 0
    t.join(30)
    assert result["resp"].status == 200, result["resp"]
    assert result["resp"].json()["data"] == [[SLOW_SUM]]
    assert srv.event("stopping")["mode"] == "graceful" and srv.event("stopped")["quick"] is False
    assert not srv.events("gateway_lost") and not srv.events("killing")
    assert not warnings(srv), warnings(srv)
    assert_no_leaks(srv)


def test_drain_turns_readiness_off_and_serves_on(make_server):
    srv = make_server(config=QUIET + "drain_s = 10\n").start()
    assert srv.get("/health/ready").status == 200
    t, result = slow_query_in_flight(srv)
    srv.send_signal(signal.SIGTERM)
    wait_for(lambda: srv.get("/health/ready").status == 503, 10, what="readiness to turn off")
    for path in ("/health/ready", "/ready"):
        resp = srv.get(path)
        assert resp.status == 503 and resp.json()["draining"] is True, (path, resp)
    assert srv.event("stopping")["mode"] == "drain" and srv.process.poll() is None
    # What a balancer still sends is served, on new connections too, while the node drains.
    for i in range(5):
        assert srv.query(f"SELECT {i} AS i").json()["data"] == [[i]]
    assert srv.get("/health/live").status == 200
    assert srv.process.wait(60) == 0
    t.join(30)
    assert result["resp"].status == 200 and result["resp"].json()["data"] == [[SLOW_SUM]]
    assert [e["mode"] for e in srv.events("stopping")] == ["drain", "graceful"]
    assert not warnings(srv), warnings(srv)
    srv.stop()
    assert_no_leaks(srv)
