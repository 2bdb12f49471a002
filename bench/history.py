"""History benchmark: does a query's cost follow its window, not the history? In one run:

    python -m bench.history [--quick] [--workers 2]

Data: the demo's three measurements (cpu, mem, disk; engine.demo.MEASUREMENTS) as one file an
hour for a year (`--quick`: 90 days) up to the end of the current hour, and "the week": hard
links to the same files of its last 168 hours. Over each, a duckfleet of `--workers` workers
(cache off) is measured:

1. `SELECT 1` and the last-hour panel (`SELECT host, avg(usage_user) FROM cpu WHERE time >=
   <an hour ago> GROUP BY host`, with a literal and with `now() - INTERVAL 1 HOUR`), p50 at c=1,
   sequential requests on one keep-alive connection.
2. The dashboard mix of bench/peers (20 panels; live windows 12 h before the end of the data,
   advancing with the clock; exploration within the last week) at c=1 and c=32, closed loop:
   QPS, p50, p99, errors, the client's CPU share, and files scanned and pruned from the access
   log. Year and week use the same seeds, so they send the same kinds of windows.
3. The in-process ceiling over the week (bench/peers/ceiling.py, as many single-threaded DuckDB
   processes as workers, no HTTP, no client): over views of the glob, as bench.peers runs it,
   and over exactly the hour files each window needs; half right before the week's c=32 run
   and half right after it, so the ratios hold on a machine whose speed drifts.
4. TPC-H (SF1; `--quick` SF 0.1): the 22 queries through duckfleet and in in-process DuckDB
   (threads=1), one warm pass each, then the same timed passes interleaved query by query
   (bench/peers/tpch.py side_by_side: the machine's drift moves both alike), every result
   compared.

Answers are checked: each panel once at warm-up, then every 10th request of each client and
the first of every panel in each run, kept and compared after its run with in-process DuckDB over tables loaded from
`read_parquet('<dir>/default/<m>/**/*.parquet', union_by_name = true)` of the same data (so the
reference does not depend on pruning at all). The last JSON line printed is the report (also
written to bench/results/history-<UTC time>.json). Exit 1 if any duckfleet request fails, any
answer is wrong, or a process or shared-memory segment is left behind; a missed target is
reported, not a failure. Every load loop is bounded in time and count, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import duckdb
import psutil

from bench.answers import Reference, check_answer
from bench.common import RESULTS, percentile, raise_on_stop_signals
from bench.peers import servers, tpch
from bench.peers.ceiling import HourFiles, ceiling_qps
from bench.peers.dashboard import PANELS, WINDOWS, DashboardMix, MixConfig, panel_sql
from bench.peers.datasets import demo_views, tpch_dataset, tpch_views
from bench.peers.loadgen import Reply, closed_loop
from bench.peers.servers import LOOPBACK, Peer
from engine.demo import MEASUREMENTS, write_history
from harness.server import Server

WEEK = 168
SAMPLE_EVERY = 10  # check every 10th request of each client, and each panel's first
TPCH_CONFIG = '[catalog]\ndefault_database = "tpch"\ndemo = false\n[queue]\nqueue_timeout_s = 600\n'


def plan(quick: bool) -> dict:
    if quick:
        return {"hours": 90 * 24, "duration_s": 3.0, "latency_count": 100, "tpch_sf": 0.1,
                "tpch_runs": 1, "boot_timeout_s": 600}
    return {"hours": 365 * 24, "duration_s": 15.0, "latency_count": 500, "tpch_sf": 1,
            "tpch_runs": 3, "boot_timeout_s": 1200}


# --- data ---

def write_data(root: Path, end: datetime, hours: int) -> dict:
    """The year (or quick span) of every measurement, and the week as hard links to its end."""
    year, week = root / "year", root / "week"
    started = time.perf_counter()
    rows = sum(write_history(year, end, hours, measurement=m, fields=MEASUREMENTS[m])
               for m in MEASUREMENTS)
    written = time.perf_counter() - started
    first_week_hour = (end - timedelta(hours=WEEK)).replace(tzinfo=None)
    links = 0
    for path in sorted(year.glob("*/*/*/*/*/*/*.parquet")):
        y, m, d, h = path.parts[-5:-1]
        if datetime(int(y), int(m), int(d), int(h)) >= first_week_hour:
            target = week / path.relative_to(year)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
            links += 1
    return {"year_dir": str(year), "week_dir": str(week), "hours": hours, "rows": rows,
            "files": hours * len(MEASUREMENTS), "week_files": links,
            "write_s": round(written, 2), "files_per_s": round(hours * len(MEASUREMENTS) / written)}


# --- duckfleet ---

@contextlib.contextmanager
def fleet(name: str, tmp: Path, data: Path, workers: int, boot_timeout: float, out: dict,
          config: str = ""):
    """A duckfleet on `data`; with a year of files, boot reads every file's schema once, so it
    is given `boot_timeout` instead of the harness's 30 s."""
    server = Server(tmp / name, data, workers=workers, config=config)
    started = time.perf_counter()
    try:
        server.start(wait_ready=False)
        out["fleet_pids"].append(server.process.pid)
        server.wait_ready(timeout=boot_timeout)
        out.setdefault("boot_s", {})[name] = round(time.perf_counter() - started, 1)
        yield server
    finally:
        if server.process is not None:
            try:
                code = server.stop()
                if code != 0:
                    out["problems"].append(f"{name}: supervisor exited with {code}")
            except Exception as exc:  # stuck: kill the group, and say so
                out["problems"].append(f"{name}: stop failed: {exc!r}")
                servers._stop_group(server.process, grace=0)
        shutil.rmtree(server.runtime_base, ignore_errors=True)


