"""Metrics, logs, request ids and the OpenAPI document, from a live fleet."""

import http.client
import json
import os
import signal
import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from engine import tokens
from gateway import handlers
from gateway.metrics import RECYCLE_REASONS
from harness.server import Server, assert_no_leaks, wait_for, write_small_dataset

ENDLESS_SQL = "SELECT sum(i) AS s FROM range(1000000000000) t(i)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_small_dataset(tmp_path_factory.mktemp("obs") / "data")


@pytest.fixture(scope="module")
def srv(data, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("srv"), data,
                    config="[server]\nslow_query_ms = 0\n").start()  # 0: every query is "slow"
    yield server
    assert server.stop() == 0
    assert_no_leaks(server)


def samples(srv) -> dict:
    """{(name, frozenset(labels)): value} from GET /metrics."""
    text = srv.get("/metrics").body.decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found, name, **labels):
    return found.get((name, frozenset(labels.items())), 0.0)


def logged(srv, event, request_id):
    """The log line of that event for that request (the gateway writes it as the request ends)."""
    return wait_for(lambda: next((e for e in srv.events(event) if e["request_id"] == request_id),
                                 None), 10, what=f"the {event} line of {request_id}")


# --- request ids and the access and slow-query logs ---

def test_request_id_is_kept_or_made_and_returned(srv):
    resp = srv.request("POST", "/api/v1/query", b'{"sql": "SELECT 1"}', {"X-Request-Id": "dash-42.a:b"})
    assert resp.headers["X-Request-Id"] == "dash-42.a:b"
    for bad in ("x" * 129, "has space", "semi;colon", ""):
        made = srv.request("GET", "/health", headers={"X-Request-Id": bad}).headers["X-Request-Id"]
        assert made != bad and len(made) == 32 and int(made, 16) >= 0
    assert "X-Request-Id" in srv.get("/nope").headers  # errors carry it too
    streamed = srv.query("SELECT * FROM range(100000) t(i)", format="arrow")  # > 256 KB: streamed
    assert int(streamed.headers["Content-Length"]) > 256 * 1024
    assert len(streamed.headers["X-Request-Id"]) == 32


def test_access_line_per_request(srv):
    body = b'{"sql": "SELECT i FROM range(7) t(i)", "format": "csv"}'
    resp = srv.request("POST", "/api/v1/query", body, {"X-Request-Id": "access-1"})
    assert resp.status == 200
    line = logged(srv, "access", "access-1")
    assert line["status"] == 200 and line["method"] == "POST" and line["path"] == "/api/v1/query"
    assert line["format"] == "csv" and line["rows"] == 7 and line["bytes"] == len(resp.body)
    assert line["token"] is None
    assert line["wait_ms"] >= 0 and line["execution_ms"] > 0 and line["duration_ms"] > 0
    srv.request("POST", "/api/v1/query", b'{"sql": "DROP VIEW cpu"}', {"X-Request-Id": "access-2"})
    refused = logged(srv, "access", "access-2")
    assert refused["status"] == 403 and refused["error_type"] == "forbidden"


def test_slow_query_line(srv):
    srv.request("POST", "/api/v1/query", b'{"sql": "SELECT 42 AS slow"}', {"X-Request-Id": "slow-1"})
    line = logged(srv, "slow_query", "slow-1")
    assert line["sql"] == "SELECT 42 AS slow" and line["threshold_ms"] == 0
    assert line["level"] == "warning" and line["rows"] == 1 and line["duration_ms"] >= 0


# --- metrics ---

def test_prometheus_metrics(srv):
    before = samples(srv)
    for fmt in ("json", "json", "arrow", "csv"):
        assert srv.query("SELECT i FROM range(5) t(i)", format=fmt).status == 200
    assert srv.query("SELEC nonsense").status == 400
    after = samples(srv)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("duckfleet_queries_total", status="200", format="json") == 2
    assert delta("duckfleet_queries_total", status="200", format="arrow") == 1
    assert delta("duckfleet_queries_total", status="400", format="json") == 1
    for hist in ("wait", "execution", "send"):
        assert delta(f"duckfleet_query_{hist}_seconds_count") == 4, hist
    assert delta("duckfleet_result_rows_total") == 20
    assert delta("duckfleet_sent_bytes_total") > 0
    assert delta("duckfleet_queries_served_total") == 5
    assert delta("duckfleet_http_requests_total", route="/api/v1/query", status="200") == 4
    assert value(after, "duckfleet_queue_depth") == 0
    assert sum(value(after, "duckfleet_workers", state=s) for s in ("idle", "busy")) == 2
    for reason in RECYCLE_REASONS:
        assert ("duckfleet_worker_recycles_total", frozenset({("reason", reason)})) in after
    assert ("duckfleet_worker_crashes_total", frozenset()) in after
    assert ("duckfleet_query_timeouts_total", frozenset()) in after
    assert value(after, "duckfleet_shm_bytes") > 0  # the pool keeps a segment for reuse
    pids = {str(w["pid"]) for w in srv.stats()["workers"]}
    rss = {dict(labels)["pid"]: v for (name, labels), v in after.items()
           if name == "duckfleet_worker_rss_bytes"}
    assert set(rss) == pids and all(v > 10 * 2**20 for v in rss.values())
    assert not any(name.endswith("_created") for name, _ in after)


