"""The requirements-report flow under the session's Prefect harness: documents written, artifacts published."""

from tests.prefect_fixtures import artifacts_of, prefect_harness  # noqa: F401, I001

# isort: split

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import apsw
import pytest

from dbre.repository.repo import Repository
from flows.requirements import requirements_report_flow
from tasks.report import analyze_requirements, cli_commands, write_requirements_documents
from tests.test_requirements import _backup_at

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _small_history(root: Path) -> tuple[Path, Path]:
    """A two-table database with eight weekly snapshots, and a policy naming it."""
    db = root / "app.db"
    conn = apsw.Connection(str(db))
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT);"
                 "CREATE TABLE posts(id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id), body TEXT)")
    repo = Repository.open_or_init(str(root / "repo"))
    start = datetime.now(UTC) - timedelta(days=49)
    for week in range(8):
        with conn:
            conn.executemany("INSERT INTO users(email) VALUES (?)", [(f"u{week}-{i}@example.com",) for i in range(20)])
            conn.executemany("INSERT INTO posts(user_id, body) VALUES (?, ?)", [(1, "hello " * 20)] * 50)
        _backup_at(repo, db, "app", start + timedelta(days=7 * week))
    conn.close()
    policy = root / "dbre.yaml"
    policy.write_text(f"""
version: 1
repositories: {{primary: {root / 'repo'}}}
databases:
  - {{name: app, source: {db}, tier: critical, rpo: 1h, rto: 15m}}
retention: {{keep_daily: 7, keep_weekly: 4}}
contacts:
  - {{role: DBA, name: Dana Reyes, reach: dana@example.com}}
""")
    return db, policy


def test_flow_writes_the_documents_and_publishes_them(tmp_path: Path) -> None:
    _, policy = _small_history(tmp_path)
    state = requirements_report_flow(out_dir=str(tmp_path / "reports"), policy=str(policy), restore_throughput=5e7,
                                     expectations=None, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    out = Path(result["out_dir"])
    assert out.parent == tmp_path / "reports" and out.name == datetime.now(UTC).strftime("%Y-%m-%d")
    for name in ("report.html", "report.md", "backup-policy.md", "recovery-runbook.md", "dr-plan.md"):
        assert (out / name).stat().st_size > 1000, name
    assert result["targets"]["not met"] >= 1  # weekly snapshots against a 1 h RPO
    arts = artifacts_of(state.state_details.flow_run_id)
    keys = {a.key for a in arts}
    assert {"requirements-summary", "requirements-table"} <= keys
    assert not [a for a in arts if "-link-" in (a.key or "")]  # the documents are named in the summary
    summary = next(a for a in arts if a.key == "requirements-summary").data
    assert all(f"`{out / name}` on host" in summary for name in ("report.html", "recovery-runbook.md", "dr-plan.md"))
    assert "RPO" in summary and "take a snapshot every" in summary
    table = json.loads(next(a for a in arts if a.key == "requirements-table").data)
    assert {r["target"] for r in table} >= {"RPO", "RTO", "drill frequency"}
    runbook = (out / "recovery-runbook.md").read_text()
    assert f"dbre drill --repo {tmp_path / 'repo'} --db app --policy {policy}" in (out / "report.md").read_text()
    assert "| DBA | Dana Reyes | dana@example.com |" in runbook


def test_tasks_run_through_fn(tmp_path: Path) -> None:
    _, policy = _small_history(tmp_path)
    report = analyze_requirements.fn(str(tmp_path / "repo"), policy=str(policy), expectations=None,
                                     prices={"storage_gb_month": 0.1}, restore_throughput=5e7)
    assert [d.name for d in report.databases] == ["app"] and report.prices.storage_gb_month == 0.1
    assert report.databases[0].tables[1].rows == 160  # users: 8 weeks x 20, counted on the live file
    paths = write_requirements_documents.fn(report, str(tmp_path / "docs"), str(policy))
    assert Path(paths["report.html"]).exists() and Path(paths["charts/growth-app.png"]).exists()
    assert {"backup", "restore", "drill", "report", "expectations"} <= cli_commands()
