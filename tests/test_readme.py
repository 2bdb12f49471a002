"""The README's examples, run as written against a live server on the demo data: if the
README shows it, it works (only the port differs)."""

import json
import re

import pytest

from harness.server import REPO

README = (REPO / "README.md").read_text()


def code_block_after(marker: str, language: str) -> str:
    start = README.index(marker)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert match, f"no {language} block after {marker!r}"
    return match.group(1)


def test_python_client_snippet(server):
    """The pandas/polars snippet (it needs `pip install pandas polars`, which the README says)."""
    snippet = code_block_after("From Python, read the Arrow endpoint", "python")
    assert "http://127.0.0.1:8000/" in snippet
    namespace: dict = {}
    exec(compile(snippet.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"),  # noqa: S102
                 "README.md", "exec"), namespace)
    table, df, pl_df = namespace["table"], namespace["df"], namespace["pl_df"]
    expected = server.query("SELECT count(*) FROM cpu").json()["data"][0][0]
    assert table.num_rows == len(df) == pl_df.height == expected == 336_000
    assert list(df.columns) == pl_df.columns == table.column_names
    assert table.column_names[:3] == ["time", "host", "region"]
    assert df["host"].nunique() == pl_df["host"].n_unique() == 10


def tour_requests() -> list[tuple[str, dict]]:
    """(path, body) of every curl command in the tour."""
    tour = code_block_after("## A short tour", "sh")
    found = re.findall(r"curl -s localhost:8000(\S+) -d '(\{.*?\})'", tour)
    assert len(found) >= 5, tour
    return [(path, json.loads(body)) for path, body in found]


@pytest.mark.parametrize("path, body", tour_requests(), ids=lambda v: v if isinstance(v, str) else None)
def test_tour_commands(server, path, body):
    resp = server.query(path=path, **body)
    assert resp.status == 200, (body, resp)
    if path == "/api/v1/query" and body.get("format", "json") == "json":
        doc = resp.json()
        assert doc["success"] is True and doc["row_count"] == len(doc["data"]) > 0
