"""A slow client holds no worker (issue 17, item 6).

A 10M-row Arrow result (about 240 MB) through a 16 MiB stream buffer: what the client has not
taken waits in a spill file, its worker serves others, and the file goes when the client has
read everything or was dropped. A client reading below min_send_kbps is disconnected; a client
may be sent at most max_streams_per_client streamed results at once.
"""

import http.client
import json
import socket
import time

import numpy as np
import pyarrow as pa
import pytest

from harness.server import http_post, wait_for, write_small_dataset

TEN_MILLION = "SELECT i, i * 2 AS j, i % 7 AS k FROM range(10000000) t(i)"
ARROW_BYTES = 10_000_000 * 3 * 8


@pytest.fixture
def data(tmp_path):
    return write_small_dataset(tmp_path / "data", ("default",))


def spill_files(srv) -> list[str]:
    spill = srv.runtime_dir / "spill"
    return sorted(p.name for p in spill.iterdir()) if spill.exists() else []


def start_arrow(srv, sql: str = TEN_MILLION) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send the query; return once the response's headers came (its first segment is ready)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    conn.request("POST", "/api/v1/query/arrow", json.dumps({"sql": sql}).encode(),
                 {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def check_ten_million(resp: http.client.HTTPResponse) -> None:
    table = pa.ipc.open_stream(resp).read_all()
    assert table.num_rows == 10_000_000
    i = table["i"].to_numpy()
    assert np.array_equal(i, np.arange(10_000_000))  # every piece, in order, memory or disk
    assert np.array_equal(table["j"].to_numpy(), i * 2)


@pytest.mark.timeout(180)
def test_a_client_that_does_not_read_holds_disk_not_its_worker(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=(
        "[results]\nstream_buffer_mb = 16\nmin_send_kbps = 0\nsend_timeout_s = 120\n")).start()
    conn, resp = start_arrow(srv)
    try:
        assert resp.status == 200
        # The only worker finished the query although the client has read nothing.
        wait_for(lambda: (s := srv.stats())["busy"] == 0 and s["served"] == 1, 60,
                 what="the worker to finish while its client reads nothing")
        # Once the copies to disk are done, segments hold the stream buffer, not the result.
        wait_for(lambda: srv.stats()["shm_segments_in_use"] * 8 <= 16 + 8, 60,
                 what="the spill copies to finish")
        stats = srv.stats()
        assert stats["spill_files"] == 1 and stats["spill_bytes"] > ARROW_BYTES // 2, stats
        assert len(spill_files(srv)) == 1
        assert srv.query("SELECT 42 AS x").json()["data"] == [[42]]  # the same, only, worker
        check_ten_million(resp)
    finally:
        conn.close()
    wait_for(lambda: srv.stats()["spill_files"] == 0, 20, what="the spill file to go")
    assert srv.stats()["spill_bytes"] == 0 and spill_files(srv) == []
    assert srv.stats()["spill_bytes_total"] > ARROW_BYTES // 2
    assert not srv.events("stream_aborted")


@pytest.mark.timeout(180)
def test_a_client_reading_below_the_minimum_rate_is_dropped(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=(
        "[results]\nstream_buffer_mb = 16\nmin_send_kbps = 1000\nsend_timeout_s = 1\n")).start()
    received = 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(http_post({"sql": TEN_MILLION, "format": "arrow"}))
        while True:  # about 300 KB/s, a third of the minimum
            try:
                chunk = sock.recv(16 * 1024)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
            time.sleep(0.05)  # the client's pace, not a synchronisation
    assert received < ARROW_BYTES  # a truncated transfer, never a short result
    aborted = wait_for(lambda: srv.events("stream_aborted"), 20, what="the abort")
    assert "min_send_kbps" in aborted[0]["error"]
    wait_for(lambda: (s := srv.stats())["spill_files"] == 0 and s["busy"] == 0, 30,
             what="the spill file to go and the worker to be free")
    assert spill_files(srv) == [] and srv.stats()["shm_segments_in_use"] == 0
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]


@pytest.mark.timeout(180)
def test_streams_per_client_are_limited(make_server, data):
    srv = make_server(data_dir=data, workers=2, config=(
        "[results]\nstream_buffer_mb = 16\nmin_send_kbps = 0\nsend_timeout_s = 120\n"
        "max_streams_per_client = 1\n")).start()
    conn, first = start_arrow(srv)  # holds this client's one stream: it reads nothing yet
    try:
        refused = srv.query(TEN_MILLION, path="/api/v1/query/arrow")
        assert refused.status == 429 and refused.headers["Retry-After"]
        doc = refused.json()
        assert doc["error_type"] == "rate_limited" and "max_streams_per_client = 1" in doc["error"]
        assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]  # one segment: not a stream
        check_ten_million(first)
    finally:
        conn.close()
    wait_for(lambda: srv.stats()["streams_sending"] == 0, 20, what="the first stream to end")
    conn, again = start_arrow(srv)
    try:
        check_ten_million(again)
    finally:
        conn.close()
    stats = srv.stats()
    assert stats["streams_refused"] == 1
    wait_for(lambda: srv.stats()["spill_files"] == 0 and srv.stats()["busy"] == 0, 20,
             what="nothing held")


@pytest.mark.timeout(120)
def test_the_spill_file_goes_with_a_client_that_leaves(make_server, data):
    srv = make_server(data_dir=data, workers=1, config=(
        "[results]\nstream_buffer_mb = 16\nmin_send_kbps = 0\nsend_timeout_s = 120\n")).start()
    conn, resp = start_arrow(srv)
    try:
        wait_for(lambda: (s := srv.stats())["busy"] == 0 and s["spill_files"] == 1, 60,
                 what="the result to wait on disk")
        assert resp.read(1024)  # some bytes, then the client is gone
    finally:
        conn.close()
    wait_for(lambda: (s := srv.stats())["spill_files"] == 0 and s["shm_segments_in_use"] == 0, 20,
             what="the spill file and the segments to be freed")
    assert srv.stats()["spill_bytes"] == 0 and spill_files(srv) == []
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]


def test_slow_client_keys_are_validated():
    from engine import config as config_mod
    from engine.config import ConfigError

    results = config_mod.load(None, env={}).results
    assert (results.spill_max_mb, results.min_send_kbps, results.max_streams_per_client) == (4096, 32, 4)
    for key in ("spill_max_mb", "min_send_kbps", "max_streams_per_client"):
        with pytest.raises(ConfigError, match=f"results.{key}"):
            config_mod.load(None, env={}, overrides={"results": {key: -1}})
        assert getattr(config_mod.load(None, env={}, overrides={"results": {key: 0}}).results, key) == 0
