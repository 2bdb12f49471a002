"""Object storage and the cluster, in one bounded run on loopback:

    python -m bench.cluster [--quick] [--clients 16] [--seconds 15]

Each run is `--seconds` of load after 5 s of warm-up (2 s and 5 s with --quick).

1. The dashboard mix (bench/peers/dashboard.py) at `--clients` closed-loop clients against one
   node (2 workers) over the demo data on local disk and over the same files in an
   S3-compatible server (moto, its own process, on this machine), with the cache off and on:
   QPS of each and the S3/local ratio. moto is a Python server sharing the same 2 cores, so
   this is an upper bound on what object storage costs, not a measure of S3 itself.
2. The same mix through Caddy (`python -m engine.cluster`): one node of 2 workers, asked
   directly and then behind Caddy, and three nodes of 1 worker each behind Caddy. One machine's
   cores are shared by every node, Caddy and the load generator: this measures what the
   balancer costs, not scaling.

Every answer is checked: each distinct query's data, from every run, must equal what the
local node with the cache off answers for it (asked after the runs). Any error of ours (a
non-200 reply, a transport error) or a wrong answer makes the exit code non-zero, as does a
process or shared-memory segment left behind. Writes bench/results/cluster-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import raise_on_stop_signals, write_report
from bench.peers.dashboard import DashboardMix
from bench.peers.loadgen import FAILED, Reply, closed_loop, post
from bench.peers.servers import Peer
from engine.demo import write_demo
from harness.cluster import ClusterProcess
from harness.server import Server, assert_no_leaks
from harness.s3server import S3Server

CACHE_ON = "[query_cache]\nenabled = true\nttl_seconds = 60\n"


class Answers:
    """Every 200 reply's data by SQL text, and everything that was not a 200."""

    def __init__(self):
        self.seen: dict[str, set[str]] = collections.defaultdict(set)
        self.errors: collections.Counter = collections.Counter()

    def on_reply(self, reply: Reply) -> None:
        if reply.status == FAILED:
            return  # no answer: the load generator's tally counts it
        if reply.status != 200:
            self.errors[f"http {reply.status}: {(reply.body or b'')[:120]!r}"] += 1
            return
        self.seen[reply.sql].add(json.dumps(json.loads(reply.body)["data"]))

    def wrong(self, reference_port: int) -> list[str]:
        """Queries whose answers differ from the reference node's (asked once each)."""
        bad = []
        for sql, answers in self.seen.items():
            status, body = post(reference_port, "/api/v1/query", sql)
            if status != 200 or answers != {json.dumps(json.loads(body)["data"])}:
                bad.append(sql)
        return bad


def run_mix(name: str, port: int, answers: Answers, clients: int, seconds: float,
            warmup: float) -> dict:
    """`warmup` seconds of the mix (checked, not measured), then `seconds` measured."""
    mixes = [DashboardMix(seed=n, epoch=time.time()) for n in range(clients)]
    peer = Peer(name, "http", port)
    closed_loop(peer, lambda n: mixes[n].next(), clients, warmup, on_reply=answers.on_reply)
    load_before = os.getloadavg()[0]
    result = closed_loop(peer, lambda n: mixes[n].next(), clients, seconds,
                         on_reply=answers.on_reply)
    # The machine's 1-minute load average: other work on the same cores shows here.
    result["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    line = (f"{name:<34} {result['qps']:8.1f} QPS  p50 {result['p50_ms']:7.1f} ms  "
            f"p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}  "
            f"load {result['load_average'][0]}-{result['load_average'][1]}")
    print(line, flush=True)
    return {k: result[k] for k in ("qps", "p50_ms", "p99_ms", "requests", "ok", "errors",
                                   "error_kinds", "client_cpu_share", "load_average")}


