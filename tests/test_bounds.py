"""gateway/bounds.py against DuckDB: every bound it evaluates is the microsecond DuckDB gives,
and it declines (None) what DuckDB refuses. In-process DuckDB, UTC as the planner's."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.sqltree import literal, parse_tree
from gateway import bounds

MARKER = "duckfleet_test_now_zone"
CASTS = ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE")


@pytest.fixture(scope="module")
def con():
    con = duckdb.connect(config={"threads": 1})
    con.execute("SET TimeZone = 'UTC'")
    yield con
    con.close()


def both(con, expr: str, cast: str, instant: str) -> tuple:
    """(Python's microseconds or None, DuckDB's microseconds or None if it refused)."""
    node = parse_tree(con, f"SELECT {expr.replace('NOW', f'CAST({literal(MARKER)} AS TIMESTAMP WITH TIME ZONE)')}"
                      )["statements"][0]["node"]["select_list"][0]
    fast = bounds.evaluate([(node, cast)], {MARKER: instant})
    fast = fast[0] if fast is not None else None
    try:
        (slow,) = con.execute(f"SELECT epoch_us(CAST({expr.replace('NOW', f'CAST({literal(instant)} AS TIMESTAMPTZ)')} "
                              f"AS {cast}))").fetchone()
    except duckdb.Error:
        slow = None
    return fast, slow


units = st.sampled_from(["microsecond", "millisecond", "second", "minute", "hour", "day", "week"])
moments = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1))


@st.composite
def intervals(draw) -> str:
    n, unit = draw(st.integers(-10_000, 10_000)), draw(units)
    form = draw(st.sampled_from(["keyword", "string", "function", "plural"]))
    if form == "keyword":
        return f"INTERVAL {abs(n)} {unit.upper()}"
    if form == "string":
        return f"INTERVAL '{n} {unit}'"
    if form == "plural":
        return f"INTERVAL '{n} {unit}s'"
    return f"to_{unit}s({n})"


@st.composite
def bases(draw) -> str:
    moment = draw(moments)
    form = draw(st.sampled_from(["now", "timestamp", "string", "date", "offset", "fraction"]))
    if form == "now":
        return "NOW"
    if form == "timestamp":
        return f"TIMESTAMP '{moment:%Y-%m-%d %H:%M:%S}'"
    if form == "string":
        return f"'{moment:%Y-%m-%dT%H:%M:%S}'"
    if form == "date":
        return f"DATE '{moment:%Y-%m-%d}'"
    if form == "fraction":
        return f"TIMESTAMP '{moment.isoformat(sep=' ')}'"
    hours = draw(st.integers(-12, 14))
    return f"TIMESTAMPTZ '{moment:%Y-%m-%d %H:%M:%S}{hours:+03d}:{draw(st.sampled_from([0, 30])):02d}'"


@st.composite
def expressions(draw) -> str:
    expr = draw(bases())
    for _ in range(draw(st.integers(0, 3))):
        step = draw(st.sampled_from(["minus", "plus", "trunc"]))
        if step == "trunc" and not expr.startswith(("DATE", "'")):
            unit = draw(st.sampled_from(["second", "minute", "hour", "day"]))
            expr = f"date_trunc('{unit}', {expr})"
        elif step != "trunc":
            expr = f"({expr} {'-' if step == 'minus' else '+'} {draw(intervals())})"
    return expr


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expressions(), st.sampled_from(CASTS), moments)
def test_bounds_agree_with_duckdb(con, expr, cast, now):
    instant = now.replace(tzinfo=timezone.utc).isoformat(sep=" ")
    fast, slow = both(con, expr, cast, instant)
    if fast is not None or slow is None:
        assert fast == slow, expr


@pytest.mark.parametrize("expr", [
    "NOW - INTERVAL 1 HOUR", "NOW - INTERVAL '15 minutes'", "date_trunc('hour', NOW)",
    "TIMESTAMP '2026-11-28 15:00:00'", "'2026-11-28'", "DATE '2026-11-28' - INTERVAL 1 DAY",
    "TIMESTAMPTZ '2026-11-28 15:00:00+02:30'", "TIMESTAMPTZ '2026-11-28 15:00:00Z'",
    "NOW + to_weeks(2) - to_milliseconds(5)", "'1969-12-31 23:59:59.5'"])
def test_the_dashboards_forms_are_evaluated_here(con, expr):
    instant = datetime(2026, 11, 28, 16, 5, 7, 123456, tzinfo=timezone.utc).isoformat(sep=" ")
    for cast in CASTS:
        fast, slow = both(con, expr, cast, instant)
        assert fast is not None and fast == slow, expr


@pytest.mark.parametrize("expr", [
    "NOW - INTERVAL 1 MONTH", "date_trunc('month', NOW)", "TIMESTAMP '2026-02-30 00:00:00'",
    "'yesterday'", "TIMESTAMP 'infinity'", "NOW - to_seconds(1.5)",
    "TIMESTAMPTZ '2026-11-28 15:00:00 Europe/Paris'", "NOW - to_hours(9007199254740000)",
    "strptime('2026', '%Y')", "NOW - INTERVAL '1 hour 30 minutes'", "TIMESTAMP '2026-11-28 15:00:00+02'"])
def test_other_forms_are_left_to_duckdb(con, expr):
    instant = datetime(2026, 11, 28, 16, 5, 7, tzinfo=timezone.utc).isoformat(sep=" ")
    assert both(con, expr, "TIMESTAMP", instant)[0] is None


def test_far_values_are_left_to_duckdb(con):
    instant = (datetime(9999, 12, 31, 23, 0, tzinfo=timezone.utc)).isoformat(sep=" ")
    assert both(con, "NOW + INTERVAL 2 HOUR", "TIMESTAMP", instant)[0] is None
    assert both(con, "NOW - INTERVAL 2 HOUR", "TIMESTAMP", instant)[0] == \
        int((datetime(9999, 12, 31, 21) - datetime(1970, 1, 1)) / timedelta(microseconds=1))
