"""Time bounds of the common forms, evaluated in Python exactly as DuckDB would (in UTC).

gateway/catalog.py evaluates a plan's bounds (gateway/prune.py's constant expressions, each
cast to its time column's type) in DuckDB: a statement of its own, about half a millisecond,
for every request whose bounds hold its instant (now()) and for every new SQL text. Dashboards
send few forms: a timestamp or date string, the request's instant, plus or minus an interval of
fixed length, truncated to a second, minute, hour or day. `evaluate` computes those in
microseconds since the epoch, and answers None for anything else (months, time zones by name,
other functions, out-of-range values), which DuckDB then evaluates. With the session time zone
UTC (the planner's and every worker's), TIMESTAMP and TIMESTAMP WITH TIME ZONE hold the same
microseconds, and a day is always 86,400 seconds. tests/test_bounds.py holds it to DuckDB.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

_US = {"microsecond": 1, "millisecond": 1_000, "second": 1_000_000, "minute": 60_000_000,
       "hour": 3_600_000_000, "day": 86_400_000_000, "week": 604_800_000_000}
_TO_UNIT = {"to_microseconds": "microsecond", "to_milliseconds": "millisecond",
            "to_seconds": "second", "to_minutes": "minute", "to_hours": "hour",
            "to_days": "day", "to_weeks": "week"}
_TRUNC = {"second", "minute", "hour", "day"}
_TIMESTAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?)?")
_OFFSET = re.compile(r"Z|([+-])(\d{2})(?::?(\d{2}))?")
_INTERVAL = re.compile(r"\s*(-?\d{1,9})\s+(microsecond|millisecond|second|minute|hour|day|week)s?\s*",
                       re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1)
_LOW = int((datetime(1, 1, 1) - _EPOCH) / timedelta(microseconds=1))
_HIGH = int((datetime(9999, 12, 31, 23, 59, 59) - _EPOCH) / timedelta(microseconds=1))
_EXACT_INT = 2**53  # integers a DOUBLE holds exactly
_INT64 = 2**63  # DuckDB's intervals and timestamps overflow past this


class _Unsupported(Exception):
    pass


def evaluate(consts: list[tuple[dict, str]], instants: dict[str, str]) -> list[int] | None:
    """Every (expression, cast type) as microseconds, or None if one is not of these forms.
    `instants` maps a marker string constant to the request's instant (its text)."""
    try:
        return [_as_timestamp(_value(expr, instants), cast) for expr, cast in consts]
    except _Unsupported:
        return None


def _as_timestamp(value: tuple, cast: str) -> int:
    kind, v = value
    if cast not in ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE") or kind not in ("ts", "date", "str"):
        raise _Unsupported
    if kind == "str":
        kind, v = _parse(v, cast)
    if not _LOW <= v <= _HIGH:
        raise _Unsupported  # DuckDB decides what happens out there
    return v


def _value(node: dict, instants: dict[str, str]) -> tuple:
    """(kind, value): ("str", text), ("int", n), ("iv", microseconds), ("ts", microseconds),
    ("date", microseconds at midnight)."""
    cls = node.get("class")
    if cls == "CONSTANT":
        value = node["value"]
        type_id = value["type"]["id"]
        if value.get("is_null"):
            raise _Unsupported
        if type_id == "VARCHAR":
            return "str", instants.get(value["value"], value["value"])
        if type_id in ("INTEGER", "BIGINT") and abs(value["value"]) < _EXACT_INT:
            return "int", value["value"]
        raise _Unsupported
    if cls == "CAST" and not node.get("try_cast"):
        target = node["cast_type"]["id"]
        kind, v = _value(node["child"], instants)
        if kind == "int" and target in ("DOUBLE", "BIGINT", "INTEGER"):
            return kind, v
        if kind == "str" and target in ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "DATE"):
            return _parse(v, target)
        if kind == "str" and target == "INTERVAL":
            match = _INTERVAL.fullmatch(v)
            if match is None:
                raise _Unsupported
            return "iv", int(match.group(1)) * _US[match.group(2).lower()]
        if kind in ("ts", "date") and target in ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE"):
            return "ts", v
        raise _Unsupported
    if cls == "FUNCTION" and not node.get("distinct") and not node.get("filter"):
        kind, v = _function(node, instants)
        if abs(v) >= _INT64:
            raise _Unsupported  # DuckDB's overflow error
        return kind, v
    raise _Unsupported


def _function(node: dict, instants: dict[str, str]) -> tuple:
    name, args = node["function_name"].lower(), node.get("children", [])
    values = [_value(arg, instants) for arg in args]
    kinds = tuple(kind for kind, _ in values)
    if name == "trunc" and kinds == ("int",):
        return values[0]
    if name in _TO_UNIT and kinds == ("int",):
        return "iv", values[0][1] * _US[_TO_UNIT[name]]
    if name in ("+", "-") and len(values) == 2:
        (ka, a), (kb, b) = values
        if ka in ("ts", "date") and kb == "iv":
            return "ts", a + b if name == "+" else a - b
        if name == "+" and ka == "iv" and kb in ("ts", "date"):
            return "ts", a + b
        if ka == kb == "iv":
            return "iv", a + b if name == "+" else a - b
    if name in ("date_trunc", "datetrunc") and kinds == ("str", "ts"):
        unit = values[0][1].lower()
        if unit in _TRUNC:
            return "ts", values[1][1] // _US[unit] * _US[unit]
    raise _Unsupported


def _parse(text: str, target: str) -> tuple:
    """A timestamp or date string as DuckDB casts it, in its strict ISO forms only."""
    match = _TIMESTAMP.match(text)
    if match is None:
        raise _Unsupported
    rest = text[match.end():]
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), int((fraction or "0").ljust(6, "0")))
    except ValueError:  # not a date: DuckDB's error, not ours
        raise _Unsupported from None
    if target == "DATE":
        if hour is not None or rest:
            raise _Unsupported
        return "date", _micros(moment)
    if rest:
        offset = _OFFSET.fullmatch(rest)
        if target != "TIMESTAMP WITH TIME ZONE" or offset is None:
            raise _Unsupported
        if rest != "Z":
            sign = -1 if offset.group(1) == "-" else 1
            shift = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3) or 0))
            moment = moment - sign * shift
    return "ts", _micros(moment)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)

