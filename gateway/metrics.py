"""Metrics: one prometheus_client registry per gateway app, served as text and as JSON.

Owned by the gateway's event loop (created in gateway/app.py, no module-level state). Two
kinds of facts go in:
  - per request, recorded by gateway/access.py as each request ends: HTTP requests by route
    and status, queries by status and format, histograms of wait, execution and send time,
    bytes and rows sent;
  - the fleet's own counters and gauges, read from Fleet.stats() at scrape time by
    FleetCollector (so /metrics, /api/v1/metrics and /api/v1/stats/connections report the
    same numbers), plus the shared memory the gateway's segments hold (from the pool's counts).
`as_json` renders the same registry as JSON, so the two formats cannot disagree.

duckfleet_worker_recycles_total is exported for every reason in RECYCLE_REASONS, at 0 until
one happens, so dashboards need no special case.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


CONTENT_TYPE = CONTENT_TYPE_LATEST
RECYCLE_REASONS = ("max_queries", "max_rss", "max_age", "replaced", "internal_error")  # as Fleet.stats() reports them
_SHORT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LONG = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, fleet_stats: Callable[[], dict],
                 cache_stats: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("duckfleet_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.queries = Counter("duckfleet_queries", "Queries by HTTP status and result format",
                               ["status", "format"], registry=r)
        self.aborted = Counter("duckfleet_queries_aborted",
                               "Query responses cut after their first byte, by why: an error "
                               "kind, too_slow or client_gone", ["reason"], registry=r)
        self.wait = Histogram("duckfleet_query_wait_seconds",
                              "Time a query waited for a worker", buckets=_LONG, registry=r)
        self.execution = Histogram("duckfleet_query_execution_seconds",
                                   "Time a worker spent running and encoding a query",
                                   buckets=_LONG, registry=r)
        self.send = Histogram("duckfleet_query_send_seconds",
                              "Time from a result being ready to its last byte handed to the kernel",
                              buckets=_SHORT, registry=r)
        self.sent_bytes = Counter("duckfleet_sent_bytes", "Response body bytes sent, all routes",
                                  registry=r)
        self.rows = Counter("duckfleet_result_rows", "Rows returned by successful queries",
                            registry=r)
        self.files_scanned = Counter("duckfleet_files_scanned",
                                     "Parquet files of Arc tables that queries read", registry=r)
        self.files_pruned = Counter("duckfleet_files_pruned",
                                    "Parquet files of Arc tables that pruning spared queries",
                                    registry=r)
        r.register(FleetCollector(fleet_stats))
        if cache_stats is not None:
            r.register(CacheCollector(cache_stats))

    def observe_request(self, route: str, status: int, sent: int) -> None:
        self.requests.labels(route, str(status)).inc()
        self.sent_bytes.inc(sent)

    def observe_query(self, status: int, fmt: str, rows: int | None, wait_ms: float | None,
                      execution_ms: float | None, send_ms: float | None,
                      files_scanned: int | None = None, files_pruned: int | None = None,
                      aborted: str | None = None) -> None:
        self.queries.labels(str(status), fmt).inc()
        if aborted:
            self.aborted.labels(aborted).inc()
        self.files_scanned.inc(files_scanned or 0)
        self.files_pruned.inc(files_pruned or 0)
        for histogram, ms in ((self.wait, wait_ms), (self.execution, execution_ms),
                              (self.send, send_ms)):
            if ms is not None:
                histogram.observe(ms / 1000)
        if rows:
            self.rows.inc(rows)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def as_json(self) -> dict:
        """{sample name: value, or [{"labels": {...}, "value": v}, ...]}; histograms as
        {"count", "sum", "buckets": {le: cumulative count}}."""
        out: dict = {}
        for family in self.registry.collect():
            if family.type == "histogram":
                hist = {"count": 0, "sum": 0.0, "buckets": {}}
                for s in family.samples:
                    if s.name.endswith("_bucket"):
                        hist["buckets"][s.labels["le"]] = s.value
                    elif s.name.endswith("_count"):
                        hist["count"] = s.value
                    elif s.name.endswith("_sum"):
                        hist["sum"] = s.value
                out[family.name] = hist
                continue
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                if s.labels:
                    out.setdefault(s.name, []).append({"labels": s.labels, "value": s.value})
                else:
                    out[s.name] = s.value
        return out


class FleetCollector:
    """Reads Fleet.stats() (and the gateway's segment sizes) each time the registry is scraped."""

    def __init__(self, fleet_stats: Callable[[], dict]):
        self._stats = fleet_stats

    def describe(self):
        return []  # unchecked collector: families depend on stats() at scrape time

    def collect(self):
        stats = self._stats()
        yield GaugeMetricFamily("duckfleet_queue_depth", "Requests waiting for a worker",
                                value=stats.get("queued", 0))
        workers = GaugeMetricFamily("duckfleet_workers", "Connected workers by state",
                                    labels=["state"])
        workers.add_metric(["busy"], stats.get("busy", 0))
        workers.add_metric(["idle"], stats.get("idle", 0))
        yield workers
        yield CounterMetricFamily("duckfleet_queries_served", "Queries workers answered",
                                  value=stats.get("served", 0))
        yield CounterMetricFamily("duckfleet_worker_crashes",
                                  "Workers that died while running a query",
                                  value=stats.get("crashed", 0))
        yield CounterMetricFamily("duckfleet_query_timeouts",
                                  "Queries interrupted at their deadline",
                                  value=stats.get("timeouts", 0))
        yield CounterMetricFamily("duckfleet_worker_memory_kills",
                                  "Workers stopped because a query took them past their RSS cap",
                                  value=stats.get("killed_over_memory", 0))
        recycles = CounterMetricFamily("duckfleet_worker_recycles",
                                       "Planned worker replacements by reason", labels=["reason"])
        by_reason = stats.get("recycled_by_reason", {})
        for reason in sorted({*RECYCLE_REASONS, *by_reason}):
            recycles.add_metric([reason], by_reason.get(reason, 0))
        yield recycles
        segments = GaugeMetricFamily("duckfleet_shm_segments",
                                     "Shared-memory result segments by state", labels=["state"])
        segments.add_metric(["in_use"], stats.get("shm_segments_in_use", 0))
        segments.add_metric(["idle"], stats.get("shm_segments_idle", 0))
        segments.add_metric(["cached"], stats.get("shm_segments_cached", 0))
        yield segments
        # Segments are fixed-size with their pages allocated, so the pool's counts give the bytes.
        yield GaugeMetricFamily("duckfleet_shm_bytes",
                                "Bytes of shared memory the gateway's segments hold, the "
                                "cache's included",
                                value=(stats.get("shm_segments_in_use", 0)
                                       + stats.get("shm_segments_idle", 0)
                                       + stats.get("shm_segments_cached", 0))
                                * stats.get("shm_segment_bytes", 0))
        yield GaugeMetricFamily("duckfleet_queries_running",
                                "Queries waiting, running or being sent",
                                value=stats.get("queries_running", 0))
        yield GaugeMetricFamily("duckfleet_spill_bytes",
                                "Bytes of results waiting for slow clients in spill files",
                                value=stats.get("spill_bytes", 0))
        if "connections" in stats:
            connections = stats["connections"]
            yield GaugeMetricFamily("duckfleet_http_connections", "Open HTTP connections",
                                    value=connections["open"])
            dropped = CounterMetricFamily("duckfleet_http_connections_dropped",
                                          "HTTP connections refused or closed by a limit",
                                          labels=["reason"])
            for reason in ("refused", "over_limit", "header_timeout", "body_timeout"):
                dropped.add_metric([reason], connections.get(reason, 0))
            yield dropped
        rss = GaugeMetricFamily("duckfleet_worker_rss_bytes", "Resident memory of each worker",
                                labels=["worker", "pid"])
        limit = GaugeMetricFamily("duckfleet_worker_memory_limit_bytes",
                                  "DuckDB memory_limit of each worker", labels=["worker", "pid"])
        for w in stats.get("workers", []):
            labels = [str(w.get("id")), str(w.get("pid"))]
            if w.get("rss_bytes") is not None:
                rss.add_metric(labels, w["rss_bytes"])
            limit.add_metric(labels, w.get("memory_limit", 0))
        yield rss
        yield limit


class CacheCollector:
    """Reads QueryCache.stats() at scrape time."""

    def __init__(self, cache_stats: Callable[[], dict]):
        self._stats = cache_stats

    def describe(self):
        return []

    def collect(self):
        stats = self._stats()
        lookups = CounterMetricFamily("duckfleet_cache_requests",
                                      "Query requests by what the cache did", labels=["result"])
        for result, name in (("hit", "hits"), ("miss", "misses"), ("coalesced", "coalesced"),
                             ("bypass", "bypassed")):
            lookups.add_metric([result], stats[name])
        yield lookups
        evictions = CounterMetricFamily("duckfleet_cache_evictions",
                                        "Entries removed from the cache by reason", labels=["reason"])
        for reason, count in stats["evicted_by_reason"].items():
            evictions.add_metric([reason], count)
        yield evictions
        yield GaugeMetricFamily("duckfleet_cache_entries", "Entries in the result cache",
                                value=stats["entries"])
        yield GaugeMetricFamily("duckfleet_cache_bytes",
                                "Bytes the result cache holds (whole segments for large entries)",
                                value=stats["bytes"])
        yield CounterMetricFamily("duckfleet_cache_hit_bytes", "Result bytes served from the cache",
                                  value=stats["hit_bytes"])