def _peer(server: Server) -> Peer:
    return Peer(server.tmp.name, "http", port=server.port, pids=[server.process.pid])


def _post(conn: http.client.HTTPConnection, sql: str) -> tuple[int, bytes]:
    conn.request("POST", "/api/v1/query", json.dumps({"sql": sql}).encode(),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def sequential(server: Server, sql: str, count: int, out: dict) -> dict:
    """p50/p99 of `count` requests one after another on one keep-alive connection (after
    count // 10 unmeasured), and the last answer's rows."""
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=120)
    times, errors, body = [], 0, b""
    try:
        for n in range(count + count // 10):
            started = time.perf_counter()
            status, body = _post(conn, sql)
            elapsed = (time.perf_counter() - started) * 1000
            if status != 200:
                errors += 1
                out["problems"].append(f"{sql[:80]}: {status} {body[:200]!r}")
                conn.close()
                conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=120)
            elif n >= count // 10:
                times.append(elapsed)
    finally:
        conn.close()
    rows = json.loads(body)["data"] if body and not errors else []
    return {"count": len(times), "errors": errors, "p50_ms": percentile(times, 50) if times else None,
            "p99_ms": percentile(times, 99) if times else None, "rows": rows}


def latency(server: Server, end: datetime, count: int, reference: Reference, out: dict) -> dict:
    hour_ago = (end - timedelta(hours=1)).replace(tzinfo=None)
    literal = ("SELECT host, avg(usage_user) AS v FROM cpu WHERE time >= "
               f"TIMESTAMP '{hour_ago:%Y-%m-%d %H:%M:%S}' GROUP BY host ORDER BY host")
    relative = ("SELECT host, avg(usage_user) AS v FROM cpu WHERE time >= now() - INTERVAL 1 HOUR "
                "GROUP BY host ORDER BY host")
    result = {"select_1": sequential(server, "SELECT 1", count, out),
              "last_hour_literal": sequential(server, literal, count, out),
              "last_hour_now": sequential(server, relative, count, out)}
    wrong = check_answer(reference, literal, result["last_hour_literal"]["rows"], None)
    if wrong:
        out["wrong_answers"].append({"sql": literal, "wrong": wrong})
    for r in result.values():
        r.pop("rows")
    result["sql"] = {"last_hour_literal": literal, "last_hour_now": relative}
    return result


