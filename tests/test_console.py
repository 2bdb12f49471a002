"""The web console (gateway/console/) in a real browser: headless Chromium driven by Selenium,
against a real fleet. The page loads with no console error; the catalog lists the demo tables;
a query's rows match the API's; a time-series result is charted and the URL reproduces it; a
long query shows its progress and is cancelled from the page; with auth on the token prompt
works and a wrong token is refused; markup in a column name or a value stays text; with
`server.console = false` the routes are gone.

Browser: Debian's `chromium` and `chromium-driver`. Where they (or selenium) are missing these
tests skip, saying so, unless REQUIRE_BROWSER_TESTS=1 (.ci/run sets it): then they fail.
On a failure, screenshots of each view go to a folder the failure names. With
CONSOLE_DOCS_SCREENSHOTS=1 the tests rewrite the README's screenshots (docs/console-*.png).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest

from engine import tokens
from gateway import console
from harness.server import REPO, Server, assert_no_leaks, wait_for

pytestmark = pytest.mark.slow  # a browser per test: in CI's slow run (python -m pytest -m slow)
REQUIRE_BROWSER = os.environ.get("REQUIRE_BROWSER_TESTS") == "1"
WRITE_DOCS = os.environ.get("CONSOLE_DOCS_SCREENSHOTS") == "1"
WAIT_S = 30  # the longest any page state is waited for
VIEWS = ("catalog", "query", "fleet", "running")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1280,860")
# An expensive expression per row of a Parquet table: DuckDB reports the scan's progress.
SLOW = "SELECT sum(len(list_transform(range(4000), x -> x * usage_user))) AS s FROM cpu"
MARKUP_COLUMN = "<img src=x onerror=\"document.title='owned'\">"
MARKUP_VALUE = "<b>bold</b>"


def _missing_browser() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return (f"no {' or '.join(missing)} on PATH "
                "(apt-get install chromium chromium-driver)")
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _missing_browser()
    if reason:
        if REQUIRE_BROWSER:
            pytest.fail(f"REQUIRE_BROWSER_TESTS=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_dir):
    """The demo tables, and database `weird` whose table `markup` has markup in a column's name
    and in a value (table names cannot hold it: the catalog accepts only [A-Za-z0-9_-])."""
    root = tmp_path_factory.mktemp("console-data")
    shutil.copytree(demo_dir / "default", root / "default")
    folder = root / "weird" / "markup" / "2025" / "11" / "01" / "00"
    folder.mkdir(parents=True)
    column = MARKUP_COLUMN.replace('"', '""')
    con = duckdb.connect()
    con.execute(f"COPY (SELECT TIMESTAMP '2025-11-01 00:00:00' AS time, '{MARKUP_VALUE}' AS "
                f"\"{column}\") TO '{folder / 'm.parquet'}' (FORMAT parquet)")
    con.close()
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory, data):
    server = Server(tmp_path_factory.mktemp("console-srv"), data, workers=2,
                    config="[query_cache]\nenabled = true\n").start()
    yield server
    assert server.stop() == 0
    assert_no_leaks(server)


class Page:
    """The console in the browser, with the waits and reads the tests share."""

    def __init__(self, driver, server: Server, shots: Path):
        self.driver, self.server, self.shots = driver, server, shots

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/"

    def open(self, query: str = "") -> "Page":
        self.driver.get_log("browser")  # what earlier pages logged is theirs
        self.driver.get(self.url + query)
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete", "the page")
        return self

    def wait(self, condition, what: str):
        """condition's first true value; it is tried again when the element it held was
        replaced (the running list and the fleet view are redrawn every few seconds)."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        ignored = (NoSuchElementException, StaleElementReferenceException)
        return WebDriverWait(self.driver, WAIT_S, 0.05, ignored).until(condition, f"waiting for {what}")

    def find(self, css: str):
        return self.driver.find_element("css selector", css)

    def find_all(self, css: str):
        return self.driver.find_elements("css selector", css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def view(self, name: str) -> None:
        self.find(f'nav button[data-view="{name}"]').click()
        self.wait(lambda d: self.find(f"#view-{name}").is_displayed(), f"the {name} view")

    def run(self, sql: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self.view("query")
        editor = self.find("#sql")
        editor.clear()
        editor.send_keys(sql)
        editor.send_keys(Keys.CONTROL, Keys.ENTER)

    def finished(self) -> str:
        """The status line once the query in the editor has answered (rows or an error)."""
        return self.wait(lambda d: not self.find("#run").get_attribute("disabled")
                         and "Running" not in (status := self.text("#query-status")) and status,
                         "the query's answer")

    def result(self) -> tuple[list[str], list[list[str]]]:
        head = [th.text for th in self.find_all("#result thead th")]
        rows = [[td.text for td in tr.find_elements("css selector", "td")]
                for tr in self.find_all("#result tbody tr")]
        return head, rows

    def terms(self, css: str) -> dict[str, str]:
        """A definition list's terms and their values."""
        return self.driver.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll(arguments[0] + ' dt'),"
            " dt => [dt.textContent, dt.nextElementSibling.textContent]))", css)

    def errors(self, *answered: int) -> list[dict]:
        """The console's errors since the last call, but Chromium's note of each API answer
        with one of the `answered` statuses (the test asked for them)."""
        notes = tuple(f"the server responded with a status of {status} " for status in answered)
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"
                and not (e["source"] == "network" and any(n in e["message"] for n in notes))]

    def screenshot(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(folder / f"{name}.png"))

    def document(self, view: str) -> None:
        """The README's screenshot of a view, when CONSOLE_DOCS_SCREENSHOTS=1 asks for it."""
        if WRITE_DOCS:
            self.screenshot(REPO / "docs", f"console-{view}")

    def capture_views(self) -> Path:
        for view in VIEWS:
            try:
                self.find(f'nav button[data-view="{view}"]').click()
            except Exception:  # noqa: BLE001 - a page too broken to click is shot as it is
                pass
            self.screenshot(self.shots, view)
        return self.shots


