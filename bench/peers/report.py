"""The report: JSON (everything measured), Markdown (tables, ratios, targets, caveats) and plots.

Ratios are duckfleet over the peer: for QPS above 1 is better for duckfleet, for times and
latencies below 1 is. Targets are checked here and printed as met / missed / not measured.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import psutil

FAITHFULNESS = """\
- **Arc-style tier, faithful:** Gunicorn with UvicornWorker processes, a FastAPI app, a pool of
  DuckDB connections in every worker process, sync endpoints (FastAPI's threadpool), a 5 s pool
  checkout timeout answering "No available connections after 5.0s", `fetchall()` to Python lists
  then JSON in Arc's shape, the Arrow route materializing the whole table before writing one IPC
  stream, connection recreation after results over 5000 rows, `--max-requests 1000` with jitter.
  Three configurations: *arc-shipped* (3 workers a core, pool of 5, `threads` = cores, no
  `memory_limit`, as ARCHITECTURE.md records), *arc-documented* (the production guide:
  workers = duckfleet's, pool 1, `threads=1`, `memory_limit = RAM*0.7/workers`) and
  *arc-documented-cache* (the same with the guide's `[query_cache]`: TTL 60 s, 100 entries,
  10 MB, a cache in each worker process, as Arc's was).
- **Arc-style tier, not faithful:** rebuilt from descriptions, not Arc's code. Each pooled
  connection is its own in-memory database (an assumption). No auth, no partition pruner (both
  tiers read the same views), no `gc.collect()` per query, and pool
  checkout does not block the event loop (Arc's did: that would make it slower, not faster).
  Sync endpoints share a 40-thread pool, so a worker queues requests on its pool, not its loop.
  Its cache keeps the encoded JSON body by SQL text and sends it again (Arc's may have re-encoded
  a kept result: that would be slower); it serves the JSON route only, the one the mix uses.
- **Quack:** `quack_serve` in one process (`threads` = cores, DuckDB's default memory_limit),
  clients are DuckDB connections in the benchmark process calling `quack_query(uri, sql, token,
  disable_ssl)`, one cursor per client thread; TLS off (loopback). The ATTACH mode is probed
  separately and its error rate reported.
- **In-process:** DuckDB in the benchmark process, `threads` = cores, one cursor per client
  thread: no network, no process boundary. Its RSS is the benchmark process's: the harness, the
  load generator and the expected answers included (what the process held before the peer
  opened its database is shown beside it). The *ceiling* is N single-threaded DuckDB processes
  (N = duckfleet's workers) looping over the same mix with no HTTP at all, and with no load
  generator on its cores: duckfleet shares its cores with the client (its CPU share is in the
  table), the ceiling does not, which flatters the ceiling by up to that share.
- **duckfleet runs its sandbox** (allowed_directories, enable_external_access = false, locked
  configuration) and its statement policy; the other peers do not: part of duckfleet's
  per-query cost here is theirs (this run does not measure how much).
- **Client:** one asyncio aiohttp client (HTTP peers) or client threads (DuckDB peers) in the
  benchmark process, on the same cores as the server; its CPU share is reported per run.
- **Same queries for every peer:** the mix is planned before the load (one fixed "now" a run
  and concurrency); answers checked against in-process DuckDB: the warm-up's, every 10th of each
  client, every one a cache served. TPC-H: every peer one warm pass, the same timed passes and
  the median of their totals; a pass with an error has no total (shown as failed).
"""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    return {"cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu_model": _cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "commit": commit,
            "versions": {p: _version(p) for p in ("duckdb", "pyarrow", "aiohttp", "uvloop", "gunicorn",
                                                  "uvicorn", "fastapi", "duckdb-extension-quack")}}


# --- targets ---

def _c32(out: dict, peer: str) -> dict | None:
    """The peer's c=32 run, if it ran and answered at least one query."""
    row = out["dashboard"].get(peer, {}).get("32")
    return row if row and row.get("requests", 0) > row.get("errors", 0) else None


def _target(name: str, value, threshold, met, detail: str) -> dict:
    return {"target": name, "value": value, "threshold": threshold, "met": met, "detail": detail}


def targets(out: dict) -> list[dict]:
    w = out["workers"]
    fleet, cached = f"duckfleet-w{w}", f"duckfleet-w{w}-cache"
    found = []
    f32, c32 = _c32(out, fleet), _c32(out, cached)
    ceiling = out["ceiling"].get(str(w))

    def check(name, ok_when_present, compute, detail):
        if not ok_when_present:
            found.append(_target(name, None, None, None, detail))
            return
        value, threshold, met = compute()
        found.append(_target(name, value, threshold, met, detail))

    check("dashboard c=32, cache off: duckfleet QPS >= 0.9 x in-process ceiling",
          f32 and ceiling, lambda: (f32["qps"], 0.9 * ceiling["qps"], f32["qps"] >= 0.9 * ceiling["qps"]),
          f"ceiling = {w} single-threaded DuckDB processes, no HTTP")
    for arc in ("arc-shipped", "arc-documented"):
        a32 = _c32(out, arc)
        check(f"dashboard c=32, cache off: duckfleet p99 <= 0.5 x {arc} p99", f32 and a32,
              lambda: (f32["p99_ms"], 0.5 * a32["p99_ms"], f32["p99_ms"] <= 0.5 * a32["p99_ms"]), "ms")
        cache_note = out["unavailable"].get(cached, "")
        check(f"dashboard c=32, cache on (TTL 60 s): duckfleet QPS >= 10 x {arc} QPS", c32 and a32,
              lambda: (c32["qps"], 10 * a32["qps"], c32["qps"] >= 10 * a32["qps"]),
              f"cache not available ({cache_note})" if cache_note else "QPS")
    ac32 = _c32(out, "arc-documented-cache")
    check("dashboard c=32, both caches on (TTL 60 s): duckfleet QPS >= arc-documented-cache QPS",
          c32 and ac32, lambda: (c32["qps"], ac32["qps"], c32["qps"] >= ac32["qps"]),
          "QPS; Arc's cache is in each worker, duckfleet's one for the fleet")
    q32 = _c32(out, "quack")
    for label, mine in (("cache off", f32), ("cache on", c32)):
        check(f"dashboard c=32, {label}: duckfleet QPS >= Quack QPS", mine and q32,
              lambda: (mine["qps"], q32["qps"], mine["qps"] >= q32["qps"]),
              "QPS")
    large = out["large"]

    def ten_million(name: str) -> tuple:
        """(seconds, in-process seconds timed alongside: workloads.large_results)"""
        found = large.get(name, {}).get("arrow_10000000", {})
        return found.get("seconds"), found.get("baseline_seconds")
    (d10, db), (q10, _) = ten_million(fleet), ten_million("quack")
    check("10M-row Arrow: duckfleet <= 1.2 x in-process (1 thread, as a worker, timed alongside)",
          d10 and db, lambda: (d10, 1.2 * db, d10 <= 1.2 * db), "seconds")
    check("10M-row Arrow: duckfleet faster than Quack", d10 and q10, lambda: (d10, q10, d10 < q10), "seconds")
    flight = f"{fleet}-flight"
    fl10, fb = ten_million(flight)
    check("10M-row Arrow through Flight SQL (ADBC fetch_arrow_table) <= 1.3 x in-process "
          "(1 thread, timed alongside)", fl10 and fb, lambda: (fl10, 1.3 * fb, fl10 <= 1.3 * fb),
          "seconds")
    check("10M-row Arrow through Flight SQL no slower than the HTTP Arrow endpoint",
          fl10 and fb and d10 and db, lambda: (fl10 / fb, d10 / db, fl10 / fb <= d10 / db),
          "each as a multiple of the in-process run timed alongside it")
    fl32 = _c32(out, flight)
    check("dashboard c=32, cache off: Flight SQL (ADBC) QPS >= HTTP QPS", fl32 and f32,
          lambda: (fl32["qps"], f32["qps"], fl32["qps"] >= f32["qps"]), "QPS")
    peers = out.get("tpch", {}).get("peers", {})
    tf, ti = peers.get(fleet), peers.get("in-process-1thread")
    sf = out.get("tpch", {}).get("scale_factor") or out["plan"]["tpch_sf"]
    check(f"TPC-H SF{sf} sequential total <= 1.1 x in-process (1 thread a worker)",
          tf and ti and tf["sequential_total_s"] is not None and ti["sequential_total_s"] is not None,
          lambda: (tf["sequential_total_s"], 1.1 * ti["sequential_total_s"],
                   tf["sequential_total_s"] <= 1.1 * ti["sequential_total_s"]),
          "seconds" + ("" if sf == 1 else f" (the target is for SF1; this run used SF{sf})"))
    return found


# --- text ---

def _f(value, digits=1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def markdown(out: dict) -> str:
    m, w = out["machine"], out["workers"]
    fleet = f"duckfleet-w{w}"
    lines = [f"# duckfleet peers benchmark{'' if out['mode'] == 'full' else ' (' + out['mode'] + ')'}", "",
             f"Started {out['started']}, {out['elapsed_s']:.0f} s. Machine: {m['cores']} cores "
             f"({m['cpu_model']}), {m['ram_gb']} GB RAM, {m['platform']}, Python {m['python']}, "
             f"commit {m['commit']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", "",
             f"Plan: {json.dumps(out['plan'])}. The load generator runs on the same "
             f"{m['cores']} cores as every server.", ""]
    if out.get("failure"):
        lines += ["**The run failed:**", "", "```", out["failure"][-2000:], "```", ""]
    if out.get("failures"):
        lines += ["**duckfleet failed** (each of these fails the run):", ""]
        lines += [f"- {f[:400]}" for f in out["failures"][:30]] + [""]
    expected = out.get("answers_expected")
    if expected:
        lines += [f"Expected answers of the dashboard mix: {expected['queries']} queries, computed "
                  f"before any load in {expected['seconds']} s.", ""]
    lines += ["## Targets", "", "| target | value | threshold | result |", "|---|---|---|---|"]
    for t in out["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_f(t['value'], 3)} | {_f(t['threshold'], 3)} | {verdict}: {t['detail']} |")
    lines += ["", "## Dashboard mix (20 panels, closed loop)", "",
              "QPS, p50 / p99 latency in ms, errors, peak RSS of all the peer's processes (MB); "
              "medians over runs. Answers: checked / answered, of them served by a cache, and "
              "wrong (a wrong duckfleet answer fails the run; a peer's is its result).", "",
              "| peer | c | QPS | p50 | p99 | errors / requests | answers checked | cache-served | wrong "
              "| peak RSS | client CPU | distinct queries |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for peer, rows in out["dashboard"].items():
        for c, r in rows.items():
            if not c.isdigit():
                continue
            a = r["answers"]
            rss = _f(r["peak_rss_total_mb"], 0)
            if rows.get("rss_before_mb") is not None:
                rss += f" (this process; {rows['rss_before_mb']:.0f} before the peer)"
            lines.append(f"| {peer} | {c} | {_f(r['qps'])} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                         f"{r['errors']} / {r['requests']} | {a['checked']} / {a['of']} | {a['cache_served']} | "
                         f"{'**' + str(a['wrong']) + '**' if a['wrong'] else 0} | {rss} | "
                         f"{r['client_cpu_share']:.0%} | {r['distinct_query_share']:.0%} |")
    for n, row in out["ceiling"].items():
        lines.append(f"| in-process ceiling ({n} processes; no load generator on its cores) | - | "
                     f"{_f(row['qps'])} | - | - | - | - | - | - | - | 0% | - |")
    for name, why in out["unavailable"].items():
        lines.append(f"| {name} | - | unavailable: {why} | | | | | | | | | |")
    for peer, rows in out["dashboard"].items():
        for e in rows.get("warm_up_wrong", [])[:3]:
            lines.append(f"- **wrong at warm-up** {peer}: {e['wrong']} ({e['sql'][:100]})")
        for c, r in rows.items():
            if c.isdigit():
                lines += [f"- **wrong** {peer} c={c}: {e['wrong']} (X-Cache {e['cache']}; {e['sql'][:100]})"
                          for e in r["answers"]["wrong_examples"][:3]]
                lines += [f"- {peer} c={c}: {n}x {k}: {r['first_errors'].get(k, '')[:160]}"
                          for k, n in list(r["error_kinds"].items())[:3]]
    for mine in (fleet, f"{fleet}-cache"):
        if mine not in out["dashboard"]:
            continue
        lines += ["", f"Ratios {mine} / peer (QPS; p99):", ""]
        for peer, rows in out["dashboard"].items():
            if peer.startswith("duckfleet"):
                continue
            parts = [f"c={c}: {_ratio(out['dashboard'][mine][c]['qps'], r['qps'])}; "
                     f"{_ratio(out['dashboard'][mine][c]['p99_ms'], r['p99_ms'])}"
                     for c, r in rows.items() if c.isdigit() and c in out["dashboard"][mine]]
            lines.append(f"- vs {peer}: " + ", ".join(parts))
        for n, row in out["ceiling"].items():
            parts = [f"c={c}: {_ratio(r['qps'], row['qps'])}" for c, r in out["dashboard"][mine].items()
                     if c.isdigit()]
            lines.append(f"- vs ceiling ({n} processes, no client on its cores), QPS: " + ", ".join(parts))
    lines += ["", "Peak RSS by process at the highest concurrency (MB):", ""]
    for peer, rows in out["dashboard"].items():
        last = [r for c, r in rows.items() if c.isdigit()][-1]
        procs = ", ".join(f"{k} {v:.0f}" for k, v in last["peak_rss_by_process_mb"].items())
        lines.append(f"- {peer}: {procs}")
    probe = out.get("quack_attach")
    if probe:
        lines += ["", "Quack's ATTACH mode (probe, not benchmarked):", ""]
        if not probe["attached"]:
            lines.append(f"- ATTACH failed: {probe['error']}")
        else:
            lines.append(f"- sequential, every panel once: {probe['sequential_errors']} errors in "
                         f"{probe['sequential_queries']}, p50 {_f(probe['sequential_p50_ms'])} ms; "
                         + "; ".join(f"{n}x {k}" for k, n in probe["sequential_error_kinds"].items()))
            for key, r in probe.items():
                if key.startswith("c") and isinstance(r, dict):
                    kinds = "; ".join(f"{n}x {k[:90]}" for k, n in r["error_kinds"].items())
                    lines.append(f"- {key.replace('_', ' ')}: {r['errors']} errors in {r['requests']}, "
                                 f"{_f(r['qps'])} QPS, p50 {_f(r['p50_ms'])} ms" + (f" ({kinds})" if kinds else ""))
    lines += ["", "## Large results", "",
              "Seconds (median), million rows a second; Arrow read into a pyarrow Table, JSON body "
              "received whole (not parsed).", "",
              "| peer | " + " | ".join(f"{k}" for k in ("arrow_1000000", "arrow_10000000", "json_1000000",
                                                          "json_10000000")) + " |", "|---|---|---|---|---|"]
    for peer, rows in out["large"].items():
        cells = []
        for k in ("arrow_1000000", "arrow_10000000", "json_1000000", "json_10000000"):
            r = rows.get(k)
            if not r:
                cells.append("n/a")
            elif r["error"]:
                cells.append(f"error: {r['error'][:60]}")
            else:
                cells.append(f"{r['seconds']:.3f} s ({r['rows_per_s'] / 1e6:.1f} M/s, {r['runs']} runs)")
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    if fleet in out["large"]:
        lines += ["", f"Ratios {fleet} / peer (seconds):", ""]
        for peer, rows in out["large"].items():
            if peer != fleet:
                parts = [f"{k}: {_ratio(out['large'][fleet][k]['seconds'], r['seconds'])}"
                         for k, r in rows.items() if k in out["large"][fleet]]
                lines.append(f"- vs {peer}: " + ", ".join(parts))
    tp = out.get("tpch", {}).get("peers", {})
    if tp:
        lines += ["", f"## TPC-H SF{out['tpch']['scale_factor']} (22 queries)", "",
                  f"Every peer: one warm pass (checked, untimed), {out['tpch']['runs']} timed sequential "
                  "pass(es), median of their totals, then one pass at c=4. A pass with an error has no "
                  "total: **failed**.", "",
                  "| peer | sequential total s (each pass) | wall at c=4 s | errors | mismatches | "
                  f"ratio {fleet} / peer (sequential) |", "|---|---|---|---|---|---|"]
        mine = tp.get(fleet, {}).get("sequential_total_s")
        for peer, r in tp.items():
            passes = ", ".join("failed" if t is None else f"{t:.2f}" for t in r["sequential_runs"])
            total = "**failed**" if r["sequential_total_s"] is None else f"{r['sequential_total_s']:.2f}"
            wall = "**failed**" if r["concurrent_wall_s"] is None else f"{r['concurrent_wall_s']:.2f}"
            lines.append(f"| {peer} | {total} ({passes}) | {wall} | {len(r['errors'])} | {len(r['mismatches'])} | "
                         f"{_ratio(mine, r['sequential_total_s'])} |")
        for peer, r in tp.items():
            for e in r["errors"][:5]:
                lines.append(f"- {peer} Q{e['query']} ({e['phase']}): {e['error']}")
            for e in r["mismatches"][:5]:
                lines.append(f"- **mismatch** {peer} Q{e['query']}: {e['mismatch']}")
    from bench.peers.year import markdown as history_markdown  # noqa: PLC0415
    lines += history_markdown(out)
    left = out.get("left_behind", {})
    lines += ["", f"Left behind after the run: {len(left.get('processes', []))} processes, "
              f"{len(left.get('segments', []))} shared-memory segments.",
              "", "## What is faithful and what is not", "", FAITHFULNESS]
    return "\n".join(lines) + "\n"


def summary_text(out: dict) -> str:
    lines = ["", "Targets:"]
    for t in out["targets"]:
        verdict = {True: "MET   ", False: "MISSED", None: "N/A   "}[t["met"]]
        lines.append(f"  {verdict} {t['target']}: {_f(t['value'], 3)} vs {_f(t['threshold'], 3)} ({t['detail']})")
    return "\n".join(lines)


# --- plots ---

def _concurrency_ticks(ax, rows: dict) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator
    ticks = sorted({c for by_c in rows.values() for c in by_c})
    ax.set_xticks(ticks, [str(c) for c in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plots(out: dict, folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = {p: {int(c): r for c, r in v.items() if c.isdigit()} for p, v in out["dashboard"].items()}
    if not rows:
        return written
    fig, ax = plt.subplots(figsize=(8, 5))
    for peer, by_c in rows.items():
        cs = sorted(by_c)
        line, = ax.plot(cs, [by_c[c]["p50_ms"] for c in cs], marker="o", label=f"{peer} p50")
        ax.plot(cs, [by_c[c]["p99_ms"] for c in cs], marker="x", linestyle="--", color=line.get_color(),
                label=f"{peer} p99")
    ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)",
           title="Dashboard mix: latency against concurrency")
    _concurrency_ticks(ax, rows)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(folder / "latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for peer, by_c in rows.items():
        cs = sorted(by_c)
        ax.plot(cs, [by_c[c]["qps"] for c in cs], marker="o", label=peer)
    for n, row in out["ceiling"].items():
        ax.axhline(row["qps"], linestyle=":", color="grey")
        ax.annotate(f"ceiling, {n} processes", (1, row["qps"]), fontsize=7)
    ax.set(xscale="log", xlabel="concurrent clients", ylabel="queries per second",
           title="Dashboard mix: throughput against concurrency")
    _concurrency_ticks(ax, rows)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(folder / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write(folder: Path, out: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(out, indent=2, default=str))
    (folder / "report.md").write_text(markdown(out))
    plots(out, folder)
    return folder / "report.md"
