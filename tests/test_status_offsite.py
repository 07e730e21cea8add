"""How far the offsite copy (the fourth layer) is behind, in `dbre status` (issue 15: "how far behind the offsite
copy is"): per database, the snapshots the copy lacks, the oldest of them, and the lag of its newest; an alert when
the copy has stopped (a missing snapshot older than --offsite-max-lag) or cannot be read; Prometheus series; the
policy's offsite repositories by default; the status flow's table. Local and S3 copies."""

from tests.prefect_fixtures import artifacts_of  # noqa: I001 - sets Prefect's environment first

# isort: split

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from dbre.metrics import compute_status, prometheus_text
from dbre.repository.manifest import now_utc
from dbre.repository.repo import Repository
from flows.status import status_flow
from tests.dbfactory import change_rows, cli, make_db


@pytest.fixture(params=["local", "s3"])
def offsite_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "offsite")
    return f"s3://{request.getfixturevalue('s3_bucket')}/offsite"


def _backup(src: Path, repo: Path) -> None:
    change_rows(src, 3, seed=int(time.time() * 1000) % 10_000)
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0


def test_status_names_how_far_the_offsite_copy_is_behind(tmp_path: Path, offsite_url: str) -> None:
    src, repo = make_db(tmp_path / "src.db", mb=0.3), tmp_path / "repo"
    for _ in range(2):
        _backup(src, repo)
    assert cli("copy", "--repo", repo, "--to", offsite_url).returncode == 0
    r = cli("status", "--repo", repo, "--offsite", offsite_url, "--json")
    assert r.returncode == 0, r
    (off,) = json.loads(r.stdout)["databases"][0]["offsite"]
    assert (off["repository"], off["snapshots"], off["missing_snapshots"], off["behind_seconds"]) == \
        (offsite_url, 2, 0, 0.0)
    assert f"offsite: app: {offsite_url}: current" in cli("status", "--repo", repo, "--offsite", offsite_url).stdout

    for _ in range(3):  # the copy stops; three more snapshots
        _backup(src, repo)
    ours = Repository.open(str(repo)).snapshots("app")
    r = cli("status", "--repo", repo, "--offsite", offsite_url, "--json")
    assert r.returncode == 0, r  # behind, but not for longer than a day: no alert yet
    (off,) = json.loads(r.stdout)["databases"][0]["offsite"]
    assert off["missing_snapshots"] == 3 and off["oldest_missing_at"] == ours[2].taken_at
    assert off["behind_seconds"] == pytest.approx((ours[-1].time - ours[1].time).total_seconds(), abs=0.01)
    # a day later by the clock: the copy has stopped
    later = compute_status(Repository.open(str(repo)), now=now_utc() + timedelta(days=2),
                           offsite=[(offsite_url, Repository.open(offsite_url))])
    (alert,) = [a for a in later.all_alerts if a.event.startswith("offsite")]
    assert alert.event == "offsite_behind" and alert.severity == "warning" and "misses 3 snapshots" in alert.message
    assert f"dbre copy --repo {repo} --to {offsite_url}" in alert.message
    prom = prometheus_text(later)
    assert f'dbre_offsite_missing_snapshots{{repository="{repo}",db="app",offsite="{offsite_url}"}} 3' in prom
    assert "dbre_offsite_behind_seconds{" in prom
    time.sleep(max(0.0, ours[2].time.timestamp() + 1.2 - time.time()))
    r = cli("status", "--repo", repo, "--offsite", offsite_url, "--offsite-max-lag", "1s")
    assert r.returncode == 1 and "ALERT offsite_behind (warning)" in r.stderr, r
    assert "3 snapshots behind" in r.stdout

    assert cli("copy", "--repo", repo, "--to", offsite_url).returncode == 0  # caught up
    r = cli("status", "--repo", repo, "--offsite", offsite_url, "--offsite-max-lag", "1s", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["databases"][0]["offsite"][0]["missing_snapshots"] == 0


def test_an_empty_or_unreadable_offsite_copy_is_a_critical_alert_not_a_failed_command(tmp_path: Path) -> None:
    src, repo = make_db(tmp_path / "src.db", mb=0.3), tmp_path / "repo"
    _backup(src, repo)
    (tmp_path / "offsite").mkdir()
    r = cli("status", "--repo", repo, "--offsite", tmp_path / "nowhere", "--offsite-max-lag", "1s", "--json")
    assert r.returncode == 1, r
    body = json.loads(r.stdout)
    (off,) = body["databases"][0]["offsite"]
    assert off["error"] and "no repository" in off["error"]
    assert [a["event"] for a in body["alerts"]] == ["offsite_unreadable"]
    # a copy of another database only: it holds none of this one
    other = make_db(tmp_path / "other.db", mb=0.2)
    assert cli("backup", other, "--repo", tmp_path / "r2", "--db", "other").returncode == 0
    os.environ.pop("DBRE_POLICY", None)
    time.sleep(1.2)
    r = cli("status", "--repo", repo, "--offsite", tmp_path / "r2", "--offsite-max-lag", "1s")
    assert r.returncode == 1 and "ALERT offsite_behind (critical)" in r.stderr and "holds no snapshot" in r.stderr
    r = cli("status", "--repo", repo, "--offsite-max-lag", "soon")
    assert r.returncode == 2 and "--offsite-max-lag" in r.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_the_policy_offsite_is_compared_by_default_in_the_cli_and_the_status_flow(tmp_path: Path) -> None:
    src, repo, offsite = make_db(tmp_path / "src.db", mb=0.3), tmp_path / "repo", tmp_path / "offsite"
    _backup(src, repo)
    assert cli("copy", "--repo", repo, "--to", offsite).returncode == 0
    _backup(src, repo)
    policy = tmp_path / "dbre.yaml"
    policy.write_text(yaml.safe_dump({
        "repositories": {"primary": str(repo), "offsite": [str(offsite)]},
        "databases": [{"name": "app", "source": str(src), "rpo": "1d", "rto": "1h"}],
        "retention": {"keep_last": 10}}))
    r = cli("status", "--policy", policy, "--repo", repo)
    assert f"offsite: app: {offsite}: 1 snapshot behind" in r.stdout, r
    state = status_flow(policy=str(policy), return_state=True)
    table = next(a for a in artifacts_of(state.state_details.flow_run_id) if a.key and "table" in a.key)
    assert f"{offsite}: 1 behind" in str(table.data)