@pytest.fixture
def page(browser, srv, tmp_path):
    return Page(browser, srv, tmp_path / "screenshots")


def shots_on_failure(test):
    """On a failure, a screenshot of each view, in a folder the failure names."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except Exception as exc:
            exc.add_note(f"screenshots of each view: {kwargs['page'].capture_views()}")
            raise
    return wrapper


def cell(value) -> str:
    """A JSON value as the console shows it (console.js cellText), for comparing with the API."""
    if value is None:
        return "NULL"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@shots_on_failure
def test_page_loads_clean_and_lists_the_catalog(page):
    response = page.server.get("/")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    page.open()
    page.wait(lambda d: len(page.find_all("details.table-card")) >= 4, "the catalog's tables")
    tables = {(card.find_element("xpath", "ancestor::section[1]/h2").text,
               card.find_element("css selector", "summary .name").text)
              for card in page.find_all("details.table-card")}
    assert tables == {("default", "cpu"), ("default", "disk"), ("default", "mem"),
                      ("weird", "markup")}
    cpu = page.find_all("details.table-card")[0]
    assert "336,000 rows · 168 files · 3.2 MiB" in cpu.text
    cpu.find_element("css selector", "summary .name").click()
    page.wait(lambda d: "usage_user" in cpu.text and "DOUBLE" in cpu.text, "cpu's columns")
    assert "time 2025-10-31T23:59:59.999999+00:00 … 2025-11-07T23:59:42.000001+00:00" in cpu.text
    page.document("catalog")
    for _ in range(2):  # a miss, then a hit
        assert page.server.query("SELECT count(*) AS n FROM mem").status == 200
    cache = page.server.get("/api/v1/cache/stats").json()
    assert cache["hits"] >= 1 and cache["entries"] >= 1
    page.view("fleet")
    pids = {str(pid) for pid in page.server.worker_pids()}
    page.wait(lambda d: {row.find_elements("css selector", "td")[1].text
                         for row in page.find_all("#fleet-workers tbody tr")} == pids,
              "both workers in the fleet view")
    shown = page.terms("#fleet-cache")
    assert (shown["hits"], shown["entries"]) == (str(cache["hits"]), str(cache["entries"]))
    stats = page.server.stats()
    summary = page.terms("#fleet-summary")
    assert summary["workers"] == f"{stats['worker_count']} ({stats['busy']} busy, {stats['idle']} idle)"
    assert summary["queue depth"] == "0 (high 0, normal 0, low 0)"
    rss = page.find_all("#fleet-workers meter")
    assert len(rss) == 2 and all(float(m.get_attribute("value")) > 0 for m in rss)
    page.document("fleet")
    page.view("running")
    page.wait(lambda d: "No query is" in page.text("#running-status"), "the empty running list")
    assert page.errors() == []


@shots_on_failure
def test_query_rows_match_the_api(page):
    page.open()
    sql = ("SELECT host, region, round(avg(usage_user), 2) AS usage, count(*) AS n, "
           "NULL AS nothing FROM cpu GROUP BY ALL ORDER BY host")
    page.run(sql)
    status = page.finished()
    api = page.server.query(sql).json()
    assert page.result() == (api["columns"], [[cell(v) for v in row] for row in api["data"]])
    assert status.startswith("10 rows · execution ")
    assert "files scanned 168, pruned 0" in status and "request console-" in status
    assert page.find("#chart-toggle").get_attribute("disabled"), "nothing to chart over time"
    # Nested values, and integers JavaScript's numbers cannot hold, as the API sent them.
    sql = "SELECT 9007199254740993::BIGINT AS big, [9007199254740993, 1] AS list, {'a': 1.5} AS s"
    page.run(sql)
    page.finished()
    assert page.result() == (["big", "list", "s"],
                             [["9007199254740993", "[9007199254740993,1]", '{"a":1.5}']])
    assert page.result()[1] == [[cell(v) for v in row] for row in page.server.query(sql).json()["data"]]
    # Clicking a table in the catalog runs a sensible query over it.
    page.view("catalog")
    page.wait(lambda d: page.find_all("button.query-table"), "the catalog")
    page.find_all("button.query-table")[0].click()
    page.finished()
    assert page.find("#sql").get_attribute("value") == "SELECT * FROM cpu ORDER BY time DESC LIMIT 100"
    head, rows = page.result()
    assert head[:3] == ["time", "host", "region"] and len(rows) == 100
    assert rows[0][0] == "2025-11-07T23:59:42.000000"
    # An error as duckfleet reports it, and the editor works on.
    page.run("SELECT no_such_column FROM cpu")
    page.finished()
    error = page.text("#query-error")
    assert error.startswith("400 sql_error") and "no_such_column" in error
    assert page.result() == ([], [])
    assert page.errors(400) == []


@shots_on_failure
def test_downloads_hold_the_whole_result(page, tmp_path):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    folder = tmp_path / "downloads"
    folder.mkdir()
    page.driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                                {"behavior": "allow", "downloadPath": str(folder)})
    page.open()
    sql = "SELECT host, count(*) AS n, max(usage_user) AS top FROM cpu GROUP BY host ORDER BY host"
    page.run(sql)
    page.finished()
    expected = page.server.query(sql).json()["data"]
    readers = {"csv": pa.csv.read_csv, "parquet": pa.parquet.read_table,
               "arrows": lambda path: pa.ipc.open_stream(path.read_bytes()).read_all()}
    for option, extension in (("csv", "csv"), ("parquet", "parquet"), ("arrow", "arrows")):
        page.find(f'#download-format option[value="{option}"]').click()
        page.find("#download").click()
        path = folder / f"duckfleet-result.{extension}"
        page.wait(lambda d: path.exists() and page.text("#query-status").startswith("Downloaded"),
                  f"the {option} file")
        table = readers[extension](path)
        assert [list(row.values()) for row in table.to_pylist()] == expected, option
    assert page.errors() == []


@shots_on_failure
def test_time_series_chart_lives_in_the_url(page):
    page.open()
    sql = ("SELECT time_bucket(INTERVAL 1 hour, time) AS hour, avg(usage_user) AS usage_user, "
           "avg(usage_system) AS usage_system FROM cpu GROUP BY hour ORDER BY hour")
    page.run(sql)
    assert page.finished().startswith("168 rows")
    toggle = page.find("#chart-toggle")
    assert not toggle.get_attribute("disabled")
    toggle.click()
    page.wait(lambda d: page.find_all("#chart canvas"), "the chart")
    legend = page.text("#chart .u-legend")
    assert "usage_user" in legend and "usage_system" in legend
    page.document("query")
    link = page.driver.current_url
    assert "chart=1" in link and "time_bucket" in link
    page.driver.get("about:blank")
    page.driver.get(link)  # the link alone: the query runs and its chart is drawn again
    page.wait(lambda d: page.find_all("#chart canvas"), "the chart from the link")
    assert page.find("#sql").get_attribute("value") == sql
    # One text column with a few values: a line for each.
    page.run("SELECT time_bucket(INTERVAL 1 hour, time) AS hour, host, avg(usage_user) AS usage "
             "FROM cpu WHERE host IN ('server01', 'server02') GROUP BY ALL ORDER BY hour, host")
    assert page.finished().startswith("336 rows")
    page.wait(lambda d: "usage server02" in page.text("#chart .u-legend"), "a line per host")
    labels = page.driver.execute_script(
        "return Array.from(document.querySelectorAll('#chart .u-legend .u-label'), e => e.textContent)")
    assert labels[1:] == ["usage server01", "usage server02"]
    assert page.errors() == []


@shots_on_failure
def test_long_query_shows_progress_and_is_cancelled_from_the_page(page):
    srv = page.server
    page.open()
    # From the editor: its progress bar, then its Cancel button.
    page.run(SLOW)
    page.wait(lambda d: float(page.find("#query-progress").get_attribute("value") or 0) > 0,
              "the query's progress in the editor")
    page.find("#cancel").click()
    page.finished()
    assert page.text("#query-error").startswith("409 cancelled")
    # From the list of running queries.
    page.run(SLOW)
    page.view("running")
    row = page.wait(lambda d: float(page.find("#running-list progress").get_attribute("value") or 0)
                    > 0 and page.text("#running-list tbody tr"), "a progress bar in the running list")
    assert "running" in row and "SELECT sum(len(list_transform" in row
    assert len(page.find_all("#running-list tbody tr")) == 1
    page.document("running")
    page.wait(lambda d: page.find("#running-list button.cancel-query").click() or True, "Cancel")
    page.wait(lambda d: "No query is" in page.text("#running-status"), "the list emptied")
    page.view("query")
    page.finished()
    assert page.text("#query-error").startswith("409 cancelled")
    wait_for(lambda: srv.stats()["busy"] == 0, 20, what="the workers free again")
    assert srv.stats()["queries_cancelled"] >= 2
    assert srv.get("/api/v1/queries").json() == {"queries": []}
    assert page.errors(409) == []


@shots_on_failure
def test_markup_from_the_data_stays_text(page):
    page.open("console")  # the page's other address: its files and API calls resolve alike
    page.wait(lambda d: len(page.find_all("details.table-card")) >= 4, "the catalog")
    card = [c for c in page.find_all("details.table-card")
            if c.find_element("css selector", "summary .name").text == "markup"][0]
    card.find_element("css selector", "summary .name").click()
    page.wait(lambda d: MARKUP_COLUMN in card.text, "the column's name, as text")
    page.run('SELECT * FROM weird.markup')
    page.finished()
    assert page.result() == (["time", MARKUP_COLUMN], [["2025-11-01T00:00:00.000000", MARKUP_VALUE]])
    page.run(f"SELECT '{MARKUP_VALUE}'::INTEGER")
    page.finished()
    assert MARKUP_VALUE in page.text("#query-error")
    assert page.find_all("img") == [] and page.find_all("main b") == []
    assert page.driver.title == "duckfleet console"
    assert page.errors(400) == []


@shots_on_failure
def test_token_prompt_and_a_wrong_token(page, make_server, tmp_path):
    file = tmp_path / "tokens.json"
    token = tokens.create(file, "console")
    page.server = make_server(config=f'[auth]\nenabled = true\ntokens_file = "{file}"\n',
                              workers=1).start()
    assert page.server.get("/console/console.js").status == 200, "the page's files need no token"
    assert page.server.get("/api/v1/catalog").status == 401
    page.open()
    dialog = page.wait(lambda d: (box := page.find("#login")).is_displayed() and box, "the prompt")
    page.find("#login-token").send_keys("not-a-token\n")
    page.wait(lambda d: "Refused" in page.text("#login-error"), "the refusal")
    assert "not valid" in page.text("#login-error") and dialog.is_displayed()
    page.find("#login-token").send_keys(token + "\n")
    page.wait(lambda d: len(page.find_all("details.table-card")) == 3, "the demo's tables")
    assert not dialog.is_displayed()
    stored = page.driver.execute_script(
        "return [sessionStorage.getItem('duckfleet.token'), localStorage.length, document.cookie]")
    assert stored == [token, 0, ""]
    page.run("SELECT 42 AS answer")
    page.finished()
    assert page.result() == (["answer"], [["42"]])
    # A token that stops working (revoked, or another one) brings the prompt back.
    page.driver.execute_script("sessionStorage.setItem('duckfleet.token', 'revoked')")
    page.view("catalog")
    page.find("#catalog-reload").click()
    page.wait(lambda d: dialog.is_displayed() and "Refused" in page.text("#login-error"),
              "the prompt again")


def test_console_off_removes_its_routes(make_server):
    srv = make_server(config="[server]\nconsole = false\n", workers=1).start()
    for path in ("/", "/console", "/console/console.js"):
        assert srv.get(path).status == 404, path
    assert srv.get("/api/v1/catalog").status == 200
    paths = srv.get("/api/v1/openapi.json").json()["paths"]
    assert "/" not in paths and "/console" not in paths and "/api/v1/query" in paths


def test_every_file_of_the_console_is_served():
    """What static/ holds is what the routes serve (and uPlot's licence, which travels with it);
    pyproject's package data takes static/* into a wheel."""
    static = {path.name for path in (REPO / "gateway" / "console" / "static").iterdir()}
    assert static == {console.PAGE, *console.ASSETS, "uPlot.LICENSE"}
    served = {route.path for route in console.routes()}
    assert served == console.PATHS
