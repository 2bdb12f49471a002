"""A Quack server process: one DuckDB database serving every client, as DuckDB ships it.

    python -m bench.peers.quack_server URI TOKEN BOOT_SQL_FILE THREADS

Runs the boot statements (views), starts quack_serve (which serves from DuckDB's own threads),
prints "ready" and sleeps until SIGTERM. The harness owns this process (servers.py).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import duckdb

from engine.extensions import load


def main(uri: str, token: str, boot_file: str, threads: str) -> None:
    con = duckdb.connect(config={"threads": int(threads)})
    load(con, "httpfs", "quack")
    for statement in Path(boot_file).read_text().splitlines():
        if statement.strip():
            con.execute(statement)
    con.execute("SELECT * FROM quack_serve(?, token := ?, disable_ssl := true)", [uri, token]).fetchall()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os._exit(0)  # no files to flush; skips joining the server's threads, which can hang


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(*sys.argv[1:])
