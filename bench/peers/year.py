"""The year-of-history workload: the dashboard mix over a year of hourly files, where pruning
decides the cost, against an Arc-style tier without pruning and with Arc's regex pruning.

    python -m bench.peers --only history [--quick | --smoke]

Data: the demo's measurements (cpu, mem, disk) as one file an hour for a year (`--quick`: 90
days, `--smoke`: 2 days) up to the end of the current hour (engine.demo.write_history). The mix is bench/peers's
(dashboard.py), live windows 12 hours before the end of the data, exploration within the last
week, sent in two spellings: as dashboards write it (`time >= TIMESTAMP '...'`) and with bare
string literals (`time >= '...'`), the only form Arc's regular expressions see. Peers:
duckfleet (parse-tree pruning), the documented Arc-style tier over the glob views (no
pruning, as bench.peers runs it), and the same tier pruning as Arc's Python tier did
(arc_pruner.py). Also, at c=1, the last-hour panel's p50 in three spellings (TIMESTAMP
literal, string literal, `now() - INTERVAL 1 HOUR`). The mix is planned before the load and its
answers checked as the demo data's are (mixcheck.py: the warm-up, every 10th answer of each
client, every cache-served one), against in-process DuckDB over every row of the history. A
peer's errors and wrong answers are reported; duckfleet's fail the run (verdict.py).
"""

from __future__ import annotations

import http.client
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench.answers import Reference
from bench.common import percentile
from bench.peers import mixcheck, servers, workloads
from bench.peers.dashboard import MixConfig
from bench.peers.datasets import demo_views
from bench.peers.servers import LOOPBACK, Peer
from engine.demo import MEASUREMENTS, write_history

SPELLINGS = {"timestamp": lambda sql: sql, "string": lambda sql: sql.replace("TIMESTAMP '", "'")}
BOOT_TIMEOUT_S = 1200


def plan(mode: str) -> dict:
    if mode == "smoke":
        return {"hours": 48, "concurrencies": [1, 8], "duration": 1.0, "latency_count": 5}
    return {"hours": 90 * 24 if mode == "quick" else 365 * 24, "concurrencies": [1, 32],
            "duration": 2.5 if mode == "quick" else 6.0, "latency_count": 30 if mode == "quick" else 100}