def test_json_metrics_and_stats_agree_with_prometheus(srv):
    srv.query("SELECT 1")
    text = samples(srv)
    doc = srv.get("/api/v1/metrics").json()
    stats = srv.stats()
    for (name, labels), v in text.items():
        if name.startswith(("duckfleet_query_", "duckfleet_http_", "duckfleet_sent_", "duckfleet_worker_rss")):
            continue  # these change with the scrapes in between, or are histograms (below)
        got = doc[name] if not labels else next(
            s["value"] for s in doc[name] if frozenset(s["labels"].items()) == labels)
        assert got == v, name
    assert doc["duckfleet_query_wait_seconds"]["count"] >= 1
    assert doc["duckfleet_queries_served_total"] == stats["served"]
    assert doc["duckfleet_worker_crashes_total"] == stats["crashed"]
    assert doc["duckfleet_query_timeouts_total"] == stats["timeouts"]
    assert doc["duckfleet_queue_depth"] == stats["queued"]
    assert {s["labels"]["pid"] for s in doc["duckfleet_worker_rss_bytes"]} == \
        {str(w["pid"]) for w in stats["workers"]}


def test_timeouts_crashes_and_fleet_events(make_server, data):
    srv = make_server(data_dir=data, workers=1).start()
    assert srv.query(ENDLESS_SQL, timeout_ms=300).status == 504
    result = {}
    t = threading.Thread(target=lambda: result.update(resp=srv.query(ENDLESS_SQL, timeout_ms=4000)))
    t.start()
    wait_for(lambda: srv.stats()["busy"] == 1, 10, what="the query to start")
    victim = srv.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    t.join(30)
    # The lost query is retried on the replacement, where it meets its deadline.
    assert result["resp"].status == 504 and result["resp"].json()["error_type"] == "timeout"
    srv.wait_ready()
    found = samples(srv)
    assert value(found, "duckfleet_query_timeouts_total") == 2
    assert value(found, "duckfleet_worker_crashes_total") == 1
    crashed = srv.events("crashed")
    assert [(e["process"], e["child_pid"], e["signal"]) for e in crashed] == [("worker", victim, "SIGKILL")]
    assert srv.stop() == 0
    spawned = srv.events("spawned")
    assert [e["process"] for e in spawned] == ["gateway", "worker", "worker"]  # the replacement
    ready = [(e["process"], e.get("slot")) for e in srv.events("ready")]
    assert ready.count(("worker", 0)) == 2 and ("gateway", None) in ready
    exited = {e["child_pid"] for e in srv.events("exited")}
    assert exited == {e["child_pid"] for e in spawned} - {victim}


def test_a_cut_stream_is_logged_and_counted_as_it_was_sent(make_server, data):
    """A result cut at max_result_mb after its headers: one access line with the status that
    went out (200), why it was cut, the body bytes sent and the request id, also on the
    stream_aborted warning; one metrics sample that says the same."""
    srv = make_server(data_dir=data, config="[results]\nchunk_mb = 1\nmax_result_mb = 3\n").start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", "/api/v1/query", json.dumps(
        {"sql": "SELECT i, 'v' || i AS s FROM range(400000) t(i)"}).encode(),
        {"X-Request-Id": "cut-1"})
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    conn.close()
    access = wait_for(lambda: [e for e in srv.events("access") if e["request_id"] == "cut-1"],
                      10, what="the access line")
    assert len(access) == 1
    line = access[0]
    assert (line["status"], line["aborted"]) == (200, "too_large"), line
    assert line["bytes"] >= len(cut.value.partial) > 0, line
    aborted = srv.event("stream_aborted")
    assert aborted["request_id"] == "cut-1" and aborted["aborted"] == "too_large"
    metrics = samples(srv)
    assert metrics[("duckfleet_queries_aborted_total", frozenset({("reason", "too_large")}))] == 1
    assert metrics[("duckfleet_queries_total",
                    frozenset({("status", "200"), ("format", "json")}))] == 1
    assert metrics[("duckfleet_sent_bytes_total", frozenset())] >= line["bytes"]


# --- the OpenAPI document ---

def test_openapi_describes_every_route(srv):
    doc = srv.get("/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    served = {(r.method.lower(), r.path) for r in handlers.routes(console_on=True)}  # the default
    described = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert served == described
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert "200" in operation["responses"], (method, path)
    assert "securitySchemes" not in doc["components"]  # auth is off on this server


@pytest.fixture(scope="module")
def fuzz_target(data, tmp_path_factory):
    """An auth-enabled fleet with short timeouts, and a token for it."""
    root = tmp_path_factory.mktemp("fuzz")
    token = tokens.create(root / "tokens.json", "fuzz")
    server = Server(root / "srv", data, workers=1, config=(
        f'[auth]\nenabled = true\ntokens_file = "{root / "tokens.json"}"\n'
        "[queue]\nquery_timeout_s = 5\n")).start()
    yield server, token
    assert server.stop() == 0
    assert_no_leaks(server)


@pytest.fixture(scope="module")
def api_schema(fuzz_target):
    server, token = fuzz_target
    url = f"http://127.0.0.1:{server.port}/api/v1/openapi.json"
    return schemathesis.openapi.from_url(url, headers={"Authorization": f"Bearer {token}"})


schema = schemathesis.pytest.from_fixture("api_schema")
CHECKS = [getattr(schemathesis.checks, name) for name in (
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
    "ignored_auth", "unsupported_method")]


@schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_property_based(case, fuzz_target):
    """Bounded: 10 generated requests per operation. No 5xx; each response matches the document.

    A generated timeout_ms of 1 ms gets its documented 504 (tests/test_hostile.py checks that):
    such deadlines are raised here, so that any 5xx left is a bug."""
    _, token = fuzz_target
    if isinstance(case.body, dict) and isinstance(case.body.get("timeout_ms"), int) \
            and case.body["timeout_ms"] > 0:
        case.body["timeout_ms"] = max(case.body["timeout_ms"], 60_000)
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=30)
