"""Micro benchmarks (pytest-benchmark) of the pieces every query goes through.

    python -m pytest bench/test_micro.py --benchmark-only

Not collected by the default `python -m pytest` (testpaths = ["tests"]), and no wall-clock
thresholds: these report timings, they do not judge them.
  - protocol: one Query frame and one Result frame, packed and unpacked (engine/protocol.py)
  - shared memory: 8 MiB written through a ChunkWriter into a Segment, and read back by the
    mapping the gateway holds (gateway/segments.py)
  - encoders: a 100,000-row result as JSON, CSV and Arrow (engine/encode.py)
"""

from __future__ import annotations

import io
import os
import secrets

import duckdb
import pytest

from engine import protocol
from engine.encode import write_result
from engine.shm import SHM_DIR, ChunkWriter, fleet_prefix
from gateway.segments import Segment

MIB = 2 ** 20
SEGMENT_BYTES = 8 * MIB
ROWS = 100_000


def _roundtrip(message):
    frame = protocol.pack(message)
    return protocol.unpack(frame[protocol.HEADER.size:])


def test_protocol_query_frame(benchmark):
    query = protocol.Query(id=7, sql="SELECT host, avg(usage_user) FROM cpu WHERE time >= "
                                     "'2025-11-03' GROUP BY host ORDER BY host",
                           format="arrow", segment="duckfleet.1.2.abcdef0123456789abcdef01",
                           chunk_bytes=SEGMENT_BYTES, params=[1, "x"], timeout_s=30.0)
    assert benchmark(_roundtrip, query) == query


def test_protocol_result_frame(benchmark):
    result = protocol.Result(id=7, segment="duckfleet.1.2.abcdef0123456789abcdef01",
                             length=123456, rows=1000, execution_ms=12.5)
    assert benchmark(_roundtrip, result) == result


@pytest.fixture
def segment():
    # Named like a fleet of this process: a supervisor's sweep removes it if this test dies.
    seg = Segment(f"{fleet_prefix(os.getpid())}micro.{secrets.token_hex(8)}", SEGMENT_BYTES)
    try:
        yield seg
    finally:
        seg.destroy()
    assert not (SHM_DIR / seg.name).exists()


def test_shm_handoff_8mib(benchmark, segment):
    payload = os.urandom(SEGMENT_BYTES)

    def handoff() -> int:
        writer = ChunkWriter(segment.name, SEGMENT_BYTES, 0, hand_over=lambda *_: None,
                             next_segment=lambda: segment.name)
        writer.write(payload)
        writer.close()
        return len(bytes(segment.view[:writer.total]))  # what the gateway sends on

    assert benchmark(handoff) == SEGMENT_BYTES


@pytest.fixture(scope="module")
def result_relation():
    con = duckdb.connect(config={"threads": 1})
    rel = con.sql(f"SELECT i AS id, TIMESTAMP '2025-11-01' + INTERVAL (i) SECOND AS time, "
                  f"printf('server%02d', i % 10 + 1) AS host, i * 0.25 AS usage "
                  f"FROM range({ROWS}) t(i)")
    yield rel
    con.close()


@pytest.mark.parametrize("fmt", ["json", "csv", "arrow"])
def test_encode_100k_rows(benchmark, result_relation, fmt):
    def encode() -> int:
        return write_result(result_relation, fmt, io.BytesIO(), 122880)

    assert benchmark(encode) == ROWS
