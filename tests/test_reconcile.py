"""The reconciling supervisor: the turn itself (no processes), then real fleets under
recycling, reload and scaling at once, and memory planned again when the count changes."""

import os
import signal

from engine import memory
from engine.children import Child
from engine.reconcile import turn
from harness.server import wait_for

MiB = 2**20


# --- the turn, on a table of rows (no processes) ---

def worker(slot, pid, ready=True, generation=0, recycle=None, retired=None):
    child = Child("worker", slot, pid, generation=generation, ready=ready)
    child.recycle, child.retired = recycle, retired
    return child


def run_turn(workers, count=2, generation=0, held=()):
    def stale(w):
        return w.recycle or ("reload" if w.generation != generation else None)
    return turn(workers, count, stale, lambda slot: slot not in held)


def test_a_stale_worker_leaves_only_once_its_replacement_is_ready():
    old = worker(0, 10, recycle="max_queries")
    other = worker(1, 11)
    first = run_turn([old, other])
    assert first.spawn == [0] and first.retire == []
    new = worker(0, 12, ready=False)
    assert run_turn([old, other, new]).spawn == [] and run_turn([old, other, new]).retire == []
    new.ready = True
    done = run_turn([old, other, new])
    assert done.spawn == [] and done.retire == [(old, "max_queries")]


def test_recycling_then_reload_leaves_one_worker_per_slot():
    """The race of issue 12: slot 0's worker asked to be recycled, its replacement boots, then
    a reload makes both stale. One new worker is spawned, and once it is ready both go."""
    recycled = worker(0, 10, recycle="max_queries")
    booting = worker(0, 12, ready=False)
    other = worker(1, 11)
    after_reload = run_turn([recycled, booting, other], generation=1)
    assert after_reload.spawn == [0, 1]  # a recycled slot does not wait for the rolling one
    new, new_other = worker(0, 13, ready=False, generation=1), worker(1, 14, ready=False, generation=1)
    table = [recycled, booting, other, new, new_other]
    assert run_turn(table, generation=1).spawn == []
    booting.ready = True  # the stale replacement becomes ready: it keeps nothing
    assert run_turn(table, generation=1).retire == []
    new.ready = True
    settled = run_turn(table, generation=1)
    assert {(c.pid, why) for c, why in settled.retire} == {(10, "max_queries"), (12, "reload")}
    assert settled.spawn == []


def test_a_reload_replaces_serving_workers_one_slot_at_a_time():
    table = [worker(0, 10), worker(1, 11), worker(2, 12)]
    assert run_turn(table, count=3, generation=1).spawn == [0]
    table.append(worker(0, 13, ready=False, generation=1))
    assert run_turn(table, count=3, generation=1).spawn == []
    table[-1].ready = True
    step = run_turn(table, count=3, generation=1)
    assert step.retire == [(table[0], "reload")] and step.spawn == [1]


def test_a_slot_without_a_ready_worker_does_not_wait_for_a_rolling_reload():
    rolling = [worker(0, 10), worker(0, 12, ready=False, generation=1), worker(1, 11)]
    crashed_slot = run_turn(rolling, count=3, generation=1)
    assert crashed_slot.spawn == [2]  # slot 1 (stale, serving) waits; slot 2 (empty) does not


def test_scale_down_and_backoff():
    table = [worker(0, 10), worker(1, 11), worker(2, 12)]
    assert run_turn(table, count=2).retire == [(table[2], "scaled_down")]
    assert run_turn([worker(0, 10)], count=2, held={1}).spawn == []
    assert run_turn([worker(0, 10)], count=2).spawn == [1]


def test_retired_workers_are_not_counted():
    leaving = worker(0, 10, retired="reload")
    assert run_turn([leaving, worker(1, 11)]).spawn == [0]


# --- real fleets ---

def settled(srv, count):
    """One worker per slot in the gateway's stats, as many worker processes, none leaving."""
    workers = srv.stats()["workers"]
    return (sorted(w["id"] for w in workers) == list(range(count))
            and all(w["state"] != "retiring" for w in workers)
            and len(srv.processes("engine.worker")) == count)


def test_recycling_reload_and_scaling_at_once_settle_to_one_worker_per_slot(make_server):
    srv = make_server(env={"DUCKFLEET_WORKERS_MAX_QUERIES": "5"}).start()
    for i in range(12):
        assert srv.query(f"SELECT {i} AS i").json()["data"] == [[i]]
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: srv.event("reloading"), 20, what="the reload to be taken")
    srv.send_signal(signal.SIGTTIN)
    wait_for(lambda: srv.events("workers"), 20, what="the scale-up to be taken")
    srv.send_signal(signal.SIGTTOU)
    wait_for(lambda: len(srv.events("workers")) == 2, 20, what="the scale-down to be taken")
    wait_for(lambda: srv.event("reloaded") and settled(srv, 2), 90, what="one worker per slot")
    for i in range(12):  # recycling goes on, and so does the invariant
        assert srv.query(f"SELECT {i} AS i").json()["data"] == [[i]]
    wait_for(lambda: settled(srv, 2), 90, what="one worker per slot after more recycling")
    assert [e["count"] for e in srv.events("workers")] == [3, 2]
    assert not srv.events("crashed") and srv.stats()["worker_count"] == 2