def node(tmp: Path, name: str, data_dir: str, workers: int, config: str = "") -> Server:
    server = Server(tmp / name, data_dir, workers=workers, config=config).start(wait_ready=False)
    server.wait_ready(timeout=120)
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s runs")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    seconds = 5.0 if args.quick else args.seconds
    warmup = 2.0 if args.quick else 5.0
    raise_on_stop_signals()
    report: dict = {"clients": args.clients, "seconds": seconds, "warmup_seconds": warmup,
                    "cpus": os.cpu_count(), "runs": {}}
    answers = Answers()
    started = time.monotonic()
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="duckfleet-bench-cluster-") as tmp_name, S3Server() as s3:
        tmp = Path(tmp_name)
        write_demo(tmp / "data")
        s3.upload_tree(tmp / "data", "lake")
        reference = node(tmp, "reference", str(tmp / "data"), 2)
        servers: list[Server] = []
        try:
            runs = report["runs"]
            runs["local, cache off"] = run_mix("local, cache off", reference.port, answers,
                                               args.clients, seconds, warmup)
            for cache in (False, True):
                label = "on" if cache else "off"
                for where in ("s3", "local"):
                    if where == "local" and not cache:
                        continue  # the reference node ran it
                    data = "s3://arc/lake" if where == "s3" else str(tmp / "data")
                    config = (s3.config("lake", f'index_file = "{tmp / (where + label)}.index"')
                              if where == "s3" else "[catalog]\n") + (CACHE_ON if cache else "")
                    server = node(tmp, f"{where}-{label}", data, 2, config)
                    servers.append(server)
                    runs[f"{where}, cache {label}"] = run_mix(f"{where}, cache {label}", server.port,
                                                              answers, args.clients, seconds, warmup)
                    assert server.stop() == 0
                    assert_no_leaks(server)
            for nodes, workers in ((1, 2), (3, 1)):
                name = f"Caddy + {nodes} node{'s' * (nodes > 1)} x {workers} worker{'s' * (workers > 1)}"
                cluster = ClusterProcess(nodes, str(tmp / "data"), workers)
                try:
                    if nodes == 1:  # the same node without the balancer, just before
                        port = int(cluster.grep(r"^node 1: http://127\.0\.0\.1:(\d+)").group(1))
                        runs["1 node x 2 workers, direct"] = run_mix(
                            "1 node x 2 workers, direct", port, answers, args.clients, seconds, warmup)
                    runs[name] = run_mix(name, cluster.port, answers, args.clients, seconds, warmup)
                finally:
                    cluster.note_descendants()
                    assert cluster.stop() == 0
            wrong = answers.wrong(reference.port)
        finally:
            for server in servers:
                if server.process.poll() is None:
                    server.stop()
            assert reference.stop() == 0
            assert_no_leaks(reference)
    def ratio(a: str, b: str) -> float | None:
        return runs[a]["qps"] / runs[b]["qps"] if runs[b]["qps"] else None
    report["ratios"] = {
        "s3/local, cache off": ratio("s3, cache off", "local, cache off"),
        "s3/local, cache on": ratio("s3, cache on", "local, cache on"),
        "Caddy + 1 node / 1 node direct": ratio("Caddy + 1 node x 2 workers", "1 node x 2 workers, direct"),
        "Caddy + 3 nodes / 1 node direct": ratio("Caddy + 3 nodes x 1 worker", "1 node x 2 workers, direct"),
    }
    report["distinct_queries_checked"] = len(answers.seen)
    report["wrong_answers"] = len(wrong)
    report["errors"] = dict(answers.errors)
    report["seconds_total"] = round(time.monotonic() - started, 1)
    for what, ratio in report["ratios"].items():
        print(f"{what:<34} {ratio:8.2f}x")
    print(f"answers checked: {len(answers.seen)} distinct queries, {len(wrong)} wrong; "
          f"errors: {sum(answers.errors.values())}")
    if wrong:
        failed.append(f"{len(wrong)} wrong answers, e.g. {wrong[0][:200]}")
    if answers.errors:
        failed.append(f"errors: {dict(answers.errors)}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    print(f"report: {write_report(f'cluster-{stamp}', report)}")
    print(json.dumps(report))
    for reason in failed:
        print(f"FAILED: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