class Sample:
    """Keeps every SAMPLE_EVERY-th reply of each client and the first of each panel."""

    def __init__(self):
        self.panel_of: dict[int, str] = {}
        self.count: dict[int, int] = {}
        self.seen: set[str] = set()
        self.kept: list[tuple[str, str, bytes]] = []
        self.replies = 0

    def next_sql(self, mix: DashboardMix, n: int) -> str:
        panel, end, length = mix.next_panel()
        self.panel_of[n] = panel
        return panel_sql(panel, end, length)

    def on_reply(self, reply: Reply) -> None:
        self.replies += 1
        k = self.count.get(reply.client, 0)
        self.count[reply.client] = k + 1
        panel = self.panel_of[reply.client]
        if reply.status == 200 and (k % SAMPLE_EVERY == 0 or panel not in self.seen):
            self.seen.add(panel)
            self.kept.append((panel, reply.sql, reply.body))


def check(sample: Sample, reference: Reference, out: dict, label: str) -> dict:
    wrong = 0
    for panel, sql, body in sample.kept:
        reply = json.loads(body)
        problem = check_answer(reference, sql, reply["data"], reply["columns"])
        if problem:
            wrong += 1
            out["wrong_answers"].append({"run": label, "panel": panel, "sql": sql, "wrong": problem})
    return {"checked": len(sample.kept), "of": sample.replies,
            "share": round(len(sample.kept) / max(1, sample.replies), 3),
            "panels_checked": len(sample.seen), "wrong": wrong}


def mix_run(server: Server, config: MixConfig, c: int, duration: float, reference: Reference,
            out: dict, label: str) -> dict:
    epoch = time.time()
    mixes = [DashboardMix(seed=c * 100 + n, epoch=epoch, config=config) for n in range(c)]
    sample = Sample()
    logged = len(server.events("access"))
    cpu_before = cpu_by_role(server)
    stats = closed_loop(_peer(server), lambda n: sample.next_sql(mixes[n], n), c, duration,
                        max_requests=50_000, on_reply=sample.on_reply)
    cpu_after = cpu_by_role(server)
    access = [e for e in server.events("access")[logged:] if e.get("path") == "/api/v1/query"]
    stats["files_scanned"] = sum(e.get("files_scanned") or 0 for e in access)
    stats["files_pruned"] = sum(e.get("files_pruned") or 0 for e in access)
    stats["files_scanned_per_query"] = round(stats["files_scanned"] / max(1, len(access)), 1)
    stats["server_p50_ms"] = _server_split(access)
    stats["server_cpu_share"] = {role: round((cpu_after.get(role, 0) - cpu_before.get(role, 0))
                                             / stats["duration_s"], 3) for role in cpu_after}
    stats["answers"] = check(sample, reference, out, label)
    if stats["errors"]:
        out["problems"].append(f"{label}: {stats['errors']} errors {stats['error_kinds']}")
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}


def cpu_by_role(server: Server) -> dict[str, float]:
    """CPU seconds so far of the fleet's processes, by role (gateway, workers, supervisor)."""
    seconds: dict[str, float] = {}
    try:
        procs = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(True)]
    except psutil.Error:
        return seconds
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            role = ("gateway" if "gateway.app" in cmd else "workers" if "engine.worker" in cmd
                    else "supervisor" if "engine.supervisor" in cmd else "other")
            t = proc.cpu_times()
            seconds[role] = seconds.get(role, 0.0) + t.user + t.system
    return seconds


def _server_split(access: list[dict]) -> dict:
    """p50 of the access log's times: where a request's time went on the server."""
    def p50(key):
        values = [e[key] for e in access if e.get(key) is not None]
        return round(percentile(values, 50), 3) if values else None
    return {k: p50(k) for k in ("duration_ms", "wait_ms", "execution_ms", "send_ms")}


def warm(server: Server, config: MixConfig, reference: Reference, out: dict, label: str) -> int:
    """Every panel once (a live 1 h window), each answer checked: every panel is checked at
    least once per dataset, whatever the sample of a short run happens to hold."""
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=300)
    try:
        for panel in PANELS:
            sql = panel_sql(panel, config.now0, next(iter(WINDOWS)))
            status, body = _post(conn, sql)
            if status != 200:
                raise RuntimeError(f"warm-up {panel}: {status} {body[:300]!r}")
            reply = json.loads(body)
            problem = check_answer(reference, sql, reply["data"], reply["columns"])
            if problem:
                out["wrong_answers"].append({"run": f"{label} warm-up", "panel": panel, "sql": sql,
                                             "wrong": problem})
    finally:
        conn.close()
    return len(PANELS)


