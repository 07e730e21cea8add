"""Findings of session 16's bug hunt on the Prefect side (a data engineer filling forms in the UI, someone
reading the reports), each a test that failed before its fix, run under Prefect's harness: a drill stopped
by one database without snapshots, snapshots and retention runs that completed on a typo, backup and fleet
runs that refused a typo with no summary, status parameters that failed as bare Python errors, the
requirements report blaming the RTO for a missed RPO, and a cost table that ignored the schedule."""

from tests.prefect_fixtures import artifacts_of  # noqa: I001 - sets Prefect's environment first

# isort: split

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.backup import backup_flow
from flows.drill import drill_flow
from flows.fleet import fleet_backup_flow
from flows.retention import retention_flow
from flows.snapshots import snapshots_flow
from flows.status import status_flow
from tests.dbfactory import cli, make_db

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _db(path: Path) -> Path:
    return make_db(path, mb=0.05)


def _policy(tmp_path: Path, names: list[str], **extra: Any) -> Path:
    """A policy listing ``names`` (sources tmp_path/NAME.db), the repository tmp_path/repo."""
    data: dict[str, Any] = {
        "repositories": {"primary": str(tmp_path / "repo")},
        "databases": [{"name": n, "source": str(tmp_path / f"{n}.db"), "rpo": "1h", "rto": "15m"} for n in names],
        "reports": {"dir": str(tmp_path / "reports")},
        "retention": {"keep_last": 5},
        "drills": {"scratch_dir": str(tmp_path / "scratch")},
        **extra,
    }
    path = tmp_path / "dbre.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _keys(state: Any) -> list[str]:
    return [a.key or "" for a in artifacts_of(state.state_details.flow_run_id)]


def test_one_database_without_snapshots_does_not_stop_the_drill(tmp_path: Path) -> None:
    """Before: the run failed at the first database (just added, never backed up): no other was drilled."""
    _db(tmp_path / "app.db")
    pol = _policy(tmp_path, ["newdb", "app"])
    assert cli("backup", tmp_path / "app.db", "--repo", tmp_path / "repo", "--db", "app").returncode == 0
    state = drill_flow(policy=str(pol), return_state=True)
    assert state.is_failed() and "newdb: not started: no snapshots of database 'newdb'" in (state.message or "")
    assert "1 of 2 drills failed" in (state.message or "")
    arts = artifacts_of(state.state_details.flow_run_id)
    table = next(json.loads(a.data) for a in arts if a.type == "table")
    assert {r["db"]: r["result"] for r in table} == {"newdb": "FAILED", "app": "passed"}
    summary = next(a.data for a in arts if (a.key or "").endswith("-summary"))
    assert "newdb: FAILED, not started" in summary
    assert list((tmp_path / "repo" / "records" / "drills" / "app").iterdir())  # app was drilled and recorded


def test_a_scratch_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    _db(tmp_path / "app.db")
    assert cli("backup", tmp_path / "app.db", "--repo", tmp_path / "repo", "--db", "app").returncode == 0
    (tmp_path / "afile").write_text("x")
    result = cli("drill", "--repo", tmp_path / "repo", "--db", "app", "--scratch-dir", tmp_path / "afile" / "s",
                 "--report-dir", tmp_path / "reports")
    assert result.returncode == 2, result
    assert "drill scratch folder" in result.stderr and "--scratch-dir" in result.stderr, result
    assert "unexpected error" not in result.stderr


@pytest.mark.parametrize("flow", ["snapshots", "retention"])
def test_a_typo_in_a_database_name_fails_naming_the_known_ones(tmp_path: Path, flow: str) -> None:
    """Before: both runs ended Completed having done nothing ("No snapshots of apq", "0 forgotten"), and
    retention without dry_run then pruned the whole repository."""
    _db(tmp_path / "app.db")
    pol = _policy(tmp_path, ["app"])
    assert cli("backup", tmp_path / "app.db", "--repo", tmp_path / "repo", "--db", "app").returncode == 0
    packs = sorted((tmp_path / "repo" / "packs").rglob("*"))
    if flow == "snapshots":
        state = snapshots_flow(database="apq", policy=str(pol), return_state=True)
    else:
        state = retention_flow(databases=["apq"], policy=str(pol), keep_last=1, return_state=True)
    assert state.is_failed(), state
    assert "no database 'apq'" in (state.message or "") and "choose one of app" in (state.message or "")
    assert sorted((tmp_path / "repo" / "packs").rglob("*")) == packs
    # a database the policy lists but never backed up is no typo
    pol = _policy(tmp_path, ["app", "later"])
    ok = (snapshots_flow(database="later", policy=str(pol), return_state=True) if flow == "snapshots"
          else retention_flow(databases=["later"], policy=str(pol), keep_last=1, return_state=True))
    assert ok.is_completed(), ok


