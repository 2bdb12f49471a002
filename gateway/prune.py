"""Time-range pruning: which files each Arc table reference of a query needs.

Pure logic over DuckDB's parse tree (`json_serialize_sql`), used by gateway/catalog.py on its
planning thread. For every SELECT node, the conjuncts of its WHERE clause that compare the time
column of one of its base tables with a constant expression (`=`, `<`, `<=`, `>`, `>=`,
`BETWEEN`, `IN`, and AND/OR of those) give a set of time intervals; a file whose [min, max]
(from the index, engine/index.py) meets none of them cannot hold a matching row. A WHERE
conjunct is false or NULL for every row whose table part fails it, joins and NULL-extended
rows included, so leaving such files out never changes an answer. Anything else (NOT, OR with
another column, functions of the time column, correlated or parameterised bounds, ON clauses)
adds no restriction: the table reads every file.

Constant expressions are evaluated by DuckDB itself, cast to the column's type exactly as the
comparison would cast them, in one query per plan; only a small allowlist of date/time
functions may appear in them, so no client expression runs in the gateway beyond date
arithmetic. now() and its relatives in WHERE clauses are replaced by one literal per request,
so the files chosen and the rows the query keeps agree at the same instant.

A pruned reference becomes `read_parquet([files])` under the reference's alias (read by name,
union_by_name, when the table's files have several schemas); one file of every other schema the
table has is added, so the table keeps the columns and types of all its files (those files'
rows fail the predicate; DuckDB skips their row groups by statistics).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import msgspec

LOW, HIGH = -(2**63), 2**63 - 1
INTERVALS_MAX = 256  # beyond this many disjoint ranges (a long IN list), read everything

# now() and friends -> the type of the literal that replaces them.
NOW_FUNCTIONS = {"now": "TIMESTAMP WITH TIME ZONE", "get_current_timestamp": "TIMESTAMP WITH TIME ZONE",
                 "transaction_timestamp": "TIMESTAMP WITH TIME ZONE",
                 "current_timestamp": "TIMESTAMP WITH TIME ZONE", "today": "DATE",
                 "current_date": "DATE", "current_localtimestamp": "TIMESTAMP"}
NOW_KEYWORDS = {"current_timestamp": "TIMESTAMP WITH TIME ZONE", "current_date": "DATE",
                "localtimestamp": "TIMESTAMP"}
# Functions a bound may call: operators and date/time arithmetic, nothing that allocates much.
BOUND_FUNCTIONS = frozenset({
    "+", "-", "*", "/", "//", "%", "date_trunc", "datetrunc", "date_add", "date_sub",
    "time_bucket", "to_timestamp", "make_timestamp", "make_timestamptz", "make_date",
    "strptime", "epoch_ms", "epoch_us", "epoch_ns", "to_years", "to_months", "to_weeks",
    "to_days", "to_hours", "to_minutes", "to_seconds", "to_milliseconds", "to_microseconds",
    "timezone", "least", "greatest", "last_day", "date_part", "datepart", "century",
    "year", "month", "day", "hour", "minute", "second", "trunc"})
_BOUND_CLASSES = {"CONSTANT", "CAST", "FUNCTION"}
_OPS = {"COMPARE_EQUAL": "=", "COMPARE_GREATERTHAN": ">=", "COMPARE_GREATERTHANOREQUALTO": ">=",
        "COMPARE_LESSTHAN": "<=", "COMPARE_LESSTHANOREQUALTO": "<="}  # strict made inclusive
_FLIP = {"=": "=", ">=": "<=", "<=": ">="}
CAST_TYPE = {"timestamp": "TIMESTAMP", "date": "TIMESTAMP",
             "timestamptz": "TIMESTAMP WITH TIME ZONE"}


@dataclass
class Ref:
    """One base-table reference that can be pruned, and what its WHERE clauses say."""
    node: dict      # the BASE_TABLE node (in the caller's copy of the tree)
    table: object   # gateway.catalog.TableFiles
    # Predicate terms: ("and"|"or", [terms]), ("cmp", op, const#), ("in", [const#]), None
    terms: list = field(default_factory=list)


def walk_selects(node, visit) -> None:
    """Call visit(select_node) for every SELECT_NODE in the tree, outermost first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("type") == "SELECT_NODE":
                visit(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def base_tables(from_table) -> list[dict]:
    """The BASE_TABLE nodes at this SELECT's own level (joins flattened, subqueries not)."""
    if not isinstance(from_table, dict):
        return []
    if from_table.get("type") == "BASE_TABLE":
        return [from_table]
    if from_table.get("type") == "JOIN":
        return base_tables(from_table.get("left")) + base_tables(from_table.get("right"))
    return []


def refs_in_from(from_table) -> int:
    """How many table references this FROM has at its level (any kind)."""
    if not isinstance(from_table, dict) or from_table.get("type") == "EMPTY":
        return 0
    if from_table.get("type") == "JOIN":
        return refs_in_from(from_table.get("left")) + refs_in_from(from_table.get("right"))
    return 1


def conjuncts(expr) -> list:
    if isinstance(expr, dict) and expr.get("type") == "CONJUNCTION_AND":
        return [c for child in expr["children"] for c in conjuncts(child)]
    return [expr] if expr else []


class Collector:
    """Finds the prunable references of one statement and the constants their bounds need."""

    def __init__(self, resolve, time_column: str, volatile: frozenset[str]):
        self.resolve = resolve        # BASE_TABLE node -> TableFiles, or None
        self.time_column = time_column.lower()
        self.volatile = volatile
        self.refs: list[Ref] = []
        self.seen: list[tuple[dict, object]] = []  # every reference to an Arc table
        self.consts: list[tuple[dict, str]] = []  # (expression, cast type)

    def visit(self, select: dict) -> None:
        tables = base_tables(select.get("from_table"))
        resolved = [(n, t) for n in tables if (t := self.resolve(n)) is not None]
        self.seen += resolved
        refs = [(n, t) for n, t in resolved if t.kind]
        if not refs:
            return
        only = refs_in_from(select.get("from_table")) == 1
        for node, table in refs:
            names = {(node.get("alias") or node.get("table_name", "")).lower()}
            ref = Ref(node, table)
            for term in conjuncts(select.get("where_clause")):
                found = self._term(term, names, only, CAST_TYPE[table.kind])
                if found is not None:
                    ref.terms.append(found)
            if ref.terms:
                self.refs.append(ref)

    def _is_time(self, expr, names: set[str], only: bool) -> bool:
        if not isinstance(expr, dict) or expr.get("class") != "COLUMN_REF":
            return False
        parts = [p.lower() for p in expr.get("column_names", [])]
        return (parts == [self.time_column] and only) or (
            len(parts) == 2 and parts[1] == self.time_column and parts[0] in names)

    def _const(self, expr, cast: str) -> int | None:
        if not self._constant(expr):
            return None
        self.consts.append((expr, cast))
        return len(self.consts) - 1

    def _constant(self, expr) -> bool:
        if not isinstance(expr, dict) or expr.get("class") not in _BOUND_CLASSES:
            return False
        if expr["class"] == "FUNCTION":
            name = expr.get("function_name", "").lower()
            if (name not in BOUND_FUNCTIONS and name not in NOW_FUNCTIONS) or expr.get("filter") \
                    or expr.get("distinct") or expr.get("order_bys", {}).get("orders"):
                return False
            return all(self._constant(c) for c in expr.get("children", []))
        if expr["class"] == "CAST":
            return self._constant(expr["child"])
        return True  # CONSTANT

    def _term(self, expr, names, only, cast):
        if not isinstance(expr, dict):
            return None
        kind = expr.get("type")
        if kind in ("CONJUNCTION_AND", "CONJUNCTION_OR"):
            parts = [self._term(c, names, only, cast) for c in expr["children"]]
            if kind == "CONJUNCTION_OR" and any(p is None for p in parts):
                return None
            parts = [p for p in parts if p is not None]
            return ("and" if kind == "CONJUNCTION_AND" else "or", parts) if parts else None
        if kind in _OPS:
            op = _OPS[kind]
            left, right = expr["left"], expr["right"]
            if self._is_time(right, names, only):
                left, right, op = right, left, _FLIP[op]
            if self._is_time(left, names, only) and (c := self._const(right, cast)) is not None:
                return ("cmp", op, c)
            return None
        if kind == "COMPARE_BETWEEN" and self._is_time(expr["input"], names, only):
            low, high = self._const(expr["lower"], cast), self._const(expr["upper"], cast)
            if low is None or high is None:
                return None
            return ("and", [("cmp", ">=", low), ("cmp", "<=", high)])
        if kind == "COMPARE_IN" and self._is_time(expr["children"][0], names, only):
            values = [self._const(c, cast) for c in expr["children"][1:]]
            return None if None in values else ("in", values)
        return None


def intervals(term, values: list) -> list[tuple[int, int]] | None:
    """The time ranges (inclusive, microseconds) a term admits; None: unrestricted.
    values[i] is the evaluated constant i: an int, None (SQL NULL: admits nothing)."""
    if term is None:
        return None
    if term[0] == "cmp":
        v = values[term[2]]
        if v is None:
            return []
        return [{"=": (v, v), ">=": (v, HIGH), "<=": (LOW, v)}[term[1]]]
    if term[0] == "in":
        return [(v, v) for v in (values[i] for i in term[1]) if v is not None]
    parts = [intervals(t, values) for t in term[1]]
    if term[0] == "or":
        if any(p is None for p in parts):
            return None
        merged = [r for p in parts for r in p]
        return merged if len(merged) <= INTERVALS_MAX else None
    result = None  # "and": intersect
    for p in parts:
        if p is None:
            continue
        if result is None:
            result = p
            continue
        result = [(max(a, c), min(b, d)) for a, b in result for c, d in p if max(a, c) <= min(b, d)]
        if len(result) > INTERVALS_MAX:
            return None
    return result


def substitute_now(tree, literals: dict[str, dict]) -> bool:
    """Replace now(), current_timestamp... inside every WHERE clause by the request's literal
    (in place); whether any was. `literals` maps a type name to the node that replaces them."""
    found = False

    def fix(node):
        nonlocal found
        if isinstance(node, list):
            for i, item in enumerate(node):
                node[i] = fix(item)
            return node
        if not isinstance(node, dict):
            return node
        cast = None
        if node.get("class") == "FUNCTION" and not node.get("children"):
            cast = NOW_FUNCTIONS.get(node.get("function_name", "").lower())
        elif node.get("class") == "COLUMN_REF" and len(node.get("column_names", ())) == 1:
            cast = NOW_KEYWORDS.get(node["column_names"][0].lower())
        if cast is not None:
            found = True
            return copy.deepcopy(literals[cast])
        for key, value in node.items():
            node[key] = fix(value)
        return node

    def visit(select):
        if select.get("where_clause"):
            select["where_clause"] = fix(select["where_clause"])
    walk_selects(tree, visit)
    return found


def strip_locations(node):
    """The tree without source positions: equal trees mean equal statements."""
    if isinstance(node, list):
        return [strip_locations(item) for item in node]
    if isinstance(node, dict):
        return {k: strip_locations(v) for k, v in node.items() if k != "query_location"}
    return node


def pattern(tree) -> tuple[bytes, list[str]]:
    """The tree without source positions and without the values of its string constants (as
    bytes, a key), and those values in the order `strings` finds their nodes: texts that
    differ only in their timestamps share a key."""
    values: list[str] = []

    def strip(node):
        if isinstance(node, list):
            return [strip(item) for item in node]
        if isinstance(node, dict):
            if _is_string(node):  # its alias stays in the key, its value goes
                values.append(node["value"]["value"])
                return {k: v for k, v in node.items() if k not in ("query_location", "value")}
            return {k: strip(v) for k, v in node.items() if k != "query_location"}
        return node
    return msgspec.json.encode(strip(tree)), values


def strings(tree) -> list[dict]:
    """The string CONSTANT nodes of a tree, in `pattern`'s order."""
    found: list[dict] = []

    def visit(node):
        if isinstance(node, list):
            for item in node:
                visit(item)
        elif isinstance(node, dict):
            if _is_string(node):
                found.append(node)
            else:
                for value in node.values():
                    visit(value)
    visit(tree)
    return found


def _is_string(node: dict) -> bool:
    if node.get("class") != "CONSTANT":
        return False
    value = node.get("value")
    return (isinstance(value, dict) and not value.get("is_null")
            and value.get("type", {}).get("id") == "VARCHAR")
