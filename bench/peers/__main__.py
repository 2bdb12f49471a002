"""Run the whole peers benchmark and write its report.

    python -m bench.peers [--quick | --smoke] [--workers N] [--only dashboard,large,tpch,history]

`history` (not in the default set: a year of files takes minutes to write and index) is the
year-of-history workload of year.py: duckfleet's pruning against an Arc-style tier without
pruning and with Arc's regular-expression pruning. `--smoke` (CI's: every workload, history
included, at the smallest size that still runs each code path, under 3 minutes on 2 cores)
measures nothing worth reading; it proves the benchmark works and duckfleet answers right.

Writes bench/results/peers-<timestamp>/{report.md, report.json, *.png}. Exits 1 when duckfleet
fails anywhere (an error or a wrong answer in any workload, cache on or off: verdict.py), or
when a process or a shared-memory segment is left behind; another peer's errors and wrong
answers are reported, and missed targets are printed and reported, not fatal (they depend on
the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from bench.common import RESULTS, raise_on_stop_signals
from bench.answers import Reference
from bench.peers import mixcheck, report, servers, tpch, verdict, workloads, year
from bench.peers.ceiling import ceiling_qps
from bench.peers.datasets import demo_views, tpch_dataset, tpch_views
from bench.peers.quack_probe import attach_probe
from engine.demo import write_demo

CACHE_CONFIG = "[query_cache]\nenabled = true\nttl_seconds = 60\n"
ARC_CACHE_TTL_S = 60  # Arc's production guide: [query_cache] ttl_seconds = 60


def plan(mode: str) -> dict:
    if mode == "smoke":
        return {"concurrencies": [1, 8], "duration": 1.0, "runs": 1, "large_runs": 1,
                "large_rows": [1_000_000], "json_max_rows": 1_000_000, "tpch_sf": 0.01, "tpch_runs": 1,
                "probe_s": 1.0, "double_fleets": False}
    if mode == "quick":
        return {"concurrencies": [1, 32], "duration": 2.5, "runs": 1, "large_runs": 1,
                "large_rows": [1_000_000, 10_000_000], "json_max_rows": 1_000_000, "tpch_sf": 0.1,
                "tpch_runs": 1, "probe_s": 3.0, "double_fleets": True}
    return {"concurrencies": [1, 8, 32, 64], "duration": 6.0, "runs": 3, "large_runs": 3,
            "large_rows": [1_000_000, 10_000_000], "json_max_rows": 10_000_000, "tpch_sf": 1,
            "tpch_runs": 3, "probe_s": 3.0, "double_fleets": True}


@dataclass(frozen=True)
class Spec:
    """A peer to start, and which of the demo-data workloads it runs."""
    name: str
    start: Callable
    dashboard: bool = True
    large: bool = True


def demo_peers(tmp: Path, data: Path, cores: int, workers: int, double_fleets: bool) -> list[Spec]:
    """double_fleets: also duckfleet with two workers a core (not in --smoke: the same code)."""
    boot = demo_views(data)

    def fleet(n: int, cache: bool, large: bool = False) -> Spec:
        name = f"duckfleet-w{n}" + ("-cache" if cache else "")
        return Spec(name, lambda: servers.duckfleet(name, tmp, data, n, CACHE_CONFIG if cache else ""),
                    large=large)

    flight = f"duckfleet-w{workers}-flight"
    fleets = [fleet(workers, False, large=True),
              Spec(flight, lambda: servers.duckfleet_flight(flight, tmp, data, workers)),
              fleet(workers, True)]
    if double_fleets:
        fleets[2:2] = [fleet(2 * workers, False)]
        fleets.append(fleet(2 * workers, True))
    return [
        *fleets,
        # Arc as its Python tier shipped: 3 workers a core, 5 connections each, threads = cores.
        Spec("arc-shipped", lambda: servers.arc_tier("arc-shipped", tmp, boot, 3 * cores, 5, cores)),
        # Arc as its production guide prescribes: pool 1, threads 1, RAM*0.7/workers.
        Spec("arc-documented", lambda: servers.arc_tier("arc-documented", tmp, boot, workers, 1, 1,
                                                        servers.arc_memory_limit(workers))),
        # The same, with the query cache the same guide prescribes (TTL 60 s, in each worker).
        Spec("arc-documented-cache", lambda: servers.arc_tier(
            "arc-documented-cache", tmp, boot, workers, 1, 1, servers.arc_memory_limit(workers),
            cache_ttl=ARC_CACHE_TTL_S), large=False),
        Spec("quack", lambda: servers.quack("quack", tmp, boot, cores)),
        Spec("in-process", lambda: servers.in_process("in-process", boot, cores)),
        Spec("in-process-1thread", lambda: servers.in_process("in-process-1thread", boot, 1),
             dashboard=False),
    ]


def run_dashboard_and_large(tmp: Path, cfg: dict, cores: int, workers: int, only: set, out: dict) -> None:
    data = tmp / "data"
    write_demo(data)
    segments = mixcheck.plan(cfg["concurrencies"], cfg["runs"], cfg["duration"])
    reference = None
    if "dashboard" in only:
        started = time.perf_counter()
        reference = Reference(data)
        expected = reference.expect(mixcheck.to_expect(segments, mixcheck.warm_queries()))
        out["answers_expected"] = {"queries": expected, "seconds": round(time.perf_counter() - started, 1)}
        print(f"[peers] expected answers: {expected} queries in {out['answers_expected']['seconds']} s", flush=True)
    try:
        for spec in demo_peers(tmp, data, cores, workers, cfg["double_fleets"]):
            _demo_peer(spec, cfg, segments, reference, only, out)
    finally:
        if reference is not None:
            reference.close()
    if "dashboard" in only:
        boot = demo_views(data)
        for processes in (workers, 2 * workers) if cfg["double_fleets"] else (workers,):
            runs = [ceiling_qps(boot, processes, cfg["duration"], None, seed=r) for r in range(cfg["runs"])]
            qps = sorted(r["qps"] for r in runs)[len(runs) // 2]
            out["ceiling"][str(processes)] = {"qps": qps, "runs": [r["qps"] for r in runs]}
            print(f"[peers] ceiling, {processes} processes: {qps:.1f} QPS", flush=True)


def _demo_peer(spec: Spec, cfg: dict, segments, reference, only: set, out: dict) -> None:
    name = spec.name
    want_dash = "dashboard" in only and spec.dashboard
    want_large = "large" in only and spec.large
    if not (want_dash or want_large):
        return

    def measure(peer) -> None:
        if want_dash:
            out["dashboard"][name] = workloads.dashboard(peer, segments, cfg["duration"], reference, mixcheck.warm_queries())
            out["dashboard"][name]["notes"] = peer.notes
            out["dashboard"][name]["rss_before_mb"] = peer.rss_before_mb
        if want_large:
            out["large"][name] = workloads.large_results(peer, cfg["large_runs"], cfg["large_rows"],
                                                         cfg["json_max_rows"])
        if name == "quack" and want_dash:
            out["quack_attach"] = attach_probe(peer, cfg["probe_s"])

    servers.measure_peer(name, spec.start, out, measure)


def run_tpch(tmp: Path, cfg: dict, cores: int, workers: int, out: dict) -> None:
    """Every peer the same passes (tpch.run): a warm pass, cfg["tpch_runs"] timed, one at c=4."""
    data, queries = tpch_dataset(cfg["tpch_sf"])
    boot = tpch_views(data)
    out["tpch"] = {"scale_factor": cfg["tpch_sf"], "runs": cfg["tpch_runs"], "peers": {}}
    fleet_config = '[catalog]\ndefault_database = "tpch"\ndemo = false\n[queue]\nqueue_timeout_s = 600\n'
    with servers.in_process("in-process-1thread", boot, 1) as ref_peer:
        print("[peers] tpch reference: in-process-1thread", flush=True)
        reference = tpch.reference_tables(ref_peer, queries)  # its warm pass
        out["tpch"]["peers"]["in-process-1thread"] = tpch.run(ref_peer, queries, reference, cfg["tpch_runs"],
                                                              warm=False)
        peers = [
            ("in-process", lambda: servers.in_process("in-process", boot, cores)),
            (f"duckfleet-w{workers}", lambda: servers.duckfleet(f"tpch-duckfleet-w{workers}", tmp, data,
                                                                workers, fleet_config)),
            ("arc-documented", lambda: servers.arc_tier("tpch-arc-documented", tmp, boot, workers, 1, 1,
                                                        servers.arc_memory_limit(workers))),
            ("quack", lambda: servers.quack("tpch-quack", tmp, boot, cores)),
        ]
        for name, start in peers:
            def measure(peer) -> None:
                out["tpch"]["peers"][name] = tpch.run(peer, queries, reference, cfg["tpch_runs"])

            servers.measure_peer(name, start, out, measure, "tpch")


def main(argv=None) -> int:
    raise_on_stop_signals()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter and fewer runs, SF 0.1")
    size.add_argument("--smoke", action="store_true",
                      help="CI: every workload (history too) at its smallest, answers checked (< 3 min)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="duckfleet workers for the main point (default: one per core)")
    parser.add_argument("--only", default="dashboard,large,tpch",
                        help="comma-separated workloads: dashboard, large, tpch, history")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = plan(mode)
    cores = os.cpu_count() or 2
    only = set(args.only.split(","))
    if args.smoke and args.only == parser.get_default("only"):
        only.add("history")
    stamp = datetime.now(timezone.utc)
    folder = RESULTS / f"peers-{stamp:%Y%m%dT%H%M%SZ}{'' if mode == 'full' else '-' + mode}"
    out = {"started": stamp.isoformat(), "mode": mode, "plan": cfg, "workers": args.workers,
           "machine": report.machine(), "dashboard": {}, "large": {}, "ceiling": {}, "tpch": {},
           "unavailable": {}, "failure": None, "failures": [], "fleet_pids": []}
    began = time.perf_counter()
    code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="duckfleet-peers-") as tmp:
            if only & {"dashboard", "large"}:
                run_dashboard_and_large(Path(tmp), cfg, cores, args.workers, only, out)
            if "tpch" in only:
                run_tpch(Path(tmp), cfg, cores, args.workers, out)
            if "history" in only:
                year.run(Path(tmp), mode, args.workers, out)
    except KeyboardInterrupt:
        out["failure"] = "interrupted"
        code = 130
    except Exception:
        out["failure"] = traceback.format_exc()
        print(out["failure"], file=sys.stderr)
        code = 1
    out["elapsed_s"] = time.perf_counter() - began
    out["left_behind"] = servers.leftovers(out["fleet_pids"])
    if out["left_behind"]["processes"] or out["left_behind"]["segments"]:
        print(f"left behind: {out['left_behind']}", file=sys.stderr)
        code = code or 1
    out["targets"] = report.targets(out)
    out["failures"] = verdict.failures(out, only if code != 130 else set())
    if out["failures"]:
        code = code or 1
    with contextlib.suppress(Exception) if code == 130 else contextlib.nullcontext():
        path = report.write(folder, out)
        print(report.summary_text(out))
        print(f"\nreport: {path}")
    if out["failures"]:
        print(f"\nFAILED: duckfleet failed {len(out['failures'])} time(s):", file=sys.stderr)
        for line in out["failures"][:30]:
            print(f"  {line[:400]}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
