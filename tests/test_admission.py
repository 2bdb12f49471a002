"""Admission and the life of a query: queue limits, priorities, timeouts, cancellation,
streaming through a bounded shared-memory pool."""

import http.client
import json
import threading
import time

import duckdb
import pyarrow as pa
import pytest

from harness.server import http_post, http_post_closing, raw_socket_request, wait_for

SLOW_SQL = "SELECT sum(i) AS s FROM range(500000000) t(i)"  # about 1 s on one thread
ENDLESS_SQL = "SELECT sum(i) AS s FROM range(1000000000000) t(i)"
TEN_MILLION = "SELECT i, i * 2 AS j, i % 7 AS k FROM range(10000000) t(i)"


class Blocker:
    """A query that occupies a worker until released: ENDLESS_SQL, with no deadline, from a
    client that disconnects on release (which interrupts it). Tests that need a worker busy
    while they queue requests do not depend on how long anything takes."""

    def __init__(self, srv):
        self.srv = srv
        self.busy_before = srv.stats()["busy"]
        self.sock = raw_socket_request(srv.port, http_post({"sql": ENDLESS_SQL}))
        wait_for(lambda: srv.stats()["busy"] == self.busy_before + 1, 10,
                 what="the blocker to occupy a worker")

    def release(self) -> None:
        self.sock.close()


def in_background(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()))
    thread.start()
    return thread, out


def test_queue_full_and_queue_timeout(make_server):
    srv = make_server(workers=1, config="[queue]\nmax_queue_size = 1\nqueue_timeout_s = 0.5\n").start()
    blocker = Blocker(srv)
    queued, out = in_background(lambda: srv.query("SELECT 1"))
    wait_for(lambda: srv.stats()["queued"] == 1 or "value" in out, 10, what="a queued request")
    full = srv.query("SELECT 2")
    assert full.status == 503 and full.headers["Retry-After"]
    assert full.json()["error_type"] == "overloaded"
    assert "max_queue_size = 1" in full.json()["error"]
    queued.join(30)
    late = out["value"]
    assert late.status == 503 and late.headers["Retry-After"]
    assert "queue_timeout_s = 0.5" in late.json()["error"]
    assert srv.stats()["busy"] == 1, "the blocker held the worker throughout"
    blocker.release()
    wait_for(lambda: srv.stats()["busy"] == 0, 20, what="the blocker to be interrupted")
    assert srv.stats()["rejected"] == {"queue_full": 1, "queue_timeout": 1}
    assert srv.query("SELECT 3 AS x").json()["data"] == [[3]]


def _queue_in_order(srv, priorities, pause: float = 0.0):
    """Occupy the only worker, queue one request per priority in the given order (`pause`
    seconds apart), release the worker; return the order in which they were served.

    That order is the worker's: each query reads the clock as it starts (the one worker runs
    them one after another), not the order in which the client threads see their replies."""
    started: dict[int, int] = {}
    blocker = Blocker(srv)
    threads, errors = [], []
    for n, priority in enumerate(priorities):
        def run(n=n, priority=priority):
            resp = srv.query(f"SELECT {n} AS n, epoch_us(now()) AS t", priority=priority)
            if resp.status != 200:
                errors.append(resp)
            else:
                [[got, started[n]]] = resp.json()["data"]
                assert got == n
        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        wait_for(lambda n=n: srv.stats()["queued"] == n + 1, 10, what="the request to queue")
        if pause:
            queued_at = time.monotonic()  # the input of the test (aging), not a synchronisation
            wait_for(lambda: time.monotonic() - queued_at >= pause, pause + 10, what="the pause")
    assert srv.stats()["served"] == 0, "nothing may have been served before the release"
    blocker.release()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(started) == len(priorities)
    return [priorities[n] for n in sorted(started, key=started.get)]


def test_priority_order_under_contention(make_server):
    srv = make_server(workers=1, config="[queue]\npriority_aging_s = 600\nqueue_timeout_s = 60\n").start()
    assert _queue_in_order(srv, ["low", "normal", "high", "normal", "low", "high"]) == \
        ["high", "high", "normal", "normal", "low", "low"]


