"""Messages between the gateway and the workers, over Unix stream sockets.

Each frame is an 8-byte header (magic b"DF", protocol version, a reserved byte, payload
length as a big-endian u32) and a msgpack payload: one tagged msgspec struct. Messages are
small: result bytes never cross the socket, they stay in shared memory. A frame with the
wrong magic or version raises ProtocolError; the peer then drops the connection.
The worker uses the blocking helpers, the gateway the asyncio ones.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgspec

from engine.errors import Kind

VERSION = 5  # 3: Query.databases, streaming (Grant, Chunk), Welcome, Bye, Status; 4: Query.catalog
# 5: Progress; Failure.kind typed; Hello without settings (the worker logs them); Query.fills
MAGIC = b"DF"
HEADER = struct.Struct("!2sBxI")
MAX_FRAME = 64 * 1024 * 1024  # SQL text and parameters; results travel in shared memory


class ProtocolError(Exception):
    pass


class Hello(msgspec.Struct, tag=True, frozen=True):
    """Worker -> gateway, once, after the worker has verified its settings."""
    worker_id: int
    pid: int
    memory_limit: int


class Welcome(msgspec.Struct, tag=True, frozen=True):
    """Gateway -> worker, after Hello: the worker is in the dispatch set. Only now may it tell
    the supervisor it is ready, which lets a worker it replaces leave without a gap."""


class Query(msgspec.Struct, tag=True, frozen=True):
    """Gateway -> worker: run sql, write the encoded result into the lent segment.

    A result larger than chunk_bytes is written as a sequence of segments: each full one is
    handed back in a Chunk, and the worker continues in the next segment the gateway Grants.
    `databases` limits what the query may read to those databases (a token's scope); None
    means the whole catalog. `catalog` is the version of the gateway's table set: a worker
    whose views are older makes them again before it runs the query, reading the tables in
    `evolved` (files of several schemas) by name. With `fills`, `sql` is a planned statement
    holding markers, each replaced by its value before it runs (engine/sqltree.fill).
    """
    id: int
    sql: str
    format: str
    segment: str
    chunk_bytes: int
    params: list[Any] | None = None
    max_result_bytes: int = 0
    batch_rows: int = 122880
    timeout_s: float = 0.0  # the gateway's deadline, for the worker's heartbeat
    databases: list[str] | None = None
    catalog: int = 0
    evolved: list[str] | None = None
    fills: dict[str, str | list[str]] | None = None


class Grant(msgspec.Struct, tag=True, frozen=True):
    """Gateway -> worker: one more segment for query `id` (ignored once it has finished)."""
    id: int
    segment: str


class Cancel(msgspec.Struct, tag=True, frozen=True):
    """Gateway -> worker: stop query `id` if it is still running."""
    id: int


class Chunk(msgspec.Struct, tag=True, frozen=True):
    """Worker -> gateway: the next `length` bytes of query `id`'s result are in `segment`."""
    id: int
    segment: str
    length: int


class Result(msgspec.Struct, tag=True, frozen=True):
    """Worker -> gateway, final: the last `length` bytes of the result are in `segment`.

    After a final message (Result or Failure) the worker holds no segment of this query.
    """
    id: int
    segment: str
    length: int
    rows: int
    execution_ms: float


class Bye(msgspec.Struct, tag=True, frozen=True):
    """Worker -> gateway: send me no more queries (reason: recycled because of what, or stop).

    The worker still answers what it was sent; it exits when the gateway closes the socket,
    which the gateway does once the worker is idle.
    """
    reason: str


class Status(msgspec.Struct, tag=True, frozen=True):
    """Worker -> gateway, while idle: memory as the worker measures it."""
    rss: int
    duckdb_memory: int
    queries: int
    connections: int  # DuckDB connections opened so far (recreated after memory growth)


class Failure(msgspec.Struct, tag=True, frozen=True):
    """Worker -> gateway: query `id` failed."""
    id: int
    kind: Kind
    message: str


class Progress(msgspec.Struct, tag=True, frozen=True):
    """Worker -> gateway, while query `id` runs: DuckDB's estimate (percent, -1 when it cannot
    tell) and the rows written so far."""
    id: int
    percent: float
    rows: int


Message = Hello | Welcome | Query | Grant | Cancel | Chunk | Result | Failure | Bye | Status | Progress
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def pack(message: Message) -> bytes:
    payload = _encoder.encode(message)
    return HEADER.pack(MAGIC, VERSION, len(payload)) + payload


def _payload_length(header: bytes) -> int:
    magic, version, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, expected {VERSION}")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is over the {MAX_FRAME} limit")
    return length


def unpack(payload: bytes) -> Message:
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ProtocolError(str(exc)) from None


# --- blocking side (worker) ---

def send(sock: socket.socket, message: Message) -> None:
    sock.sendall(pack(message))


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def recv(sock: socket.socket) -> Message | None:
    """The next message, or None when the peer closed the connection."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    payload = _recv_exactly(sock, _payload_length(header))
    if payload is None:
        return None
    return unpack(payload)


# --- asyncio side (gateway) ---

async def read(reader: asyncio.StreamReader) -> Message | None:
    try:
        header = await reader.readexactly(HEADER.size)
        payload = await reader.readexactly(_payload_length(header))
    except asyncio.IncompleteReadError:
        return None
    return unpack(payload)


def write(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(pack(message))
