"""Reports readable in the Prefect UI: the drill's and the requirements report's content in the run's
markdown artifact, http links only when the reports folder is served (policy reports.base_url or
$DBRE_REPORTS_URL), never a file:// link artifact, one artifact key per flow and database, and an
absolute reports folder by default (policy reports.dir, else the worker's data dir)."""

from tests.prefect_fixtures import artifacts_of, prefect_harness  # noqa: F401, I001

# isort: split

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbre.errors import UsageError
from dbre.policy import parse_policy
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources import open_source
from flows.common import ReportSite, reports_site, truncate, where
from tests.test_requirements_flow import _small_history
from tests.test_validate import make_shop

BASE = {"version": 1, "repositories": {"primary": "/srv/repo"},
        "databases": [{"name": "app", "source": "/srv/app.db", "rpo": "1h", "rto": "15m"}],
        "retention": {"keep_last": 3}}


# --------------------------------------------------------------------------- policy and locations


def test_policy_reports_section_is_validated() -> None:
    pol = parse_policy({**BASE, "reports": {"dir": "/srv/dbre/reports/", "base_url": "https://r.example.com/dbre/"}})
    assert pol.reports.dir == "/srv/dbre/reports" and pol.reports.base_url == "https://r.example.com/dbre"
    assert parse_policy({**BASE, "reports": {"dir": "~/reports"}}).reports.dir == str(Path.home() / "reports")
    assert parse_policy(BASE).reports.dir is None
    with pytest.raises(UsageError, match=r"^policy: reports\.dir: must be an absolute path .*'reports/out'") as err:
        parse_policy({**BASE, "reports": {"dir": "reports/out"}})
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"reports\.base_url: must be an http\(s\) URL"):
        parse_policy({**BASE, "reports": {"dir": "/srv/r", "base_url": "file:///srv/r"}})
    with pytest.raises(UsageError, match=r"reports\.base_url: credentials"):
        parse_policy({**BASE, "reports": {"base_url": "https://u:p@r.example.com/"}})
    with pytest.raises(UsageError, match=r"reports\.url: is not a known field"):
        parse_policy({**BASE, "reports": {"url": "https://r.example.com"}})


def test_reports_site_env_policy_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("DBRE_REPORTS_DIR", "DBRE_REPORTS_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    default = reports_site(None)
    assert default.root == tmp_path / "data" / "dbre" / "reports" and default.base_url is None
    pol = parse_policy({**BASE, "reports": {"dir": "/srv/dbre/reports", "base_url": "https://r.example.com/dbre"}})
    site = reports_site(pol)
    assert site.root == Path("/srv/dbre/reports") and "policy" in site.origin
    assert site.url("/srv/dbre/reports/drills/a b/index.html") == "https://r.example.com/dbre/drills/a%20b/index.html"
    assert site.url("/elsewhere/index.html") is None
    monkeypatch.setenv("DBRE_REPORTS_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("DBRE_REPORTS_URL", "http://worker-1:8000/")
    env = reports_site(pol)
    assert env.root == tmp_path / "r" and env.url(tmp_path / "r" / "x.md") == "http://worker-1:8000/x.md"
    monkeypatch.setenv("DBRE_REPORTS_DIR", "relative/dir")
    with pytest.raises(UsageError, match=r"\$DBRE_REPORTS_DIR: must be an absolute path"):
        reports_site(pol)
    monkeypatch.setenv("DBRE_REPORTS_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("DBRE_REPORTS_URL", "ftp://x")
    with pytest.raises(UsageError, match=r"\$DBRE_REPORTS_URL: must be an http\(s\) URL"):
        reports_site(pol)


def test_where_links_only_what_a_browser_opens(tmp_path: Path) -> None:
    served = ReportSite(tmp_path, "https://r.example.com")
    assert where(tmp_path / "a.html", "report", served) == "[report](https://r.example.com/a.html)"
    local = where(tmp_path / "a.html", "report", ReportSite(tmp_path))
    assert local == f"report: `{tmp_path / 'a.html'}` on host `{socket.gethostname()}`"
    assert where("s3://bucket/repo", "repository") == "repository: `s3://bucket/repo`"  # text, not a link
    assert where("https://x.example/y", "y") == "[y](https://x.example/y)"
    text = "\n".join(f"line {i}" for i in range(1000))
    cut = truncate(text, 500, "/srv/r/report.md")
    assert len(cut) < 600 and cut.endswith("more characters in /srv/r/report.md.*\n") and "line 10\n" in cut


# --------------------------------------------------------------------------- flows


def _file_links(arts: list[Any]) -> list[str]:
    return [a.key or "" for a in arts if "file://" in str(a.data) or "-link" in (a.key or "")]


@pytest.mark.usefixtures("prefect_harness")
def test_drill_artifact_holds_the_report_and_http_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DBRE_REPORTS_DIR", "DBRE_REPORTS_URL"):
        monkeypatch.delenv(var, raising=False)
    from flows.drill import drill_flow

    src = make_shop(tmp_path / "shop.db", customers=50, orders=200)
    backup(Repository.open_or_init(str(tmp_path / "repo")), open_source(str(src)), "shop")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "version": 1, "repositories": {"primary": str(tmp_path / "repo")},
        "databases": [{"name": "shop", "source": str(src), "rpo": "1h", "rto": "10m"}],
        "retention": {"keep_last": 5}, "drills": {"scratch_dir": str(tmp_path / "scratch")},
        "reports": {"dir": str(tmp_path / "reports"), "base_url": "https://reports.example.com/dbre"}}))
    state = drill_flow(policy=str(policy), data_docs=False, return_state=True)  # no report_dir: the policy's
    assert state.is_completed(), state.message
    (rec,) = state.result()
    html = Path(rec["report"])
    assert html.parent.parent == tmp_path / "reports" / "drills" and html.exists()
    arts = artifacts_of(state.state_details.flow_run_id)
    assert sorted(a.key for a in arts) == ["drill-summary", "drill-table"] and _file_links(arts) == []
    summary = next(a for a in arts if a.key == "drill-summary").data
    report_md = (html.parent / "report.md").read_text()
    first_lines = [ln for ln in report_md.splitlines() if ln.strip() and "![" not in ln][:5]
    assert all(ln in summary for ln in first_lines), first_lines  # the report itself, readable in the UI
    url = f"https://reports.example.com/dbre/drills/{html.parent.name}"
    assert f"[HTML report]({url}/index.html)" in summary
    assert f"]({url}/history.png)" in summary  # the chart, from where the folder is served
    assert "1 of 1 databases" in summary and json.loads(next(a for a in arts if a.key == "drill-table").data)


