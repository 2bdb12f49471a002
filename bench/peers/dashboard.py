"""The dashboard mix: 20 panel queries over the demo data, with windows as dashboards choose them.

Most requests (LIVE_SHARE) are "live" panels: the last 1 h, 6 h or 24 h up to a "now" aligned
to the minute, as a dashboard's time picker and auto-refresh produce; many viewers of the same
dashboards then ask the same query within a minute, which is what a result cache can serve.
The rest explore: a window of the same lengths aligned to the hour anywhere in the week of
data, almost never repeated. "Now" is virtual: it starts at NOW0 and advances with the wall
clock, so a run of a minute sees one or two values of it; or, with no epoch, it stands at the
config's `now0` (bench.peers fixes one per run, so its queries can be planned before the load:
mixcheck.py).

The data's start and length, the first "now" and the span exploration draws from are
parameters (`MixConfig`): the defaults are the demo's week (now at 6.5 days, exploration over
the whole week); bench.history runs the same mix over a year of data and over its last week,
with now 12 hours before the end of the data and exploration within the last week.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine.demo import HOURS, START

START_NAIVE = START.replace(tzinfo=None)
NOW0 = START_NAIVE + timedelta(days=6, hours=12)
WINDOWS = {timedelta(hours=1): "1 minute", timedelta(hours=6): "5 minutes",
           timedelta(hours=24): "15 minutes"}
LIVE_SHARE = 0.8

# {lo}, {hi}: the window; {bucket}: the time bucket for its length.
PANELS = {
    "cpu_user_over_time": "SELECT time_bucket(INTERVAL '{bucket}', time) AS t, avg(usage_user) AS v "
                          "FROM cpu WHERE {w} GROUP BY t ORDER BY t",
    "cpu_user_by_host": "SELECT time_bucket(INTERVAL '{bucket}', time) AS t, host, avg(usage_user) AS v "
                        "FROM cpu WHERE {w} GROUP BY t, host ORDER BY t, host",
    "cpu_system_max_by_region": "SELECT time_bucket(INTERVAL '{bucket}', time) AS t, region, "
                                "max(usage_system) AS v FROM cpu WHERE {w} GROUP BY t, region ORDER BY t, region",
    "cpu_top5_hosts": "SELECT host, avg(usage_user) AS v FROM cpu WHERE {w} "
                      "GROUP BY host ORDER BY v DESC LIMIT 5",
    "cpu_last_per_host": "SELECT host, arg_max(usage_user, time) AS v, max(time) AS at "
                         "FROM cpu WHERE {w} GROUP BY host ORDER BY host",
    "cpu_p95_by_host": "SELECT host, quantile_cont(usage_user, 0.95) AS p95 FROM cpu WHERE {w} "
                       "GROUP BY host ORDER BY host",
    "cpu_stddev_by_region": "SELECT region, stddev(usage_user) AS s FROM cpu WHERE {w} "
                            "GROUP BY region ORDER BY region",
    "cpu_idle_by_region": "SELECT time_bucket(INTERVAL '{bucket}', time) AS t, region, avg(usage_idle) AS v "
                          "FROM cpu WHERE {w} GROUP BY t, region ORDER BY t, region",
    "cpu_alerts": "SELECT host, count(*) AS n FROM cpu WHERE {w} AND usage_user > 60 "
                  "GROUP BY host ORDER BY n DESC",
    "cpu_histogram": "SELECT floor(usage_user / 10) * 10 AS bin, count(*) AS n FROM cpu WHERE {w} "
                     "GROUP BY bin ORDER BY bin",
    "mem_used_over_time": "SELECT time_bucket(INTERVAL '{bucket}', time) AS t, avg(used_percent) AS v "
                          "FROM mem WHERE {w} GROUP BY t ORDER BY t",
    "mem_used_max_by_host": "SELECT time_bucket(INTERVAL '{bucket}', time) AS t, host, max(used_percent) AS v "
                            "FROM mem WHERE {w} GROUP BY t, host ORDER BY t, host",
    "mem_min_available": "SELECT host, min(available_bytes) AS v FROM mem WHERE {w} "
                         "GROUP BY host ORDER BY v LIMIT 10",
    "mem_last_per_host": "SELECT host, arg_max(used_percent, time) AS v FROM mem WHERE {w} "
                         "GROUP BY host ORDER BY host",
    "mem_top3_hosts": "SELECT host, max(used_percent) AS v FROM mem WHERE {w} "
                      "GROUP BY host ORDER BY v DESC LIMIT 3",
    "disk_last_per_path": "SELECT host, path, arg_max(used_percent, time) AS v FROM disk WHERE {w} "
                          "GROUP BY host, path ORDER BY host, path",
    "disk_min_free": "SELECT path, min(free_bytes) AS v FROM disk WHERE {w} GROUP BY path ORDER BY path",
    "disk_growth": "SELECT host, max(used_percent) - min(used_percent) AS growth FROM disk "
                   "WHERE {w} GROUP BY host ORDER BY growth DESC",
    "rows_in_window": "SELECT (SELECT count(*) FROM cpu WHERE {w}) + (SELECT count(*) FROM mem WHERE {w}) AS n",
    "cpu_mem_by_host": "SELECT c.host, c.v AS cpu, m.v AS mem FROM "
                       "(SELECT host, avg(usage_user) AS v FROM cpu WHERE {w} GROUP BY host) c JOIN "
                       "(SELECT host, avg(used_percent) AS v FROM mem WHERE {w} GROUP BY host) m "
                       "USING (host) ORDER BY c.host",
}
assert len(PANELS) == 20


def panel_sql(panel: str, end: datetime, length: timedelta) -> str:
    lo, hi = end - length, end
    window = f"time >= TIMESTAMP '{lo:%Y-%m-%d %H:%M:%S}' AND time < TIMESTAMP '{hi:%Y-%m-%d %H:%M:%S}'"
    return PANELS[panel].format(w=window, bucket=WINDOWS[length])


@dataclass(frozen=True)
class MixConfig:
    """Where the data is and where the mix looks: live windows end at `now0` (advancing with the
    wall clock); exploratory windows end on an hour within the last `explore_hours` of data."""
    start: datetime = START_NAIVE  # naive UTC, the first hour of data
    hours: int = HOURS
    now0: datetime = NOW0
    explore_hours: int = HOURS

    @classmethod
    def ending(cls, end: datetime, hours: int, explore_hours: int = 168,
               live_before_end: timedelta = timedelta(hours=12)) -> "MixConfig":
        """Data of `hours` hours up to `end` (naive UTC, exclusive); "now" as far before the end
        as the demo's is (12 h), exploration within the last week."""
        return cls(end - timedelta(hours=hours), hours, end - live_before_end,
                   min(explore_hours, hours))


DEMO = MixConfig()


class DashboardMix:
    """An endless, seeded sequence of panel queries; `epoch` is when virtual time started
    (None: it stands at config.now0)."""

    def __init__(self, seed: int, epoch: float | None, config: MixConfig = DEMO):
        self.random = random.Random(seed)
        self.epoch = epoch
        self.config = config

    def now(self) -> datetime:
        if self.epoch is None:
            return self.config.now0
        virtual = self.config.now0 + timedelta(seconds=time.time() - self.epoch)
        return virtual.replace(second=0, microsecond=0)

    def next_panel(self) -> tuple[str, datetime, timedelta]:
        """(panel, end of its window, length of its window)."""
        cfg = self.config
        panel = self.random.choice(list(PANELS))
        length = self.random.choice(list(WINDOWS))
        if self.random.random() < LIVE_SHARE:
            end = self.now()
        else:
            first = int(length.total_seconds() // 3600)
            lowest = max(first, cfg.hours - cfg.explore_hours + first)
            end = cfg.start + timedelta(hours=self.random.randint(lowest, cfg.hours))
        return panel, end, length

    def next(self) -> str:
        return panel_sql(*self.next_panel())
