"""The gateway's catalog: the file index kept current, SQL analysis, and query plans.

Owns, in the gateway process:
  - the file index (engine/index.py), loaded from the file the supervisor's start-up build
    wrote, and kept current from inotify (gateway/watch.py): `poll()`, called on the event loop
    before every query, drains the kernel's queue, so a file written before a request arrives
    is seen by it. On object storage a listing every refresh_s does that job
    (gateway/listing.py), and its listing is what the index applies. Changes are applied to the
    index on the planning thread, before the next plan;
  - the tables it makes (`TableFiles`, one per <database>/<measurement>) and their version,
    which workers compare with theirs to create views for new tables (Query.catalog);
  - one planning thread with a private, sandboxed DuckDB connection, where every SQL analysis
    (gateway/sqlkey.py), constant evaluation and rewrite (gateway/prune.py) runs: the event
    loop never parses client SQL. A plan says what the worker runs (the query with pruned file
    lists) and how many files it scans and skips.

Listeners (the result cache) hear which tables changed: casefolded "<database>/<measurement>",
or None for everything. Failures: an index entry for a file that cannot be read has no bounds
(always scanned); a rewrite that does not survive a round trip through DuckDB's parser runs the
query as sent (logged), so pruning can only ever make a query cheaper, never different.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import duckdb
import msgspec

from engine import index as index_mod, log as log_mod, objectstore, sandbox
from engine.config import CatalogConfig, S3Config, is_remote
from engine.sqltree import decode_tree, fill, parse_tree
from gateway import bounds, prune, tables as tables_mod
from gateway.sqlkey import Analysis, SqlAnalyzer
from gateway.listing import ListingWatcher
from gateway.tables import TableFiles
from gateway.watch import DataWatcher

log = log_mod.get()
PLAN_MEMO = 4096
PATTERN_TEMPLATES = 8  # per pattern: its texts' strings outside the bounds (a bucket width...)
REPLANS = 5  # files changing faster than this many plans: the last one runs


@dataclass(frozen=True)
class Plan:
    analysis: Analysis
    sql: str             # what the worker runs
    files_scanned: int   # files of Arc tables the query reads
    files_pruned: int    # files of those tables it was spared
    catalog: int         # the table set's version, for the worker's views
    tables: tuple[str, ...] = ()  # the Arc tables it reads (casefolded keys)
    evolved: list[str] | None = None  # tables of several schemas, for the worker's views
    changes: int = 0     # Catalog.changes it is current for (see Catalog.current)
    fills: dict | None = None  # marker -> value, when `sql` holds markers (engine/sqltree.fill)


@dataclass
class Template:
    """What planning learns once per statement pattern and scope (and table set): the prunable
    references, the SQL that evaluates their bounds and the rewritten text, with markers where
    each request puts its instant, each reference its files, and each text the strings of its
    bounds (prune.pattern: texts that differ only there share a template)."""
    seen: list[str]                      # table keys of every Arc table reference
    refs: list[tuple[str, list]]         # (table key, predicate terms) per rewritten reference
    bounds_sql: str | None = None        # evaluates every bound, as microseconds
    run_sql: str | None = None           # the rewrite, with markers
    clocked: bool = False                # the bounds or the rewrite hold the request's instant
    consts: list = dataclasses.field(default_factory=list)  # the bounds' expressions
    quick: bool = False                  # gateway/bounds.py evaluates them: filled on the loop
    markers: dict[int, str] = dataclasses.field(default_factory=dict)  # string # -> marker
    strings: list[str] = dataclasses.field(default_factory=list)  # the first text's strings


@dataclass(frozen=True)
class Text:
    """One SQL text and scope: its analysis, its template and its strings for the markers."""
    analysis: Analysis
    template: Template
    fills: dict[str, str]


class Catalog:
    def __init__(self, cfg: CatalogConfig, s3: S3Config = S3Config()):
        self.listeners: list[Callable[[set[str] | None], None]] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="planner")
        self.watcher: DataWatcher | ListingWatcher | None = None
        self.s3 = s3
        self.scanned_total = self.pruned_total = 0
        self.templates_built = 0  # plans learnt from scratch (a new pattern of statement)
        self.changes = 0  # change reports heard (on the loop): a plan made across one is redone
        self.applied = 0  # the changes the index holds (planning thread)
        # Markers in rewritten text: a random word no client can have guessed.
        self._mark = f"duckfleet_{secrets.token_hex(8)}"
        self._reset(cfg)

    def _reset(self, cfg: CatalogConfig) -> None:
        """Everything that follows from [catalog]."""
        self.cfg = cfg
        self.data_dir = cfg.data_dir
        self.store = objectstore.Store(cfg.data_dir, self.s3) if is_remote(cfg.data_dir) else None
        self.index = index_mod.Index(Path(cfg.data_dir), cfg.time_column, self.store)
        self.index_path = index_mod.default_path(cfg.data_dir, cfg.index_file)
        self.tables: dict[str, TableFiles] = {}  # casefolded key
        self.version = index_mod.catalog_version([], [])  # changes with the set of tables
        self.evolved: list[str] = []
        self.generation = 0    # bumps on any change of the index
        self._pending: set[str] | None = None  # changed paths; None: rescan everything
        self._texts: collections.OrderedDict[tuple, Text] = collections.OrderedDict()
        # pattern key -> its templates (one per set of strings outside the bounds)
        self._patterns: collections.OrderedDict[tuple, list[Template]] = collections.OrderedDict()
        self._plans: dict[tuple, tuple[int, Plan]] = {}
        self._con: duckdb.DuckDBPyConnection | None = None
        self.analyzer: SqlAnalyzer | None = None
        self._conflict_memo: dict[tuple, list[str]] = {}

    # --- life ---

    async def start(self) -> None:
        self._watch(self.cfg)  # first: a change during the first refresh is not lost
        await self._run(self._open)

    def _watch(self, cfg: CatalogConfig) -> None:
        if is_remote(cfg.data_dir):
            store = objectstore.Store(cfg.data_dir, self.s3)
            self.watcher = ListingWatcher(store, cfg.refresh_s, self._on_change)
        else:
            self.watcher = DataWatcher(cfg.data_dir, self._on_change)
        self.watcher.start()

    async def reconfigure(self, cfg: CatalogConfig, s3: S3Config | None = None) -> None:
        """SIGHUP changed [catalog] (or [s3]: rotated credentials): new index, analyzer and
        watcher; listeners hear that everything changed (the cache drops its entries). Queries
        keep being planned: by the old catalog until the planning thread swaps it, by the new
        one after."""
        s3 = self.s3 if s3 is None else s3
        if cfg == self.cfg and s3 == self.s3:
            return
        old, self.watcher = self.watcher, None
        if old is not None:
            old.close()
        self.s3 = s3
        self._watch(cfg)
        await self._run(self._reopen, cfg)
        for listener in self.listeners:
            listener(None)
        log.info("catalog_reloaded", data_dir=cfg.data_dir, tables=len(self.tables))

    def _reopen(self, cfg: CatalogConfig) -> None:
        """Planning thread: the whole swap in one step, so no plan sees half of it."""
        self._close()
        self._reset(cfg)
        self._open()

    def _open(self) -> None:
        con = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": "256MB"})
        con.execute("SET TimeZone = 'UTC'")  # as in every worker: bounds agree with queries
        self.analyzer = SqlAnalyzer(con, self.cfg.default_database, self.cfg.views,
                                    frozenset(self.cfg.databases),
                                    self.cfg.analyze_max_kb * 1024)
        def statement(sql):
            return parse_tree(con, sql)["statements"][0]
        self._select = statement("SELECT 1")
        self._scans = {by_name: statement(f"SELECT * FROM read_parquet(['x']{option}) AS t")[
            "node"]["from_table"] for by_name, option in ((True, ", union_by_name = true"),
                                                          (False, ""))}
        if self.store is not None:  # before the sandbox locks: httpfs and the credentials
            objectstore.attach_storage(con, self.data_dir, self.s3)
        sandbox.apply(con, [self.data_dir])  # reads footers of the data, nothing else
        self._con = con
        self.index = index_mod.Index.load(self.data_dir, self.cfg.time_column, self.index_path,
                                          self.store)
        self._pending = None  # everything: the first refresh
        self._apply_pending()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self._thread.submit(self._close).result()
        self._thread.shutdown()

    def _close(self) -> None:
        failed = self.index.save(self.index_path)
        if failed:
            log.warning("index_not_saved", path=str(self.index_path), error=failed)
        if self._con is not None:
            self._con.close()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # --- keeping the index current ---

    def poll(self) -> None:
        """On the loop, before each query: take in every file change the kernel has queued."""
        if self.watcher is not None:
            self.watcher.poll()

    def _on_change(self, paths: set[str] | None) -> None:
        self.changes += 1
        if paths is None or self._pending is None:
            self._pending = None
        else:
            self._pending |= paths
        tables = None if paths is None or any("/" not in p for p in paths) \
            else {"/".join(p.split("/", 2)[:2]).casefold() for p in paths}
        for listener in self.listeners:
            listener(tables)

    def _apply_pending(self) -> None:
        """Planning thread: bring the index up to date with what poll() collected. Until it
        is done, `applied` lags `changes`, so no memoized plan is taken meanwhile."""
        seen = self.changes
        pending, self._pending = self._pending, set()
        listing = getattr(self.watcher, "latest", None)  # object storage: the newest listing
        if pending is None:
            read, dropped = self.index.refresh(listing=listing)
            self._rebuild(bool(read or dropped or not self.tables))
        elif pending and self.store is not None:
            read, dropped = self.index.refresh(listing=listing)
            self._rebuild(bool(read or dropped))
        elif pending:
            read, dropped = self.index.update(pending)
            self._rebuild(bool(read or dropped))
        self.applied = seen

    def _rebuild(self, changed: bool) -> None:
        if not changed:
            return
        tables = {key.casefold(): TableFiles(key, self.data_dir, files)
                  for key, files in self.index.tables().items()}
        for table in tables.values():
            table.conflicts = self._conflicts(table)
        self.evolved = sorted(t.key for t in tables.values() if t.evolved)
        self.version = index_mod.catalog_version([t.key for t in tables.values()], self.evolved,
                                                 self.index.rewritten if self.store else 0)
        self.tables = tables
        self.generation += 1
        self._plans.clear()

    # --- plans ---

    async def plan(self, sql: str, scope: list[str] | None) -> Plan:
        """What to run for this SQL and scope. A plan that does not depend on the clock is
        reused until the index changes, without leaving the loop."""
        key = (sql, tuple(scope) if scope is not None else None)
        for _ in range(REPLANS):
            self.poll()
            memo = self._plans.get(key)
            if memo is not None and memo[0] == self.generation and self.applied == self.changes:
                # a plan, or a clocked text whose bounds Python evaluates for this instant
                plan = memo[1] if isinstance(memo[1], Plan) else self._fill(memo[1], sql)
                if plan is not None:
                    break
            changes = self.changes
            plan = await self._run(self._plan, sql, scope, key)
            if self.changes == changes:
                # Nothing changed while it was planned: a change from now on reaches the
                # caller's cache flight (it is created before the next await) as stale.
                break
        self.scanned_total += plan.files_scanned
        self.pruned_total += plan.files_pruned
        return dataclasses.replace(plan, changes=self.changes)

    def current(self, plan: Plan) -> bool:
        """Whether no file changed since the plan was made (the caller awaited meanwhile)."""
        return plan.changes == self.changes

    def _plan(self, sql: str, scope: list[str] | None, key: tuple) -> Plan:
        self._apply_pending()
        text = self._texts.get((key, self.version))
        if text is None:
            try:
                text = self._text(sql, scope)
            except RecursionError:  # deeper than the analysis itself went: run it as sent
                text = Text(self.analyzer.analyze(sql), Template([], []), {})
            _remember(self._texts, (key, self.version), text)
        else:
            self._texts.move_to_end((key, self.version))
        plan = self._fill(text, sql, here=False)
        if not text.template.clocked or text.template.quick:
            if len(self._plans) >= PLAN_MEMO:
                self._plans.clear()
            self._plans[key] = (self.generation, text if text.template.clocked else plan)
        return plan

    def _fill(self, text: Text, sql: str, here: bool = True) -> Plan | None:
        """This request's plan: evaluate the bounds now, choose files, fill in the markers.
        `here`: on the loop, where only Python evaluates bounds (None if it cannot); else on
        the planning thread, where DuckDB evaluates the forms Python does not."""
        template = text.template
        seen = tuple(template.seen)
        scanned = sum(len(self.tables[key].files) for key in seen if key in self.tables)

        def made(run: str, pruned: int = 0, fills: dict | None = None) -> Plan:
            return Plan(text.analysis, run, scanned - pruned, pruned, self.version, seen,
                        self.evolved, fills=fills)

        if template.run_sql is None:
            return made(sql)
        fills: dict[str, str | list[str]] = dict(text.fills)
        if template.clocked:
            fills.update(self._instant())
        values = bounds.evaluate(template.consts, fills) if template.quick else None
        if values is None:
            if here:
                return None
            values = self._evaluate(template.bounds_sql, fills)
        pruned = 0
        for n, (table_key, terms) in enumerate(template.refs):
            table = self.tables.get(table_key)
            if table is None:  # gone since the template was made
                return made(sql)
            ranges = prune.intervals(("and", terms), values) if values is not None else None
            chosen = table.select(ranges) if ranges is not None else range(len(table.files))
            pruned += len(table.files) - len(chosen)
            fills[f"{self._mark}_files_{n}"] = [table.paths[i] for i in chosen]
        if not pruned:
            return made(sql)
        return made(template.run_sql, pruned, fills)  # the worker fills it in (engine/sqltree.py)

    def _text(self, sql: str, scope: list[str] | None) -> Text:
        """The text's template: the one of its pattern, if the strings outside its bounds are
        the same too, else a new one."""
        analysis = self.analyzer.analyze(sql)
        if analysis.tree is None or self._mark in sql:
            return Text(analysis, Template([], []), {})
        shape, values = prune.pattern(analysis.tree)
        key = (shape, tuple(scope) if scope is not None else None, self.version)
        known = self._patterns.get(key, [])
        template = next((t for t in known if all(
            values[i] == value for i, value in enumerate(t.strings) if i not in t.markers)), None)
        if template is None:
            template = self._template(analysis.tree, values, scope, sql)
            known = [template, *known[:PATTERN_TEMPLATES - 1]]
        _remember(self._patterns, key, known)
        return Text(analysis, template, {marker: values[i]
                                         for i, marker in template.markers.items()})

    def _template(self, statement: dict, values: list[str], scope: list[str] | None,
                  sql: str) -> Template:
        self.templates_built += 1
        tree = msgspec.json.decode(msgspec.json.encode(statement))  # a private copy
        originals = prune.strings(tree)  # numbered as prune.pattern numbers them
        clocked = prune.substitute_now(tree, self._now_markers())
        collector = self._collect(tree, scope)
        template = Template([t.key.casefold() for _, t in collector.seen], [])
        if not collector.refs or not collector.consts:
            return template
        # The strings of the bounds become markers: each text of the pattern fills its own.
        number = {id(node): i for i, node in enumerate(originals)}
        for expr, _ in collector.consts:
            for node in prune.strings(expr):
                i = number.get(id(node))
                if i is not None:  # not a marker of the request's instant
                    template.markers[i] = node["value"]["value"] = f"{self._mark}_s{i}"
        template.strings = [node["value"]["value"] for node in originals]
        for n, ref in enumerate(collector.refs):
            self._replace(ref.node, f"{self._mark}_files_{n}", ref.table.evolved)
        bounds_sql, run_sql = self._rewrite(collector.consts, tree, sql)
        if bounds_sql is None:
            return template
        template.refs = [(ref.table.key.casefold(), ref.terms) for ref in collector.refs]
        template.bounds_sql, template.run_sql = bounds_sql, run_sql
        template.clocked = clocked  # the request's instant is in the bounds or the rewrite
        template.consts = collector.consts
        own = {marker: values[i] for i, marker in template.markers.items()}
        template.quick = bounds.evaluate(collector.consts, {**own, **self._instant()}) is not None
        return template

    def _collect(self, tree: dict, scope: list[str] | None) -> prune.Collector:
        ctes: set[str] = set()
        prune.walk_selects(tree, lambda node: ctes.update(
            item["key"].casefold() for item in node.get("cte_map", {}).get("map", [])))
        allowed = None if scope is None else {db.casefold() for db in scope}

        def resolve(node: dict) -> TableFiles | None:
            if node.get("catalog_name") or node.get("at_clause"):
                return None
            schema, name = node.get("schema_name", "").casefold(), node["table_name"].casefold()
            if not schema and name in ctes:  # a CTE of that name, somewhere: not the table
                return None
            db = schema or self.cfg.default_database.casefold()
            if allowed is not None and db not in allowed:
                return None
            return self.tables.get(f"{db}/{name}")

        collector = prune.Collector(resolve, self.cfg.time_column, self.analyzer.volatile_names)
        prune.walk_selects(tree, collector.visit)
        if _has_long_column_refs(tree):  # "db".cpu.time cannot follow a rewritten reference
            collector.refs = []
        return collector

    # --- the instant of a request ---

    def _now_markers(self) -> dict[str, dict]:
        """CAST nodes holding a marker per type; each request replaces them with its instant."""
        nodes = {}
        for type_name in ("TIMESTAMP WITH TIME ZONE", "TIMESTAMP", "DATE"):
            nodes[type_name] = {
                "class": "CAST", "type": "OPERATOR_CAST", "alias": "", "query_location": 0,
                "child": _constant(self._now_marker(type_name)),
                "cast_type": {"id": type_name, "type_info": None}, "try_cast": False}
        return nodes

    def _now_marker(self, type_name: str) -> str:
        return f"{self._mark}_now_{type_name.split()[-1].lower()}"

    def _instant(self) -> dict[str, str]:
        now = datetime.now(timezone.utc)
        return {self._now_marker("TIMESTAMP WITH TIME ZONE"): now.isoformat(sep=" "),
                self._now_marker("TIMESTAMP"): now.replace(tzinfo=None).isoformat(sep=" "),
                self._now_marker("DATE"): now.date().isoformat()}

    # --- DuckDB: bounds, rewrites ---

    def _rewrite(self, consts: list[tuple[dict, str]], tree: dict,
                 sql: str) -> tuple[str | None, str | None]:
        """The SQL that evaluates the bounds, and the rewritten statement (if DuckDB parses it
        back to the same tree), from one call into DuckDB; (None, None) if it refuses either."""
        select = msgspec.json.decode(msgspec.json.encode(self._select))
        select["node"]["select_list"] = [
            {"class": "CAST", "type": "OPERATOR_CAST", "alias": f"v{i}", "query_location": 0,
             "child": expr, "cast_type": {"id": cast, "type_info": None}, "try_cast": False}
            for i, (expr, cast) in enumerate(consts)]
        documents = [msgspec.json.encode({"error": False, "statements": [statement]}).decode()
                     for statement in (select, dict(self._select, node=tree))]
        try:
            inner, text, again = self._con.execute(
                "SELECT json_deserialize_sql($1::JSON), t, json_serialize_sql(t) "
                "FROM (SELECT json_deserialize_sql($2::JSON) AS t)", documents).fetchone()
            again = decode_tree(again)["statements"][0]["node"]
        except (duckdb.Error, KeyError, IndexError) as exc:
            log.warning("prune_skipped", reason=str(exc)[:200], sql=sql[:200])
            return None, None
        if prune.strip_locations(again) != prune.strip_locations(tree):
            log.warning("prune_skipped", reason="the rewrite does not round-trip", sql=sql[:200])
            return None, None
        outer = ", ".join(
            f"CASE WHEN isinf(v{i}) THEN (CASE WHEN v{i} > TIMESTAMP '1970-01-01' "
            f"THEN {prune.HIGH} ELSE {prune.LOW} END) ELSE epoch_us(v{i}) END"
            for i in range(len(consts)))
        return f"SELECT {outer} FROM ({inner})", text

    def _evaluate(self, bounds_sql: str, fills: dict[str, str]) -> list | None:
        """Every bound as microseconds (None: SQL NULL), by DuckDB; None if it refuses them."""
        try:
            return list(self._con.execute(fill(bounds_sql, fills)).fetchone())
        except duckdb.Error:
            return None

    def _replace(self, node: dict, marker: str, by_name: bool) -> None:
        new = msgspec.json.decode(msgspec.json.encode(self._scans[by_name]))
        new["alias"] = node.get("alias") or node["table_name"]
        new["column_name_alias"] = node.get("column_name_alias", [])
        new["sample"] = node.get("sample")
        new["function"]["children"][0]["children"] = [_constant(marker)]
        node.clear()
        node.update(new)

    def _conflicts(self, table: TableFiles) -> list[str]:
        key = (table.key, tuple(sorted(table.schemas)))
        if key not in self._conflict_memo:
            self._conflict_memo[key] = tables_mod.conflicts(self._con, table)
        return self._conflict_memo[key]

    def explain(self, plan: Plan, message: str) -> str:
        """A SQL error on a table whose files disagree on a column's type: say which."""
        notes = [note for key in plan.tables if (table := self.tables.get(key))
                 for note in table.conflicts]
        if not notes:
            return message
        return f"{message.split(chr(10), 1)[0]} (the files of this table disagree: {'; '.join(notes)})"

    # --- the catalog route ---

    async def describe(self, scope: list[str] | None) -> dict:
        return await self._run(self._describe, scope)

    def _describe(self, scope: list[str] | None) -> dict:
        self._apply_pending()
        allowed = None if scope is None else {db.casefold() for db in scope}
        databases: dict[str, list] = {}
        for table in sorted(self.tables.values(), key=lambda t: t.key):
            if allowed is None or table.database.casefold() in allowed:
                databases.setdefault(table.database, []).append(
                    tables_mod.describe(self._con, table, self.cfg.time_column))
        found = {"databases": [{"name": db, "tables": found} for db, found in databases.items()],
                 "time_column": self.cfg.time_column,
                 "default_database": self.cfg.default_database}
        if isinstance(self.watcher, ListingWatcher):  # how fresh this node's view of the store is
            found["listing"] = {"refresh_s": self.cfg.refresh_s, "listings": self.watcher.listings,
                                "failed": self.watcher.failed}
        return found

    def stats(self) -> dict:
        return {"tables": len(self.tables), "files": len(self.index.files),
                "files_scanned": self.scanned_total, "files_pruned": self.pruned_total,
                "watching": self.watcher is not None and self.watcher.failed is None}


def _has_long_column_refs(tree) -> bool:
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("class") == "COLUMN_REF" and len(item.get("column_names", ())) > 2:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _constant(text: str) -> dict:
    return {"class": "CONSTANT", "type": "VALUE_CONSTANT", "alias": "", "query_location": 0,
            "value": {"type": {"id": "VARCHAR", "type_info": None}, "is_null": False,
                      "value": text}}


def _remember(memo: collections.OrderedDict, key, value) -> None:
    memo[key] = value
    memo.move_to_end(key)
    if len(memo) > PLAN_MEMO:
        memo.popitem(last=False)
