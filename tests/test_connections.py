"""Bounded connections (issue 17, item 7), with real sockets against a real fleet.

Small limits (20 connections, 1-3 s timeouts). A server closing a connection is observable: the
client's recv returns b'' (after a 408 when it was waiting for the client's request).
"""

import json
import resource
import socket
import threading
from pathlib import Path

import pytest

from harness.server import wait_for, write_small_dataset

TIMEOUTS = "[server]\nkeepalive_timeout_s = 3\nheader_timeout_s = 1\nbody_timeout_s = 1\n"


@pytest.fixture
def data(tmp_path):
    return write_small_dataset(tmp_path / "data", ("default",))


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP response with a Content-Length body, read off a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Blocks until the server closes (True) or the 30 s socket timeout (an exception)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def get(path: str, keep_alive: bool = True) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\n"
            + ("" if keep_alive else "Connection: close\r\n") + "\r\n").encode()


def test_idle_keepalive_connection_is_closed(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=TIMEOUTS).start()
    with connect(srv) as sock:
        sock.sendall(get("/health"))
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection", "").lower() != "close"
        assert closed_by_server(sock)  # nothing more: no 408, just the idle close


def test_slow_header_client_is_dropped(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=TIMEOUTS).start()
    with connect(srv) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        sent, stop = [], threading.Event()

        def trickle():  # a header line twice a second: never idle, never done
            while not stop.wait(0.5):
                try:
                    sock.sendall(b"X-Slow-%d: 1\r\n" % len(sent))
                except OSError:
                    return
                sent.append(1)
        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            status, _, body = read_response(sock)
            assert status == 408 and json.loads(body)["error_type"] == "request_timeout"
            assert closed_by_server(sock)
        finally:
            stop.set()
            thread.join(10)
    assert srv.stats()["connections"]["header_timeout"] == 1


def test_slow_header_on_a_kept_alive_connection_is_dropped(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=TIMEOUTS).start()
    with connect(srv) as sock:
        sock.sendall(get("/health"))
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert read_response(sock)[0] == 408
        assert closed_by_server(sock)


def test_silent_connections_and_slow_bodies_are_dropped(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=TIMEOUTS).start()
    silent = [connect(srv) for _ in range(10)]
    slow_body = connect(srv)
    slow_body.sendall(b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"sql\": ")
    try:
        for sock in silent:
            assert read_response(sock)[0] == 408
            assert closed_by_server(sock)
        status, _, body = read_response(slow_body)
        assert status == 408 and "body_timeout_s = 1" in json.loads(body)["error"]
        assert closed_by_server(slow_body)
    finally:
        for sock in [*silent, slow_body]:
            sock.close()
    counts = srv.stats()["connections"]
    assert counts["header_timeout"] == 10 and counts["body_timeout"] == 1
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]


def test_past_max_connections_only_health_is_answered(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=(
        "[server]\nmax_connections = 20\nheader_timeout_s = 60\nkeepalive_timeout_s = 60\n")).start()
    held = [connect(srv) for _ in range(19)]
    observer = connect(srv)  # the 20th: a kept-alive connection that reads the stats
    try:
        def open_connections():
            observer.sendall(get("/api/v1/stats/connections"))
            status, _, body = read_response(observer)
            assert status == 200
            return json.loads(body)["connections"]["open"]
        wait_for(lambda: open_connections() == 20, 20, what="20 open connections")

        with connect(srv) as extra:  # the 21st
            extra.sendall(get("/api/v1/stats/connections"))
            status, headers, body = read_response(extra)
            assert status == 503 and headers["retry-after"]
            doc = json.loads(body)
            assert doc["error_type"] == "overloaded" and "max_connections = 20" in doc["error"]
            assert closed_by_server(extra)
        for path in ("/health", "/health/ready", "/ready", "/health/live"):
            with connect(srv) as probe:
                probe.sendall(get(path))
                assert read_response(probe)[0] == 200, path
                assert closed_by_server(probe)  # an overflow connection serves one request

        for sock in held:
            sock.close()
        wait_for(lambda: open_connections() == 1, 20, what="the held connections to close")
        assert srv.stats()["connections"]["over_limit"] == 1
        assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]
    finally:
        observer.close()
        for sock in held:
            sock.close()


