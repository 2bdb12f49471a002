"""The demo dataset: deterministic Arc-style measurements in Arc's Parquet layout.

`python -m engine.demo DATA_DIR` writes <DATA_DIR>/default/{cpu,mem,disk}/YYYY/MM/DD/HH/*.parquet:
one file per measurement and hour over one week (168 hours) from START, 10 hosts in 3 regions,
one sample per host every 18 s: 2,000 rows per file, 1,008,000 rows in all. Values are pure
functions of (host, time), so every run writes the same rows. Run by the supervisor in a
child process (DuckDB starts threads; the supervisor never imports it). The files are written
into a hidden directory and renamed into place, so a crash never leaves half a dataset.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

START = datetime(2025, 11, 1, tzinfo=timezone.utc)
HOURS = 168
HOSTS = 10
SAMPLE_EVERY_S = 18
DATABASE = "default"

# Per-measurement fields, as SQL over h (host number), t (epoch seconds) and i (sample number).
MEASUREMENTS = {
    "cpu": """
        round(35 + 25 * sin(t / 3600.0 + h) + (i * 7919 + h * 104729) % 1000 / 100.0, 2) AS usage_user,
        round(8 + 4 * cos(t / 5400.0 + h) + (i * 6151 + h * 3079) % 300 / 100.0, 2) AS usage_system,
        round(100 - (35 + 25 * sin(t / 3600.0 + h)) - (8 + 4 * cos(t / 5400.0 + h)), 2) AS usage_idle""",
    "mem": """
        round(55 + 20 * sin(t / 7200.0 + h * 0.7) + (i * 2654435761 % 997) / 200.0, 2) AS used_percent,
        (17179869184 * (1 - (55 + 20 * sin(t / 7200.0 + h * 0.7)) / 100))::BIGINT AS available_bytes""",
    "disk": """
        ('/data' || (h % 2)) AS path,
        round(40 + h * 3 + (t - EPOCH(TIMESTAMP '2025-11-01')) / 86400.0, 3) AS used_percent,
        (536870912000 * (1 - (40 + h * 3) / 100.0))::BIGINT AS free_bytes""",
}


def hour_query(measurement: str, hour: datetime) -> str:
    epoch = int(hour.timestamp())
    per_host = 3600 // SAMPLE_EVERY_S
    return f"""
        SELECT to_timestamp(t)::TIMESTAMP AS time,
               printf('server%02d', h + 1) AS host,
               ['us-east', 'us-west', 'eu-west'][h % 3 + 1] AS region,
               {MEASUREMENTS[measurement]}
        FROM (SELECT r % {HOSTS} AS h, r // {HOSTS} AS i,
                     {epoch} + (r // {HOSTS}) * {SAMPLE_EVERY_S} AS t
              FROM range({HOSTS * per_host}) AS s(r))
        ORDER BY time, host"""


def write_demo(data_dir: Path) -> int:
    """Write the dataset under data_dir; returns the number of rows."""
    import duckdb

    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=data_dir))
    rows = 0
    try:
        con = duckdb.connect()
        for measurement in MEASUREMENTS:
            for n in range(HOURS):
                hour = START + timedelta(hours=n)
                folder = staging / DATABASE / measurement / hour.strftime("%Y/%m/%d/%H")
                folder.mkdir(parents=True)
                target = folder / f"{measurement}_{hour:%Y%m%d%H}.parquet"
                rows += con.execute(f"COPY ({hour_query(measurement, hour)}) TO '{target}' "
                                    "(FORMAT parquet, COMPRESSION zstd)").fetchone()[0]
        con.close()
        (staging / DATABASE).rename(data_dir / DATABASE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return rows


# write_history's default fields (cpu-like), as SQL over h, t and i like MEASUREMENTS.
HISTORY_FIELDS = """
        round(35 + 25 * ((t + h) % 97) / 97, 2) AS usage_user,
        round(round(35 + 25 * ((t + h) % 97) / 97, 2) / 4, 2) AS usage_system"""
HISTORY_SAMPLES = 36  # a file's samples per host: one every 100 s


def write_history(data_dir: Path, end: datetime, hours: int, database: str = DATABASE,
                  measurement: str = "cpu", evolved_hours: int = 0, hosts: int = HOSTS,
                  fields: str = HISTORY_FIELDS) -> int:
    """A long history for pruning tests and benchmarks: one file per hour for `hours` hours up
    to `end` (exclusive, truncated to the hour), `hosts` hosts x 36 samples (every 100 s) a file,
    with columns time, host, region and `fields` (SQL over h, t, i; MEASUREMENTS[m] gives the
    demo's measurement m). The last `evolved_hours` files have an evolved schema: region gone,
    and usage_idle (100 - usage_user) added if `fields` has none. One DuckDB query computes
    every row, pyarrow writes the files (thousands in seconds); values are pure functions of
    (host, time). Returns the number of rows."""
    import duckdb
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    end = end.replace(minute=0, second=0, microsecond=0)
    first = int((end - timedelta(hours=hours)).timestamp())
    per_file = hosts * HISTORY_SAMPLES
    names = [f"server{h + 1:02d}" for h in range(hosts)]
    # Rows come out in range() order (DuckDB preserves insertion order), so file n is the
    # n-th slice of per_file rows.
    con = duckdb.connect()
    try:
        table = con.execute(f"""
            SELECT make_timestamp(t * 1000000) AS time, {names}[h + 1] AS host,
                   ['us-east', 'us-west', 'eu-west'][h % 3 + 1] AS region, {fields}
            FROM (SELECT r % {hosts} AS h, (r // {hosts}) % {HISTORY_SAMPLES} AS i,
                         {first} + (r // {per_file}) * 3600 + ((r // {hosts}) % {HISTORY_SAMPLES}) * 100 AS t
                  FROM range({hours * per_file}) AS s(r))""").to_arrow_table()
    finally:
        con.close()

    def write(n: int) -> None:
        hour = end - timedelta(hours=hours - n)
        part = table.slice(n * per_file, per_file)
        if n >= hours - evolved_hours:
            part = part.drop_columns(["region"])
            if "usage_idle" not in part.column_names:
                part = part.append_column("usage_idle", pc.round(pc.subtract(100, part["usage_user"]), 2))
        folder = data_dir / database / measurement / hour.strftime("%Y/%m/%d/%H")
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, folder / f"{measurement}_{hour:%Y%m%d%H}.parquet")

    # pyarrow releases the GIL while it encodes and writes: a few threads halve the time.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in pool.map(write, range(hours)):
            pass
    return table.num_rows


if __name__ == "__main__":
    print(write_demo(Path(sys.argv[1])))