@pytest.mark.parametrize("flow", ["backup", "fleet"])
def test_a_typo_in_a_backup_form_is_one_line_and_a_summary(tmp_path: Path, flow: str) -> None:
    """Before: the run failed with tracebacks in its log and published no summary."""
    _db(tmp_path / "app.db")
    pol = _policy(tmp_path, ["app"])
    state = (backup_flow("apq", policy=str(pol), return_state=True) if flow == "backup"
             else fleet_backup_flow(databases=["apq"], policy=str(pol), return_state=True))
    assert state.is_failed() and "'apq' is not in the policy" in (state.message or ""), state
    arts = artifacts_of(state.state_details.flow_run_id)
    summary = next(a.data for a in arts if (a.key or "").endswith("-summary"))
    assert "'apq' is not in the policy" in summary and "known databases: app" in summary
    assert not (tmp_path / "repo").exists()


def test_status_parameters_that_cannot_be_used_fail_in_one_line(tmp_path: Path) -> None:
    _db(tmp_path / "app.db")
    assert cli("backup", tmp_path / "app.db", "--repo", tmp_path / "repo", "--db", "app").returncode == 0
    repo = str(tmp_path / "repo")
    state = status_flow(repo=repo, window="30 days", return_state=True)
    assert state.is_failed() and "status: window" in (state.message or ""), state
    (tmp_path / "afile").write_text("x")
    state = status_flow(repo=repo, prom=str(tmp_path / "afile" / "m.prom"), return_state=True)
    assert state.is_failed() and "is a file, not a folder" in (state.message or ""), state
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    state = status_flow(repo=repo, prom=str(tmp_path / "new" / "m.prom"), return_state=True)
    assert state.is_completed() and "dbre_" in (tmp_path / "new" / "m.prom").read_text()


def test_a_drill_that_missed_only_its_rpo_leaves_the_rto_met(tmp_path: Path) -> None:
    """Before: the requirements report said RTO "not met: the last drill failed its validation" and advised
    faster restores, for a drill that restored and validated in time and missed only its RPO."""
    _db(tmp_path / "app.db")
    pol = _policy(tmp_path, ["app"])
    data = yaml.safe_load(pol.read_text())
    data["databases"][0]["rpo"] = "1s"  # the snapshot is older than that by the time the drill runs
    pol.write_text(yaml.safe_dump(data))
    assert cli("backup", tmp_path / "app.db", "--repo", tmp_path / "repo", "--db", "app").returncode == 0
    import time

    time.sleep(1.2)
    drill = cli("drill", "--repo", tmp_path / "repo", "--policy", pol, "--db", "app", "--json")
    record = json.loads(drill.stdout)
    assert record["validated"] and record["rto_met"] and not record["rpo_met"], record
    out = tmp_path / "req"
    report = cli("report", "requirements", "--policy", pol, "--out", out)
    assert report.returncode in (0, 1), report
    md = (out / "report.md").read_text()
    rto_rows = [ln for ln in md.splitlines() if "| RTO |" in ln]
    assert rto_rows and all("met" in ln and "not met" not in ln for ln in rto_rows), rto_rows
    assert "restores take" not in md  # no advice to make restores faster


def test_the_cost_table_follows_the_schedule_with_one_snapshot(tmp_path: Path) -> None:
    """Before: with one snapshot (no measured interval), "backups every 1 d (now)" whatever the schedule."""
    _db(tmp_path / "app.db")
    pol = _policy(tmp_path, ["app"], schedules={"backup_hourly": {"cron": "0 * * * *"}})
    assert cli("backup", tmp_path / "app.db", "--repo", tmp_path / "repo", "--db", "app").returncode == 0
    out = tmp_path / "req"
    report = cli("report", "requirements", "--policy", pol, "--out", out)
    assert report.returncode in (0, 1), report
    md = (out / "report.md").read_text()
    now = [ln for ln in md.splitlines() if "**(now)**" in ln]
    assert now and "every 1 h" in now[0], now


def test_the_drill_chart_judges_the_current_rpo_target() -> None:
    """Before: a target tightened from 1 h to 30 s, with drills at 12 and 37 s, read "target 30 s (far above
    every drill)": the scale was judged by the largest target in the history, not the current one."""
    from dbre.report.drill import history_chart, target_on_scale

    assert target_on_scale([12.0, 37.0], [3600.0, 30.0]) == (True, [30.0])
    assert target_on_scale([0.02, 0.03], [900.0, 900.0]) == (False, [])
    assert target_on_scale([5.0], [10.0, 3600.0]) == (False, [])
    png = history_chart([{"started_at": "2026-12-01T00:00:00Z", "rpo_seconds": 12, "rpo_target_seconds": 3600,
                          "rto_seconds": 1, "rto_target_seconds": 900, "passed": True},
                         {"started_at": "2026-12-02T00:00:00Z", "rpo_seconds": 37, "rpo_target_seconds": 30,
                          "rto_seconds": 1, "rto_target_seconds": 900, "passed": False}])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
