"""The snapshots flow (the UI's `dbre snapshots`), under Prefect's harness on a real local repository: the newest
snapshots, newest first, as one summary and one table artifact; the run is named for what it lists; a literal
key is refused before any work."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from prefect import get_client

from flows.snapshots import snapshots_flow
from tests.dbfactory import cli, make_db
from tests.prefect_fixtures import artifacts_of, prefect_harness  # noqa: F401, I001


def test_the_newest_snapshots_of_a_database_as_a_table(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    app, other = make_db(tmp_path / "app.db", mb=0.2), make_db(tmp_path / "other.db", mb=0.1, seed=1)
    ids = []
    for i in range(3):
        conn = sqlite3.connect(app, isolation_level=None)
        conn.execute("UPDATE items SET n = n + 1 WHERE id = ?", (i + 1,))
        conn.close()
        r = cli("backup", app, "--repo", repo, "--db", "app", "--json")
        assert r.returncode == 0, r
        ids.append(json.loads(r.stdout)["id"])
    assert cli("backup", other, "--repo", repo, "--db", "other").returncode == 0

    state = snapshots_flow(database="app", last=2, repo=repo, return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [row["id"] for row in rows] == [ids[2], ids[1]]  # newest first, only app, only `last`
    assert all(row["db"] == "app" and row["taken_at (UTC)"].endswith("Z") for row in rows)
    arts = artifacts_of(state.state_details.flow_run_id)
    assert sorted(a.key for a in arts) == ["snapshots-app-summary", "snapshots-app-table"]
    summary = next(a for a in arts if a.type == "markdown").data
    assert "3 snapshots" in summary and f"`{ids[2]}`" in summary and "other" not in summary
    table = next(a for a in arts if a.type == "table").data
    assert ids[2] in str(table) and ids[0] not in str(table)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).name == "snapshots of app (newest 2)"

    every = snapshots_flow(repo=repo, return_state=True)
    assert sorted({row["db"] for row in every.result()}) == ["app", "other"]


def test_a_literal_key_is_refused_before_any_work(tmp_path: Path) -> None:
    state = snapshots_flow(repo=str(tmp_path / "none"), key="a-literal-passphrase", return_state=True)
    assert state.is_failed()
    assert "a-literal-passphrase" not in (state.message or "")