def dataset_runs(name: str, tmp: Path, data: Path, config: MixConfig, end: datetime, cfg: dict,
                 workers: int, out: dict, ceilings: Callable[[float], dict] | None = None) -> dict:
    """`ceilings(duration)`, if given, measures the in-process ceilings for half the mix's
    duration right before its c=32 run and again right after (the fleet idle): their ratio to
    it then holds on a machine whose speed drifts (result["ceiling"])."""
    print(f"[history] {name}: starting duckfleet, loading the reference", flush=True)
    result = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # DuckDB releases the GIL: the reference loads while the fleet boots.
        started = time.perf_counter()
        loading = pool.submit(Reference, data)
        loading.add_done_callback(lambda _: result.__setitem__(
            "reference_load_s", round(time.perf_counter() - started, 1)))
        try:
            with fleet(f"duckfleet-{name}", tmp, data, workers, cfg["boot_timeout_s"], out) as server:
                result["boot_s"] = out["boot_s"][f"duckfleet-{name}"]
                result["boot_note"] = "boot_s: while the reference loads in this process, on the same cores"
                reference = loading.result()
                result["warm_up_checked"] = warm(server, config, reference, out, name)
                result["latency"] = latency(server, end, cfg["latency_count"], reference, out)
                for c in (1, 32):
                    around = ceilings is not None and c == 32
                    before = ceilings(cfg["duration_s"] / 2) if around else None
                    print(f"[history] {name}: mix c={c}", flush=True)
                    result[f"mix_c{c}"] = mix_run(server, config, c, cfg["duration_s"], reference,
                                                  out, f"{name} c={c}")
                    if around:
                        result["ceiling"] = bracket(before, ceilings(cfg["duration_s"] / 2))
            if name == "week":
                result["pruned_ceiling_checked"] = check_pruned_ceiling(data, config, reference, out)
        finally:
            with contextlib.suppress(Exception):
                loading.result().close()
    return result


def bracket(before: dict, after: dict) -> dict:
    """Each ceiling's two halves as one measurement."""
    joined = {}
    for form, first in before.items():
        second = after[form]
        queries, duration = first["queries"] + second["queries"], first["duration_s"] + second["duration_s"]
        joined[form] = {**first, "queries": queries, "duration_s": duration, "qps": queries / duration,
                        "halves_qps": [first["qps"], second["qps"]]}
    return joined


def check_pruned_ceiling(data: Path, config: MixConfig, reference: Reference, out: dict) -> int:
    """The pruned ceiling's rewrite must answer as the reference does, or its QPS means nothing."""
    hours, con, checked = HourFiles(data), duckdb.connect(config={"threads": 1}), 0
    try:
        ends = [config.now0, config.start + timedelta(hours=config.hours - 30),
                config.start + timedelta(hours=config.hours)]
        for panel in PANELS:
            for length in WINDOWS:
                for end in ends:
                    sql = panel_sql(panel, end, length)
                    cursor = con.execute(hours.sql(panel, end, length))
                    got = cursor.fetchall()
                    problem = check_answer(reference, sql, got, [d[0] for d in cursor.description])
                    if problem:
                        out["problems"].append(f"pruned ceiling {panel} {end} {length}: {problem}")
                    checked += 1
    finally:
        con.close()
    return checked


# --- TPC-H ---

def run_tpch(tmp: Path, cfg: dict, workers: int, out: dict) -> dict:
    data, queries = tpch_dataset(cfg["tpch_sf"])
    result = {"scale_factor": cfg["tpch_sf"], "runs": cfg["tpch_runs"]}
    with servers.in_process("in-process-1thread", tpch_views(data), 1) as ref_peer:
        print("[history] tpch: in-process, threads=1", flush=True)
        reference = tpch.reference_tables(ref_peer, queries)  # its warm pass
        print("[history] tpch: duckfleet beside in-process, query by query", flush=True)
        with fleet("duckfleet-tpch", tmp, data, workers, cfg["boot_timeout_s"], out, TPCH_CONFIG) as server:
            result["duckfleet"], result["in_process_1thread"] = tpch.side_by_side(
                [_peer(server), ref_peer], queries, reference, cfg["tpch_runs"])
    fleet_run = result["duckfleet"]
    for r in (result["in_process_1thread"], fleet_run):
        r.pop("per_query_s", None)
    if fleet_run["errors"] or fleet_run["mismatches"]:
        out["problems"].append("tpch: duckfleet errors or mismatches")
        out["wrong_answers"] += [{"tpch": m} for m in fleet_run["mismatches"]]
    return result


