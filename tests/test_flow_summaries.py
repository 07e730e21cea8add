"""The summary artifact of a flow run is for the person on call: a headline and the failures with what to do,
not the table artifact's rows again as a markdown table (issue 15)."""

from tests.prefect_fixtures import artifacts_of  # noqa: I001 - sets Prefect's environment first

# isort: split

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.backup import backup_flow
from flows.fleet import fleet_backup_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _db(path: Path, rows: int) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [("x" * (i % 200),) for i in range(rows)])
    conn.commit()
    conn.close()
    return path


def _artifacts(state: Any) -> tuple[str, list[dict[str, Any]]]:
    """The run's summary (markdown) and its table artifact's rows."""
    arts = artifacts_of(state.state_details.flow_run_id)
    summary = next(a.data for a in arts if (a.key or "").endswith("-summary"))
    table = next(json.loads(a.data) for a in arts if a.type == "table")
    return summary, table


def _repeated_rows(summary: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table rows that reappear as a row of a markdown table in the summary (two or more of their values in
    the cells of one ``| ... |`` line)."""
    lines = [{c.strip() for c in ln.strip().strip("|").split("|")} for ln in summary.splitlines()
             if ln.lstrip().startswith("|")]
    return [row for row in rows
            if any(len({str(v) for v in row.values() if v not in (None, "")} & cells) >= 2 for cells in lines)]


def test_backup_summary_names_the_failed_copy_and_repeats_no_table_row(tmp_path: Path) -> None:
    src = _db(tmp_path / "shop.db", 300)
    (tmp_path / "not-a-repo").write_text("a file, not a repository")
    state = backup_flow("shop", source=str(src), repo=str(tmp_path / "repo"),
                        offsite=[str(tmp_path / "not-a-repo")], return_state=True)
    assert state.is_failed() and "1 offsite copies failed" in (state.message or "")
    summary, table = _artifacts(state)
    assert [r["step"] for r in table] == ["backup", "copy"] and table[1]["result"] != "ok"
    assert _repeated_rows(summary, table) == [], summary
    assert summary.startswith("# Backup of `shop`: 1 of 1 offsite copies FAILED")
    error = table[1]["result"]
    assert "not a repository" in error and error in summary  # the failed step's error, in the summary itself
    assert f"copy to {tmp_path / 'not-a-repo'}" in summary and "What to do:" in summary and "dbre copy" in summary
    assert f"Snapshot **{table[0]['snapshot']}** (first)" in summary


def test_fleet_summary_names_the_failed_backup_and_repeats_no_table_row(tmp_path: Path) -> None:
    sources = {"alpha": _db(tmp_path / "alpha.db", 200), "beta": _db(tmp_path / "beta.db", 400),
               "broken": tmp_path / "missing.db"}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "repositories": {"primary": str(tmp_path / "repo")},
        "databases": [{"name": n, "source": str(s), "rpo": "1h", "rto": "15m"} for n, s in sources.items()],
        "retention": {"keep_last": 2}, "fleet": {"max_concurrency": 2}}))
    state = fleet_backup_flow(policy=str(policy), concurrency_limit="", return_state=True)
    assert state.is_failed() and "1 of 3 backups failed" in (state.message or "")
    summary, table = _artifacts(state)
    assert sorted(r["db"] for r in table) == ["alpha", "beta", "broken"]
    assert _repeated_rows(summary, table) == [], summary
    assert summary.startswith("# Fleet backup: 2 of 3 databases backed up, ")
    error = next(r["error"] for r in table if r["db"] == "broken")
    assert "no such file" in error and f"- **backup of broken**: {error}" in summary
    assert "What to do:" in summary
    assert not any(r["snapshot"] and r["snapshot"] in summary for r in table)  # the snapshots: in the table only