def test_aging_serves_a_long_waiting_low_priority_first(make_server):
    srv = make_server(workers=1, config="[queue]\npriority_aging_s = 0.05\nqueue_timeout_s = 60\n").start()
    # The low request has waited 0.5 s, more than two aging steps, when the high one arrives.
    served = _queue_in_order(srv, ["low", "high"], pause=0.5)
    assert served == ["low", "high"]


def test_route_default_priority(make_server):
    srv = make_server(workers=1, config='[queue]\narrow_priority = "low"\npriority_aging_s = 600\n'
                                        'queue_timeout_s = 60\n').start()
    started = {}  # the worker's clock as each query starts: the order it served them
    sql = "SELECT epoch_us(now()) AS t"
    blocker = Blocker(srv)
    a = threading.Thread(target=lambda: started.update(arrow=pa.ipc.open_stream(
        srv.query(sql, path="/api/v1/query/arrow").body).read_all()["t"][0].as_py()))
    a.start()
    wait_for(lambda: srv.stats()["queued_by_priority"]["low"] == 1, 10, what="arrow queued low")
    j = threading.Thread(target=lambda: started.update(json=srv.query(sql).json()["data"][0][0]))
    j.start()
    wait_for(lambda: srv.stats()["queued"] == 2, 10, what="json queued")
    assert srv.stats()["served"] == 0
    blocker.release()
    for t in (a, j):
        t.join(60)
    assert sorted(started, key=started.get) == ["json", "arrow"]


def test_request_timeout_cannot_raise_the_limit(make_server):
    srv = make_server(workers=1, config="[queue]\nquery_timeout_s = 0.5\n").start()
    resp = srv.query(ENDLESS_SQL, timeout_ms=3_600_000)
    assert resp.status == 504 and resp.json()["error_type"] == "timeout"
    assert "0.5 s" in resp.json()["error"]
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]


def test_disconnect_while_queued_leaves_the_queue(make_server):
    srv = make_server(workers=1, config="[queue]\nqueue_timeout_s = 60\n").start()
    blocker = Blocker(srv)
    sock = raw_socket_request(srv.port, http_post({"sql": "SELECT 1"}))
    wait_for(lambda: srv.stats()["queued"] == 1, 10, what="the request to queue")
    sock.close()
    wait_for(lambda: srv.stats()["queued"] == 0, 10, what="the request to leave the queue")
    assert srv.stats()["busy"] == 1  # the blocker is still running: the waiter left by itself
    blocker.release()
    wait_for(lambda: srv.stats()["busy"] == 0, 20, what="the blocker to be interrupted")
    assert srv.stats()["served"] == 1  # the blocker's interrupted query; never the one that left


def test_disconnect_while_running_interrupts_the_query(make_server):
    srv = make_server(workers=1).start()
    sock = raw_socket_request(srv.port, http_post({"sql": ENDLESS_SQL}))
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    sock.close()
    # ENDLESS_SQL would run for half an hour: an idle worker means it was interrupted.
    wait_for(lambda: srv.stats()["busy"] == 0, 20, what="the worker to be freed")
    assert srv.query("SELECT 7 AS x").json()["data"] == [[7]]
    assert srv.stats()["shm_segments_in_use"] == 0


def test_result_larger_than_the_shm_budget_streams_intact(make_server):
    config = "[results]\nchunk_mb = 2\nshm_budget_mb = 8\nshm_prealloc_mb = 0\nshm_idle_mb = 8\n"
    srv = make_server(config=config).start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    conn.request("POST", "/api/v1/query/arrow", json.dumps({"sql": TEN_MILLION}).encode())
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    got = pa.ipc.open_stream(resp).read_all()
    conn.close()
    expected = duckdb.connect(config={"threads": 1}).sql(TEN_MILLION).arrow().read_all()
    assert got.nbytes > 8 * 2**20
    assert got.equals(expected)
    assert srv.stats()["shm_segments_created"] <= 4  # 8 MiB budget / 2 MiB segments


def test_slow_client_does_not_hold_a_worker(make_server):
    srv = make_server(workers=1).start()
    sock = raw_socket_request(srv.port, http_post(
        {"sql": "SELECT i, i * 2 AS j, i % 7 AS k FROM range(1000000) t(i)", "format": "arrow"}))
    # The client reads nothing; the 24 MB result waits in shared memory, the worker is free.
    wait_for(lambda: srv.stats()["served"] == 1 and srv.stats()["busy"] == 0, 20,
             what="the worker to finish while the client is not reading")
    assert srv.stats()["shm_segments_in_use"] >= 1
    assert srv.query("SELECT 8 AS x").json()["data"] == [[8]]
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
        if data.endswith(b"0\r\n\r\n"):
            break
    sock.close()
    body = _dechunk(bytes(data[data.index(b"\r\n\r\n") + 4:]))
    table = pa.ipc.open_stream(body).read_all()
    assert table.num_rows == 1_000_000 and table["j"][999_999].as_py() == 1_999_998