def auto_limit(count, overhead_mb=200):
    budget = int(memory.system_memory_bytes() * 0.7)
    return (budget - (count + 2) * overhead_mb * MiB) // count


def test_scaling_plans_memory_again(make_server):
    """`auto` limits are divided again: after SIGTTIN the new worker gets a third of the budget
    and the others, over that share, are replaced to get it too; after SIGTTOU the workers,
    under the new share, serve on, and a replacement gets half the budget again."""
    srv = make_server().start()
    assert {w["memory_limit"] for w in srv.stats()["workers"]} == {auto_limit(2)}
    srv.send_signal(signal.SIGTTIN)
    wait_for(lambda: settled(srv, 3) and {w["memory_limit"] for w in srv.stats()["workers"]}
             == {auto_limit(3)}, 90, what="three workers of a third of the budget each")
    assert srv.events("workers")[-1]["memory_limit_bytes"] == auto_limit(3)
    assert {e["reason"] for e in srv.events("retiring")} == {"memory_plan"}
    spawned = len(srv.events("spawned"))
    srv.send_signal(signal.SIGTTOU)
    wait_for(lambda: settled(srv, 2), 60, what="two workers")
    assert srv.events("workers")[-1]["memory_limit_bytes"] == auto_limit(2)
    assert len(srv.events("spawned")) == spawned, "workers under the share serve on"
    assert not srv.events("crashed")
    victim = srv.stats()["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    # One snapshot: the gateway may list the killed worker's link a moment after it died.
    workers = wait_for(lambda: (ws := srv.stats()["workers"])
                       and sorted(w["id"] for w in ws) == [0, 1]
                       and victim["pid"] not in {w["pid"] for w in ws} and ws, 60,
                       what="the replacement in the gateway's stats")
    limits = {w["id"]: w["memory_limit"] for w in workers}
    assert limits[victim["id"]] == auto_limit(2) and set(limits.values()) == {auto_limit(2),
                                                                                auto_limit(3)}
    assert srv.query("SELECT 1 AS x").status == 200


def test_a_count_that_does_not_fit_is_refused_with_the_numbers(make_server):
    budget = int(memory.system_memory_bytes() * 0.7)
    overhead = 200 * MiB
    limit_mb = ((budget - 4 * overhead) // 2) // MiB  # two workers fit, three cannot
    srv = make_server(config=f'[duckdb]\nmemory_limit = "{limit_mb}MiB"\n').start()
    spawned = len(srv.events("spawned"))
    srv.send_signal(signal.SIGTTIN)
    refused = wait_for(lambda: srv.event("workers_refused"), 20, what="the refusal")
    assert refused["count"] == 3 and refused["current"] == 2
    assert refused["budget_bytes"] == budget
    assert refused["need_bytes"] == 3 * (limit_mb * MiB + overhead) + 2 * overhead
    assert "does not fit the memory budget" in refused["error"]
    assert refused["level"] == "warning"
    srv.send_signal(signal.SIGTTOU)  # taken after the refusal: the count stayed 2
    wait_for(lambda: srv.events("workers"), 20, what="the scale-down")
    assert [e["count"] for e in srv.events("workers")] == [1]
    wait_for(lambda: settled(srv, 1), 60, what="one worker")
    assert len(srv.events("spawned")) == spawned, "an explicit limit needs no replacement"


def test_a_reload_whose_workers_cannot_boot_keeps_the_previous_configuration(make_server):
    srv = make_server().start()
    before = set(srv.worker_pids())
    srv.config_path.write_text('[catalog.views]\nbroken = "SELECT * FROM nowhere"\n')
    srv.send_signal(signal.SIGHUP)
    failed = wait_for(lambda: srv.event("reload_failed"), 60, what="the refusal")
    assert "could not boot" in failed["reason"] and "nowhere" in srv.event("worker_boot_failed")["error"]
    assert set(srv.worker_pids()) == before and srv.process.poll() is None
    assert not srv.events("worker_cannot_boot") and not srv.events("reloaded")
    assert srv.query("SELECT 1 AS x").json()["data"] == [[1]]
    # The old workers are fresh again: a later reload of a good file replaces them.
    srv.config_path.write_text("")
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: srv.event("reloaded") and settled(srv, 2), 90, what="the good reload")
    assert not before & set(srv.worker_pids())