def test_fd_limit_is_raised_to_the_hard_limit(make_server, data):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard)
    if low == hard:
        pytest.skip("the hard open-file limit is too low to tell")
    srv = make_server(data_dir=data, workers=1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the supervisor
    try:
        srv.start(wait_ready=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    srv.wait_ready()
    assert srv.event("listening")["fd_limit"] == hard
    for pid in [srv.process.pid, srv.gateway_pid(), *srv.worker_pids()]:
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    assert not srv.events("fd_limit_low")


def test_connection_keys_are_validated():
    from engine import config as config_mod
    from engine.config import ConfigError

    cfg = config_mod.load(None, env={})
    assert (cfg.server.max_connections, cfg.server.keepalive_timeout_s, cfg.server.header_timeout_s,
            cfg.server.body_timeout_s, cfg.server.raise_fd_limit) == (4096, 30.0, 10.0, 30.0, True)
    for key, bad in (("max_connections", 0), ("keepalive_timeout_s", 0), ("header_timeout_s", -1),
                     ("body_timeout_s", 0), ("raise_fd_limit", "maybe")):
        with pytest.raises(ConfigError, match=f"server.{key}"):
            config_mod.load(None, env={}, overrides={"server": {key: bad}})
    env = {"DUCKFLEET_SERVER_HEADER_TIMEOUT_S": "2.5"}
    assert config_mod.load(None, env=env).server.header_timeout_s == 2.5


def test_connection_metrics(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=TIMEOUTS).start()
    with connect(srv) as sock:
        assert read_response(sock)[0] == 408  # silent: dropped at header_timeout_s
        assert closed_by_server(sock)
    text = srv.get("/metrics").body.decode()
    assert 'duckfleet_http_connections_dropped_total{reason="header_timeout"} 1.0' in text
    assert "duckfleet_http_connections 1.0" in text  # the scrape's own connection
    assert "duckfleet_spill_bytes 0.0" in text


def test_past_the_health_reserve_connections_are_closed_unread(make_server, data):
    from gateway.connections import HEALTH_RESERVE

    srv = make_server(data_dir=data, workers=1, config=(
        "[server]\nmax_connections = 20\nheader_timeout_s = 60\nkeepalive_timeout_s = 60\n")).start()
    held = [connect(srv) for _ in range(19)]
    observer = connect(srv)  # one of the 20: it may always read the stats

    def connection_stats():
        observer.sendall(get("/api/v1/stats/connections"))
        status, _, body = read_response(observer)
        assert status == 200
        return json.loads(body)["connections"]
    try:
        wait_for(lambda: connection_stats()["open"] == 20, 20, what="20 open connections")
        # The reserve's connections have OVERFLOW_HEADER_S (2 s) to ask for health: fill it now.
        held += [connect(srv) for _ in range(HEALTH_RESERVE)]
        wait_for(lambda: connection_stats()["open"] == 20 + HEALTH_RESERVE, 20, what="a full reserve")
        with connect(srv) as late:
            late.sendall(get("/health"))
            try:
                assert late.recv(65536) == b""  # closed unread: not even a 408
            except ConnectionResetError:
                pass
        assert connection_stats()["refused"] == 1
    finally:
        observer.close()
        for sock in held:
            sock.close()


def test_max_connections_is_lowered_to_what_the_fd_limit_leaves(monkeypatch):
    from engine import config as config_mod
    from gateway import app as app_mod
    from gateway.connections import HEALTH_RESERVE

    cfg = config_mod.load(None, env={}, overrides={"workers": {"count": 2}})
    monkeypatch.setattr(app_mod.resource, "getrlimit", lambda _: (1000, 1000))
    connections = app_mod.make_connections(cfg, segments=128)
    assert connections.max == 1000 - 128 - 2 * 2 - app_mod.FD_SPARE - HEALTH_RESERVE
    monkeypatch.setattr(app_mod.resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert app_mod.make_connections(cfg, segments=128).max == cfg.server.max_connections