# --- targets and the report ---

def _target(name: str, measured: float | None, limit: float, higher_is_better: bool, what: str) -> dict:
    if measured is None:
        return {"target": name, "measured": None, "limit": limit, "met": False, "what": what}
    met = measured >= limit if higher_is_better else measured <= limit
    return {"target": name, "measured": round(measured, 3), "limit": limit, "met": met, "what": what}


def targets(out: dict) -> list[dict]:
    year, week = out.get("year", {}), out.get("week", {})
    found = []

    def ratio(a, b):
        return a / b if a is not None and b else None
    lat = year.get("latency", {})
    s1 = lat.get("select_1", {}).get("p50_ms")
    for form in ("literal", "now"):
        found.append(_target(f"year last-hour ({form}) p50 / SELECT 1 p50",
                             ratio(lat.get(f"last_hour_{form}", {}).get("p50_ms"), s1), 3.0, False,
                             "last-hour panel p50 at c=1 at most 3x duckfleet's SELECT 1 p50"))
    for c in (32, 1):
        found.append(_target(f"year mix QPS / week mix QPS, c={c}",
                             ratio(year.get(f"mix_c{c}", {}).get("qps"), week.get(f"mix_c{c}", {}).get("qps")),
                             0.9, True, "cost follows the window, not the history"))
    wq = week.get("mix_c32", {}).get("qps")
    ceil = out.get("ceiling", {})
    found.append(_target("week mix QPS c=32 / ceiling over the glob", ratio(wq, ceil.get("glob", {}).get("qps")),
                         2.0, True, "at least 2x today's in-process ceiling (views over the glob)"))
    found.append(_target("week mix QPS c=32 / ceiling over pruned files",
                         ratio(wq, ceil.get("pruned", {}).get("qps")), 0.8, True,
                         "at least 0.8x the same processes over exactly the pruned file lists"))
    t = out.get("tpch", {})
    found.append(_target("TPC-H sequential total: duckfleet / in-process threads=1",
                         ratio(t.get("duckfleet", {}).get("sequential_total_s"),
                               t.get("in_process_1thread", {}).get("sequential_total_s")),
                         1.1, False, "no time column: no slower than before"))
    return found


def summary_lines(out: dict) -> list[str]:
    lines = []
    if "data" in out:
        d = out["data"]
        lines.append(f"data: {d['files']} files ({d['hours']} hours x 3), {d['rows']:,} rows, written in "
                     f"{d['write_s']} s; the week: {d['week_files']} hard links")
    for name in ("year", "week"):
        r = out.get(name)
        if not r or "latency" not in r:
            continue
        lat = r["latency"]
        lines.append(f"{name}: boot {r['boot_s']} s; c=1 p50 SELECT 1 {lat['select_1']['p50_ms']:.2f} ms, "
                     f"last hour {lat['last_hour_literal']['p50_ms']:.2f} ms (now(): "
                     f"{lat['last_hour_now']['p50_ms']:.2f} ms)")
        for c in (1, 32):
            m = r.get(f"mix_c{c}")
            if m:
                lines.append(f"{name}: mix c={c}: {m['qps']:.1f} QPS, p50 {m['p50_ms']:.1f} ms, p99 "
                             f"{m['p99_ms']:.1f} ms, errors {m['errors']}/{m['requests']}, client CPU "
                             f"{m['client_cpu_share']:.0%} of a core, files/query {m['files_scanned_per_query']}, "
                             f"answers checked {m['answers']['checked']} ({m['answers']['share']:.0%}), "
                             f"wrong {m['answers']['wrong']}")
    for form, c in out.get("ceiling", {}).items():
        if isinstance(c, dict):
            lines.append(f"ceiling over the week, {c['form']}: {c['qps']:.1f} QPS ({c['processes']} processes, no client)")
    t = out.get("tpch", {})
    if "duckfleet" in t:
        total = lambda r: "failed" if r["sequential_total_s"] is None else f"{r['sequential_total_s']:.2f} s"  # noqa: E731
        lines.append(f"TPC-H SF{t['scale_factor']:g}, {t['runs']} run(s) each after a warm pass: "
                     f"duckfleet {total(t['duckfleet'])}, in-process threads=1 {total(t['in_process_1thread'])}")
    return lines