def _post(port: int, sql: str) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=300)
    try:
        conn.request("POST", "/api/v1/query", json.dumps({"sql": sql}).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def last_hour(peer: Peer, end: datetime, count: int) -> dict:
    hour_ago = end - timedelta(hours=1)
    head = "SELECT host, avg(usage_user) AS v FROM cpu WHERE time >= "
    forms = {"timestamp": f"{head}TIMESTAMP '{hour_ago:%Y-%m-%d %H:%M:%S}' GROUP BY host",
             "string": f"{head}'{hour_ago:%Y-%m-%d %H:%M:%S}' GROUP BY host",
             "now": f"{head}now() - INTERVAL 1 HOUR GROUP BY host"}
    out = {}
    for form, sql in forms.items():
        times, errors, globs = [], 0, None
        for _ in range(count):
            started = time.perf_counter()
            status, body, headers = _post(peer.port, sql)
            if status != 200:
                errors += 1
                continue
            times.append((time.perf_counter() - started) * 1000)
            globs = headers.get("X-Arc-Pruned-Globs", globs)
        out[form] = {"p50_ms": percentile(times, 50) if times else None, "errors": errors,
                     "count": count, **({"arc_pruned_globs": globs} if globs is not None else {})}
    return out


def measure(peer: Peer, spelled: dict[str, list[mixcheck.Segment]], warm_sql: list[str],
            reference: Reference, end: datetime, cfg: dict) -> dict:
    result = {"warm_up_wrong": workloads.warm(peer, reference, warm_sql),
              "last_hour": last_hour(peer, end, cfg["latency_count"])}
    for spelling, segments in spelled.items():
        by_c = workloads.dashboard(peer, segments, cfg["duration"], reference, [])
        for c, row in by_c.items():
            if c.isdigit():
                result[f"{spelling}_c{c}"] = {k: row[k] for k in (
                    "qps", "p50_ms", "p99_ms", "requests", "errors", "error_kinds", "first_errors",
                    "client_cpu_share", "answers")}
    return result


def run(tmp: Path, mode: str, workers: int, out: dict) -> None:
    cfg = plan(mode)
    end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    data = tmp / "history-data"
    started = time.perf_counter()
    for m in MEASUREMENTS:
        write_history(data, end, cfg["hours"], measurement=m, fields=MEASUREMENTS[m])
    end = end.replace(tzinfo=None)
    config = MixConfig.ending(end, cfg["hours"])
    result = out["history"] = {"plan": cfg, "files": cfg["hours"] * len(MEASUREMENTS),
                               "write_s": round(time.perf_counter() - started, 1), "peers": {}}
    boot = demo_views(data)
    segments = mixcheck.plan(cfg["concurrencies"], 1, cfg["duration"], config)
    spelled = {name: [s.spelled(spell) for s in segments] for name, spell in SPELLINGS.items()}
    warm_sql = mixcheck.warm_queries(config)
    started = time.perf_counter()
    reference = Reference(data)
    result["answers_expected"] = reference.expect(mixcheck.to_expect(
        [s for by_spelling in spelled.values() for s in by_spelling], warm_sql))
    result["reference_s"] = round(time.perf_counter() - started, 1)
    peers = [
        (f"duckfleet-w{workers}", lambda: servers.duckfleet(f"history-duckfleet-w{workers}", tmp, data,
                                                            workers, boot_timeout=BOOT_TIMEOUT_S)),
        ("arc-documented", lambda: servers.arc_tier("history-arc-documented", tmp, boot, workers, 1, 1,
                                                    servers.arc_memory_limit(workers))),
        ("arc-documented-regex-pruning", lambda: servers.arc_tier(
            "history-arc-regex", tmp, boot, workers, 1, 1, servers.arc_memory_limit(workers), prune_dir=data)),
    ]
    try:
        for name, start in peers:
            def measured(peer) -> None:
                result["peers"][name] = measure(peer, spelled, warm_sql, reference, end, cfg)
                result["peers"][name]["notes"] = peer.notes

            servers.measure_peer(name, start, out, measured, "history")
    finally:
        reference.close()


def markdown(out: dict) -> list[str]:
    h = out.get("history")
    if not h or not h.get("peers"):
        return []
    lines = ["", f"## A year of history ({h['files']:,} hourly files; pruning)", "",
             "The dashboard mix in two spellings of its windows: `TIMESTAMP '...'` (as written) and "
             "bare strings (`'...'`, what Arc's regular expressions match). QPS, p50 / p99 ms, errors, "
             f"answers checked and wrong ({h.get('answers_expected')} expected answers computed before "
             f"the load in {h.get('reference_s')} s).", "",
             "| peer | spelling | c | QPS | p50 | p99 | errors / requests | answers checked | wrong |",
             "|---|---|---|---|---|---|---|---|---|"]
    for peer, r in h["peers"].items():
        for key, row in r.items():
            if "_c" not in key:
                continue
            spelling, c = key.rsplit("_c", 1)
            a = row["answers"]
            lines.append(f"| {peer} | {spelling} | {c} | {row['qps']:.1f} | {row['p50_ms']:.1f} | "
                         f"{row['p99_ms']:.1f} | {row['errors']} / {row['requests']} | {a['checked']} / {a['of']} | "
                         f"{'**' + str(a['wrong']) + '**' if a['wrong'] else 0} |")
        lines += [f"- **wrong at warm-up** {peer}: {e['wrong']} ({e['sql'][:100]})" for e in r["warm_up_wrong"][:3]]
    lines += ["", "Last-hour panel at c=1, p50 ms by spelling of `time >= <an hour ago>`:", "",
              "| peer | TIMESTAMP literal | string literal | now() - INTERVAL 1 HOUR |", "|---|---|---|---|"]
    for peer, r in h["peers"].items():
        cells = [(f"{v['p50_ms']:.1f}" if v["p50_ms"] is not None else "-") + (f" ({v['errors']} errors)" if v["errors"] else "")
                 for v in (r["last_hour"][f] for f in ("timestamp", "string", "now"))]
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    lines += ["", "Arc's regex sees only a string literal right after `time >=`, `>`, `<`, `<=` or "
              "`BETWEEN`; `TIMESTAMP '...'`, `now() - INTERVAL ...` and casts read every file. duckfleet "
              "prunes all three spellings from DuckDB's parse tree."]
    return lines
