"""What fails a peers run: every error and every wrong answer of duckfleet, in every workload.

Read from the run's results after the fact, so no workload can forget to report: duckfleet
(every peer whose name starts with "duckfleet", cache on or off) failing to start, an error or
a wrong answer in the dashboard mix (warm-up included), a large result that failed, a TPC-H
error or mismatch, an error or a wrong answer in the history workload; and a workload that was
asked for but holds no duckfleet result at all (a run that measured nothing must not pass).
Another peer's errors and wrong answers are its results: shown in the report, never fatal.
"""

from __future__ import annotations


def _ours(name: str) -> bool:
    return name.startswith("duckfleet")


def failures(out: dict, workloads: set[str]) -> list[str]:
    found = [f"{name}: unavailable: {why}" for name, why in out["unavailable"].items()
             if _ours(name.split(" ")[-1])]
    results = {"dashboard": out["dashboard"], "large": out["large"],
               "tpch": out.get("tpch", {}).get("peers", {}), "history": out.get("history", {}).get("peers", {})}
    found += [f"{w}: no duckfleet result" for w in sorted(workloads & set(results))
              if not any(_ours(name) for name in results[w])]
    for name, rows in out["dashboard"].items():
        if not _ours(name):
            continue
        for sql_wrong in rows.get("warm_up_wrong", []):
            found.append(f"{name} dashboard warm-up: wrong answer {sql_wrong['wrong']} to {sql_wrong['sql'][:120]}")
        for c, r in rows.items():
            if not c.isdigit():
                continue
            if r["errors"]:
                found.append(f"{name} dashboard c={c}: {r['errors']} errors of {r['requests']}: "
                             + "; ".join(f"{n}x {k} ({r['first_errors'].get(k, '')[:160]})"
                                         for k, n in r["error_kinds"].items()))
            if r["answers"]["wrong"]:
                found.append(f"{name} dashboard c={c}: {r['answers']['wrong']} wrong answers of "
                             f"{r['answers']['checked']} checked, e.g. {r['answers']['wrong_examples'][:2]}")
    for name, rows in out["large"].items():
        if _ours(name):
            found += [f"{name} large {k}: {r['error']}" for k, r in rows.items() if r["error"]]
    for name, r in out.get("tpch", {}).get("peers", {}).items():
        if _ours(name):
            found += [f"{name} TPC-H Q{e['query']} ({e['phase']}): {e['error']}" for e in r["errors"]]
            found += [f"{name} TPC-H Q{e['query']} ({e['phase']}): wrong: {e['mismatch']}" for e in r["mismatches"]]
    for name, r in out.get("history", {}).get("peers", {}).items():
        if not _ours(name):
            continue
        found += [f"{name} history warm-up: wrong answer {e['wrong']} to {e['sql'][:120]}"
                  for e in r.get("warm_up_wrong", [])]
        for key, row in r.items():
            if isinstance(row, dict) and row.get("errors"):
                found.append(f"{name} history {key}: {row['errors']} errors {row.get('error_kinds', '')}")
            if isinstance(row, dict) and row.get("answers", {}).get("wrong"):
                found.append(f"{name} history {key}: {row['answers']['wrong']} wrong answers, "
                             f"e.g. {row['answers']['wrong_examples'][:2]}")
        for form, row in r.get("last_hour", {}).items():
            if row["errors"]:
                found.append(f"{name} history last hour ({form}): {row['errors']} errors of {row['count']}")
    return found