def _dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def test_failure_midway_aborts_the_stream(make_server):
    srv = make_server(config="[results]\nchunk_mb = 1\nmax_result_mb = 20\n").start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", "/api/v1/query/arrow", json.dumps({"sql": TEN_MILLION}).encode())
    resp = conn.getresponse()
    assert resp.status == 200  # streaming had begun when the limit was reached
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    wait_for(lambda: srv.stats()["shm_segments_in_use"] == 0, 10, what="segments back")
    small = srv.query("SELECT * FROM range(100)", format="arrow")
    assert small.status == 200 and small.headers["X-Row-Count"] == "100"
    assert srv.event("stream_aborted")


def test_large_json_streams_and_stays_valid(make_server):
    srv = make_server(config="[results]\nchunk_mb = 1\n").start()
    resp = srv.query("SELECT i, 'v' || i AS s FROM range(300000) t(i)")
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    doc = resp.json()
    assert doc["row_count"] == 300_000 == len(doc["data"]) and doc["data"][-1] == [299_999, "v299999"]
    assert doc["execution_time_ms"] > 0 and doc["error"] is None


# --- slow clients, the stream buffer and the shared-memory budget ---

FORTY_MB = "SELECT i FROM range(5000000) t(i)"  # 40 MB of Arrow
EIGHTY_MB = "SELECT i FROM range(10000000) t(i)"  # 80 MB of Arrow


def _read_all(sock) -> bytes:
    """Everything until the server closes the connection (or resets it)."""
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return bytes(data)


def _arrow_reply(sock) -> pa.Table:
    """Read a whole chunked Arrow reply from a raw socket whose request said Connection: close."""
    data = _read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head, head
    assert body.endswith(b"0\r\n\r\n"), "the stream was cut"
    return pa.ipc.open_stream(_dechunk(body)).read_all()


@pytest.mark.parametrize("how", ["one-segment", "streamed", "cache-hit"])
def test_send_timeout_drops_a_client_that_takes_nothing(make_server, how):
    chunk_mb = 1 if how == "streamed" else 64
    cache = "[query_cache]\nenabled = true\nmax_result_mb = 64\n" if how == "cache-hit" else ""
    srv = make_server(workers=1, config=f"[results]\nchunk_mb = {chunk_mb}\nshm_budget_mb = 256\n"
                                        f"send_timeout_s = 1\n{cache}").start()
    if how == "cache-hit":  # kept in its segment, sent with sendfile(2) to the next asker
        assert srv.query(FORTY_MB, format="arrow").headers["X-Cache"] == "miss"
    sock = raw_socket_request(srv.port, http_post_closing({"sql": FORTY_MB, "format": "arrow"}))
    # The client reads nothing: after send_timeout_s without progress it is dropped, and
    # everything it held is freed (the worker too, if it was waiting for room).
    wait_for(lambda: srv.event("stream_aborted") or srv.event("send_aborted")
             or srv.event("handler_failed"), 30,
             what="the slow client to be dropped")
    assert not srv.events("handler_failed"), srv.event("handler_failed")["traceback"][-300:]
    wait_for(lambda: srv.stats()["shm_segments_in_use"] == 0 and srv.stats()["busy"] == 0, 20,
             what="its segments and worker back")
    data = _read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"HTTP/1.1 500" not in body, "an error response was written into the body"
    if how != "streamed":  # Content-Length: the client sees fewer bytes than announced
        announced = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-length")))
        assert len(body) < announced
    else:  # chunked: the client never sees the last chunk
        assert not body.endswith(b"0\r\n\r\n")
    assert srv.query("SELECT 9 AS x").json()["data"] == [[9]]


