"""Running queries, visible and cancellable (GET /api/v1/queries, DELETE /api/v1/queries/{id}),
against a real fleet with auth on: progress reported by the worker while DuckDB runs, cancel
by the token that sent it, refused to another token, and the cancel of a query still waiting
for a worker. Every cancelled caller gets 409 `cancelled` and its worker serves on."""

import json
import threading

import pytest

from engine import tokens
from harness.server import assert_no_leaks, wait_for

# An expensive expression per row of a Parquet table: DuckDB reports the scan's progress.
SLOW = ("SELECT sum(len(list_transform(range(4000), x -> x * usage_user))) AS s "
        "FROM cpu /* {tag} */")


@pytest.fixture
def fleet(make_server, tmp_path):
    file = tmp_path / "tokens.json"
    made = {name: tokens.create(file, name, **kw) for name, kw in {
        "admin": {}, "alice": {"databases": ["default"]},
        "bob": {"databases": ["default"]}}.items()}
    srv = make_server(config=f'[auth]\nenabled = true\ntokens_file = "{file}"\n'
                             '[query_cache]\nenabled = false\n').start()
    return srv, made


def call(srv, method, path, token, body=None, request_id=None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if request_id:
        headers["X-Request-Id"] = request_id
    return srv.request(method, path, json.dumps(body).encode() if body else None, headers,
                       timeout=120)


class Background:
    """One query sent from a thread; `response` once it is answered."""

    def __init__(self, srv, token, sql, request_id):
        self.response = None
        self.thread = threading.Thread(target=self._run, args=(srv, token, sql, request_id))
        self.thread.start()

    def _run(self, srv, token, sql, request_id):
        self.response = call(srv, "POST", "/api/v1/query", token, {"sql": sql}, request_id)

    def result(self):
        self.thread.join(120)
        assert not self.thread.is_alive(), "the query never answered"
        return self.response


def stats(fleet) -> dict:
    srv, made = fleet
    return call(srv, "GET", "/api/v1/stats/connections", made["admin"]).json()


def listed(srv, token) -> dict:
    resp = call(srv, "GET", "/api/v1/queries", token)
    assert resp.status == 200, resp
    return {q["request_id"]: q for q in resp.json()["queries"]}


def test_running_query_shows_progress_and_its_owner_cancels_it(fleet):
    srv, made = fleet
    query = Background(srv, made["alice"], SLOW.format(tag="progress"), "alice-1")
    seen = wait_for(lambda: (q := listed(srv, made["alice"]).get("alice-1"))
                    and q["progress"] is not None and q["progress"] > 0 and q, 60,
                    what="the worker's progress in the listing")
    assert seen["state"] == "running" and seen["token"] == "alice" and seen["worker"] is not None
    assert seen["sql"].startswith("SELECT sum(len(") and seen["elapsed_ms"] > 0
    assert "alice-1" in listed(srv, made["admin"]), "an unrestricted token sees every query"
    assert "alice-1" not in listed(srv, made["bob"]), "a scoped token sees only its own"

    resp = call(srv, "DELETE", "/api/v1/queries/alice-1", made["alice"])
    assert resp.status == 200 and resp.json() == {"cancelled": 1}, resp
    answer = query.result()
    assert answer.status == 409 and answer.json()["error_type"] == "cancelled", answer
    assert "token 'alice'" in answer.json()["error"]
    wait_for(lambda: stats(fleet)["busy"] == 0, 20, what="the worker free again")
    assert listed(srv, made["admin"]) == {}
    assert call(srv, "POST", "/api/v1/query", made["alice"], {"sql": "SELECT 1 AS x"}).status == 200
    access = [e for e in srv.events("access") if e.get("request_id") == "alice-1"]
    assert [(e["status"], e["error_type"]) for e in access] == [(409, "cancelled")]


def test_cancel_is_refused_to_another_token_and_unknown_ids_are_404(fleet):
    srv, made = fleet
    query = Background(srv, made["alice"], SLOW.format(tag="refused"), "alice-2")
    wait_for(lambda: listed(srv, made["alice"]).get("alice-2", {}).get("state") == "running", 60,
             what="alice's query on a worker")
    resp = call(srv, "DELETE", "/api/v1/queries/alice-2", made["bob"])
    assert resp.status == 403 and resp.json()["error_type"] == "forbidden", resp
    assert listed(srv, made["alice"])["alice-2"]["state"] == "running", "still running"
    resp = call(srv, "DELETE", "/api/v1/queries/nobody", made["admin"])
    assert resp.status == 404 and resp.json()["error_type"] == "not_found", resp
    # An unrestricted token may cancel anyone's query.
    assert call(srv, "DELETE", "/api/v1/queries/alice-2", made["admin"]).status == 200
    answer = query.result()
    assert answer.status == 409 and "token 'admin'" in answer.json()["error"], answer


def test_cancel_of_a_query_waiting_for_a_worker(fleet):
    srv, made = fleet
    busy = [Background(srv, made["admin"], SLOW.format(tag=f"busy{i}"), f"busy-{i}")
            for i in range(2)]  # both workers
    wait_for(lambda: stats(fleet)["busy"] == 2, 60, what="both workers busy")
    waiting = Background(srv, made["alice"], "SELECT 42 AS answer", "alice-3")
    wait_for(lambda: listed(srv, made["alice"]).get("alice-3", {}).get("state") == "waiting"
             and stats(fleet)["queued"] == 1, 30, what="alice's query in the queue")
    assert listed(srv, made["alice"])["alice-3"]["worker"] is None
    assert call(srv, "DELETE", "/api/v1/queries/alice-3", made["alice"]).status == 200
    answer = waiting.result()
    assert answer.status == 409 and answer.json()["error_type"] == "cancelled", answer
    assert stats(fleet)["queued"] == 0
    for i, query in enumerate(busy):
        assert call(srv, "DELETE", f"/api/v1/queries/busy-{i}", made["admin"]).status == 200
        assert query.result().status == 409
    wait_for(lambda: stats(fleet)["busy"] == 0, 20, what="both workers free")
    assert srv.stop() == 0
    assert_no_leaks(srv)


def test_queries_route_needs_no_cancel_rights_to_list_and_read_only_tokens_cannot_cancel(
        make_server, tmp_path):
    file = tmp_path / "tokens.json"
    monitor = tokens.create(file, "monitor", read_only=True)
    srv = make_server(config=f'[auth]\nenabled = true\ntokens_file = "{file}"\n').start()
    assert call(srv, "GET", "/api/v1/queries", monitor).json() == {"queries": []}
    resp = call(srv, "DELETE", "/api/v1/queries/x", monitor)
    assert resp.status == 403, resp
