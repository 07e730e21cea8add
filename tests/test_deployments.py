"""deployments/prefect.yaml and serve.py: every entrypoint imports, schedules carry time zones and match the
example policy, parameters exist on their flows, and serve.py builds the same deployments."""

from tests.prefect_fixtures import wait_for  # noqa: F401, I001 - sets Prefect's environment first

# isort: split

import re
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow

from dbre.policy import WORKFLOWS, load_policy
from deployments.serve import PREFECT_FILE, build_deployments, deployment_specs, load_flow

ROOT = Path(__file__).resolve().parents[1]
CONFIG: dict[str, Any] = yaml.safe_load(PREFECT_FILE.read_text())
SPECS = deployment_specs()
SCHEDULED = {"backup-hourly", "backup-nightly", "verify-weekly", "drill-monthly", "report-quarterly", "status-hourly"}


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_entrypoint_imports_and_names_a_flow(spec: dict[str, Any]) -> None:
    path, _, name = spec["entrypoint"].partition(":")
    assert re.fullmatch(r"flows/\w+\.py", path) and (ROOT / path).is_file()
    flow = load_flow(spec["entrypoint"])
    assert isinstance(flow, Flow) and flow.name.startswith("dbre-")
    assert flow.description, "the UI shows the flow's docstring"
    unknown = set(spec.get("parameters") or {}) - set(flow.parameters.properties)
    assert not unknown, f"parameters the flow does not take: {unknown}"
    assert spec["work_pool"] == CONFIG["definitions"]["work_pools"]["dbre_pool"]  # the shared anchor
    assert spec.get("description")


def test_every_flow_module_is_deployed() -> None:
    helpers = {"__init__.py", "common.py", "references.py", "names.py"}  # (no flow of their own)
    modules = {p.name for p in (ROOT / "flows").glob("*.py")} - helpers
    assert modules == {s["entrypoint"].split(":")[0].removeprefix("flows/") for s in SPECS}


def test_schedules_have_time_zones_and_restore_has_none() -> None:
    by_name = {s["name"]: s for s in SPECS}
    assert {n for n, s in by_name.items() if s.get("schedules")} == SCHEDULED
    for name in SCHEDULED:
        (sched,) = by_name[name]["schedules"]
        zoneinfo.ZoneInfo(sched["timezone"])
        assert len(sched["cron"].split()) == 5
        assert by_name[name]["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert by_name["drill-monthly"]["schedules"][0]["cron"] == "0 3 1 * *"
    assert by_name["restore"]["schedules"] == []
    assert by_name["backup-hourly"]["parameters"] == {"copy_offsite": False, "retention": False}
    assert by_name["backup-nightly"]["parameters"] == {"copy_offsite": True, "retention": True}


def test_shared_schedules_include_the_monthly_drill_and_quarterly_report() -> None:
    defined = CONFIG["definitions"]["schedules"]
    assert defined["monthly_drill"] == {"cron": "0 3 1 * *", "timezone": "Europe/Berlin"}
    assert defined["quarterly_report"]["cron"] == "0 6 1 1,4,7,10 *"
    assert defined["hourly_backup"]["cron"] == "0 * * * *"
    assert defined["quarterly_report"]["timezone"] == "UTC"
    assert all("timezone" in s for s in defined.values())


def test_schedules_match_the_example_policy() -> None:
    policy = dict(load_policy(ROOT / "docs" / "policy.example.yaml").schedules.items())
    defined = CONFIG["definitions"]["schedules"]
    pairs = {"backup_hourly": "hourly_backup", "backup_nightly": "nightly_backup", "verify_weekly": "weekly_verify",
             "drill_monthly": "monthly_drill", "report_quarterly": "quarterly_report"}
    assert set(pairs) == set(WORKFLOWS)
    for workflow, anchor in pairs.items():
        assert (policy[workflow].cron, policy[workflow].timezone) == (defined[anchor]["cron"],
                                                                      defined[anchor]["timezone"]), workflow


def test_serve_builds_every_deployment(tmp_path: Path) -> None:
    built = {d.name: d for d in build_deployments()}
    assert set(built) == {s["name"] for s in SPECS}
    hourly = built["backup-hourly"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in hourly.schedules] == [("0 * * * *", "Europe/Berlin")]
    assert hourly.parameters == {"copy_offsite": False, "retention": False}
    assert built["restore"].schedules == []
    schema = load_flow("flows/restore.py:restore_flow").parameters  # what the UI draws the form from
    assert schema.required == ["request"] and "RestoreRequest" in schema.definitions

    data = yaml.safe_load((ROOT / "docs" / "policy.example.yaml").read_text())
    data["schedules"] = {"timezone": "America/New_York", "backup_hourly": {"cron": "15 * * * *"},
                         "verify_weekly": {"cron": "0 4 * * 0", "enabled": False}}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(data))
    built = {d.name: d for d in build_deployments(policy_path=str(policy))}
    assert [(s.schedule.cron, s.schedule.timezone) for s in built["backup-hourly"].schedules] == [
        ("15 * * * *", "America/New_York")]
    assert built["verify-weekly"].schedules == []


def test_makefile_has_a_serve_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and "deployments/serve.py --start-server" in makefile
    assert re.search(r"^\.PHONY:.*\bserve\b", makefile, re.M)