def main(argv=None) -> int:
    raise_on_stop_signals()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="90 days, short runs, TPC-H SF 0.1 (< 3 min)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="history,tpch", help="comma-separated: history, tpch")
    args = parser.parse_args(argv)
    cfg = plan(args.quick)
    only = set(args.only.split(","))
    stamp = datetime.now(timezone.utc)
    end = stamp.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    end_naive = end.replace(tzinfo=None)
    out = {"bench": "history", "started": stamp.isoformat(), "quick": args.quick, "plan": cfg,
           "workers": args.workers, "cores": os.cpu_count(), "data_end": end_naive.isoformat(),
           "problems": [], "wrong_answers": [], "fleet_pids": []}
    began, code = time.perf_counter(), 0
    try:
        with tempfile.TemporaryDirectory(prefix="duckfleet-history-") as tmp:
            tmp = Path(tmp)
            if "history" in only:
                print(f"[history] writing {cfg['hours']} hours x {len(MEASUREMENTS)} measurements", flush=True)
                out["data"] = data = write_data(tmp / "data", end, cfg["hours"])
                year_cfg = MixConfig.ending(end_naive, cfg["hours"])
                week_cfg = MixConfig.ending(end_naive, WEEK)
                out["mix"] = {"now0": year_cfg.now0.isoformat(), "explore_hours": year_cfg.explore_hours}
                out["year"] = dataset_runs("year", tmp, Path(data["year_dir"]), year_cfg, end, cfg,
                                           args.workers, out)
                week = Path(data["week_dir"])

                def ceilings(duration: float) -> dict:
                    found = {}
                    for form, boot, pruned in (("glob", demo_views(week), None), ("pruned", [], week)):
                        print(f"[history] ceiling over the week: {form}, {duration:g} s", flush=True)
                        found[form] = ceiling_qps(boot, args.workers, duration, time.time(), seed=1,
                                                  config=week_cfg, pruned_dir=pruned)
                    return found
                out["week"] = dataset_runs("week", tmp, week, week_cfg, end, cfg, args.workers, out,
                                           ceilings)
                out["ceiling"] = out["week"].pop("ceiling", {})
                out["ceiling"]["note"] = ("the ceiling has no client; duckfleet's load generator "
                                          "shares the cores (client_cpu_share of each mix run); "
                                          "measured half before and half after the week's c=32 run")
            if "tpch" in only:
                out["tpch"] = run_tpch(tmp, cfg, args.workers, out)
    except KeyboardInterrupt:
        out["failure"], code = "interrupted", 130
    except Exception:
        out["failure"], code = traceback.format_exc(), 1
        print(out["failure"], file=sys.stderr)
    out["elapsed_s"] = round(time.perf_counter() - began, 1)
    out["left_behind"] = servers.leftovers(out["fleet_pids"])
    if out["left_behind"]["processes"] or out["left_behind"]["segments"]:
        out["problems"].append(f"left behind: {out['left_behind']}")
    if out["problems"] or out["wrong_answers"]:
        code = code or 1
    out["targets"] = targets(out)
    out["exit_code"] = code
    for line in summary_lines(out):
        print(line)
    for t in out["targets"]:
        shown = "n/a" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"target {t['target']}: {shown} (limit {t['limit']}): {'met' if t['met'] else 'MISSED'}")
    for p in out["problems"]:
        print(f"problem: {p}", file=sys.stderr)
    for w in out["wrong_answers"][:20]:
        print(f"wrong answer: {w}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"history-{stamp:%Y%m%dT%H%M%SZ}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"report: {path}")
    print(json.dumps(out, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