def test_stream_buffer_makes_the_worker_wait_for_a_slow_client(make_server):
    # With spilling off (spill_max_mb = 0): the back-pressure that spilling relieves
    # (tests/test_slow_clients.py shows a slow client holding disk instead of its worker).
    srv = make_server(config="[results]\nchunk_mb = 1\nstream_buffer_mb = 2\n"
                             "spill_max_mb = 0\n").start()
    sock = raw_socket_request(srv.port, http_post_closing({"sql": EIGHTY_MB, "format": "arrow"}))
    # Far more than the socket buffers hold: with 2 MiB of buffer, the worker must wait.
    wait_for(lambda: srv.stats()["busy"] == 1 and srv.stats()["shm_segments_in_use"] >= 2, 20,
             what="the result to fill the stream buffer")
    held = next(w for w in srv.stats()["workers"] if w["state"] == "busy")
    peak = 0
    for n in range(20):  # the other worker serves on meanwhile; the held one stays held
        assert srv.query(f"SELECT {n} AS n").json()["data"] == [[n]]
        stats = srv.stats()
        peak = max(peak, stats["shm_segments_in_use"])
        worker = next(w for w in stats["workers"] if w["pid"] == held["pid"])
        assert worker["state"] == "busy" and worker["served"] == held["served"]
    # The slow client's job holds at most its 2 MiB (2 segments); the other worker's
    # queries one more.
    assert peak <= 3, peak
    table = _arrow_reply(sock)
    assert table.num_rows == 10_000_000 and table["i"][9_999_999].as_py() == 9_999_999
    wait_for(lambda: srv.stats()["busy"] == 0 and srv.stats()["shm_segments_in_use"] == 0, 20,
             what="the worker and segments back")


def test_results_contend_for_the_shm_budget_and_wait(make_server):
    config = "[results]\nchunk_mb = 1\nshm_budget_mb = 4\nshm_prealloc_mb = 0\nshm_idle_mb = 4\n"
    srv = make_server(config=config).start()
    socks = [raw_socket_request(srv.port, http_post_closing(
        {"sql": f"{EIGHTY_MB} WHERE i >= {k}", "format": "arrow"})) for k in (0, 1)]
    # Two results larger than the budget, clients not reading: every segment is in use and
    # the writers wait for room (back-pressure, never an error, never a segment over budget).
    wait_for(lambda: srv.stats()["shm_segments_in_use"] == 4 and srv.stats()["shm_waiting"] >= 1,
             20, what="both results to exhaust the budget")
    assert srv.stats()["busy"] == 2 and srv.stats()["shm_segments_created"] == 4
    tables = [None, None]
    readers = [threading.Thread(target=lambda k=k: tables.__setitem__(k, _arrow_reply(socks[k])))
               for k in (0, 1)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(120)
    for k, table in enumerate(tables):
        assert table is not None and table.num_rows == 10_000_000 - k
        assert table["i"][0].as_py() == k and table["i"][-1].as_py() == 9_999_999
    stats = srv.stats()
    assert stats["shm_segments_created"] == 4, "the budget was exceeded"
    wait_for(lambda: srv.stats()["shm_segments_in_use"] == 0, 10, what="segments back")
    assert srv.stats()["rejected"] == {"queue_full": 0, "queue_timeout": 0}


@pytest.mark.parametrize("reason", ["sql_error", "too_large"])
def test_json_failure_midway_aborts_the_stream(make_server, reason):
    limit = "max_result_mb = 3\n" if reason == "too_large" else ""
    srv = make_server(config="[results]\nchunk_mb = 1\n" + limit).start()
    sql = ("SELECT i, CASE WHEN i = 399999 THEN error('deep in the data') ELSE 'v' || i END AS s "
           "FROM range(400000) t(i)" if reason == "sql_error"
           else "SELECT i, 'v' || i AS s FROM range(400000) t(i)")  # about 6 MB of JSON
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", "/api/v1/query", json.dumps({"sql": sql}).encode())
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    conn.close()
    partial = cut.value.partial
    assert partial.startswith(b'{"success":true,"columns":["i","s"],"data":[[0,"v0"]')
    with pytest.raises(ValueError):
        json.loads(partial)  # never a silently short result that parses
    aborted = wait_for(lambda: srv.event("stream_aborted"), 10, what="the abort in the log")
    assert ("deep in the data" if reason == "sql_error" else "max_result_mb") in aborted["error"]
    wait_for(lambda: srv.stats()["shm_segments_in_use"] == 0, 10, what="segments back")
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]