@pytest.mark.usefixtures("prefect_harness")
def test_requirements_artifact_without_base_url_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DBRE_REPORTS_DIR", "DBRE_REPORTS_URL"):
        monkeypatch.delenv(var, raising=False)
    from flows.requirements import requirements_report_flow

    _, policy = _small_history(tmp_path)
    policy.write_text(policy.read_text() + f"reports: {{dir: {tmp_path / 'reports'}}}\n")
    state = requirements_report_flow(policy=str(policy), restore_throughput=5e7, expectations=None,
                                     return_state=True)  # no out_dir: the policy's reports.dir
    assert state.is_completed(), state.message
    out = Path(state.result()["out_dir"])
    from prefect import get_client
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).name == "requirements report of app to the " \
            "reports folder"
    assert out.parent == tmp_path / "reports" / "requirements" and (out / "recovery-runbook.md").exists()
    arts = artifacts_of(state.state_details.flow_run_id)
    assert sorted(a.key for a in arts) == ["requirements-summary", "requirements-table"] and _file_links(arts) == []
    summary = next(a for a in arts if a.key == "requirements-summary").data
    assert "## Recommendations" in summary and "**Targets**" in summary
    assert "| not met |" in summary and "| met |" not in summary  # met targets only in the table artifact
    table = json.loads(next(a for a in arts if a.key == "requirements-table").data)
    assert {"met", "not met"} <= {r["status"] for r in table}
    assert f"recovery runbook: `{out / 'recovery-runbook.md'}` on host `{socket.gethostname()}`" in summary
    assert "](" not in summary.split("## Recommendations")[-1]  # no link when nothing serves the folder


def test_scheduled_drill_and_report_default_to_the_reports_folder() -> None:
    """The monthly drill and quarterly report deployments set no folder: the flows then write under the
    reports folder (absolute), never a path relative to wherever the worker was started."""
    import inspect

    from deployments.serve import deployment_specs
    from flows.drill import drill_flow
    from flows.requirements import requirements_report_flow

    specs = {s["name"]: s.get("parameters") or {} for s in deployment_specs()}
    assert "report_dir" not in specs["drill-monthly"] and "out_dir" not in specs["report-quarterly"]
    assert inspect.signature(drill_flow.fn).parameters["report_dir"].default is None
    assert inspect.signature(requirements_report_flow.fn).parameters["out_dir"].default is None
