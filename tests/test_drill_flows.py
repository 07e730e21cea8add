"""The drill and status flows under a real (temporary) Prefect API: artifacts, failed runs with reasons,
notifications, under the session's one ``prefect_test_harness``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from dbre.metrics import record_backup
from dbre.repository.backup import backup
from dbre.repository.manifest import now_utc
from dbre.repository.repo import Repository
from dbre.sources import open_source
from dbre.validate.profile import profile_database, write_suites
from tests.test_status import receiver  # noqa: F401 - the webhook receiver fixture
from tests.test_validate import make_shop


@pytest.fixture(scope="module")
def prefect_api(prefect_harness: None) -> Iterator[None]:
    """The session's one Prefect harness (tests/prefect_fixtures.py, through conftest)."""
    yield


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    src = make_shop(tmp_path / "shop.db", customers=300, orders=1500)
    repo = tmp_path / "repo"
    backup(Repository.open_or_init(str(repo)), open_source(str(src)), "shop")
    with apsw.Connection(str(src)) as conn:
        write_suites(profile_database(conn, "shop"), tmp_path / "expectations" / "shop")
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({
        "version": 1, "repositories": {"primary": str(repo)},
        "databases": [{"name": "shop", "source": str(src), "rpo": "1h", "rto": "10m",
                       "expectations": str(tmp_path / "expectations")}],
        "retention": {"keep_last": 5}, "drills": {"scratch_dir": str(tmp_path / "scratch")}}))
    return {"src": src, "repo": repo, "policy": str(policy), "reports": tmp_path / "reports", "dir": tmp_path}


def _artifacts(key: str) -> list[Any]:
    """The artifacts with this key, newest first: other tests on the session's harness publish under it too."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return list(client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          sort=ArtifactSort.CREATED_DESC))


def test_drill_flow_passes_and_publishes(prefect_api: None, site: dict[str, Any]) -> None:
    from flows.drill import drill_flow

    (rec,) = drill_flow(policy=site["policy"], report_dir=str(site["reports"]))
    assert rec["passed"] and rec["rto_target_seconds"] == 600 and rec["expectations"]["failed"] == 0
    assert Path(rec["report"]).exists() and (Path(rec["report"]).parent / "data-docs" / "index.html").exists()
    assert Repository.open(str(site["repo"])).records("drills", "shop")[-1]["record_id"] == rec["record_id"]
    summary = _artifacts("drill-summary")
    assert summary and "1 of 1 databases restored, validated" in summary[0].data
    assert list((site["dir"] / "scratch").iterdir()) == []


def test_drill_flow_fails_naming_table_and_column(prefect_api: None, site: dict[str, Any]) -> None:
    from flows.common import RunFailed
    from flows.drill import drill_flow

    conn = sqlite3.connect(site["src"])
    conn.execute("UPDATE customers SET country = NULL WHERE id % 3 = 0")
    conn.commit()
    conn.close()
    backup(Repository.open(str(site["repo"])), open_source(str(site["src"])), "shop")
    with pytest.raises(RunFailed, match=r"shop: gx\.expect_column_values_to_not_be_null on customers\.country"):
        drill_flow(policy=site["policy"])


def test_status_flow_fails_on_alerts_and_notifies(prefect_api: None, site: dict[str, Any],
                                                  receiver: dict[str, Any]) -> None:  # noqa: F811
    from flows.common import RunFailed
    from flows.status import status_flow

    prom = site["dir"] / "textfile" / "dbre.prom"
    healthy = status_flow(policy=site["policy"], prom=str(prom), webhook=receiver["url"])
    assert healthy["ok"] and prom.exists() and receiver["got"] == []
    record_backup(Repository.open(str(site["repo"])), "shop", ok=False, started_at=now_utc(), error="no space left")
    with pytest.raises(RunFailed, match="backup_failure: shop: the last backup .* failed: no space left"):
        status_flow(policy=site["policy"], webhook=receiver["url"] + "/x")
    (got,) = receiver["got"]
    assert got["path"] == "/x" and got["body"]["alerts"][0]["event"] == "backup_failure"


def test_status_flow_notifies_through_a_prefect_block(prefect_api: None, site: dict[str, Any],
                                                      receiver: dict[str, Any]) -> None:  # noqa: F811
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows.common import RunFailed
    from flows.status import status_flow

    CustomWebhookNotificationBlock(name="ops", url=receiver["url"] + "/block", allow_private_urls=True,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("ops-hook")
    policy = json.loads(Path(site["policy"]).read_text())
    policy["alerts"] = [{"name": "ops", "kind": "prefect-block", "block": "ops-hook", "events": ["backup_failure"]}]
    Path(site["policy"]).write_text(json.dumps(policy))
    record_backup(Repository.open(str(site["repo"])), "shop", ok=False, started_at=now_utc(), error="quota exceeded")
    with pytest.raises(RunFailed, match="backup_failure"):
        status_flow(policy=site["policy"])
    (got,) = receiver["got"]
    assert got["path"] == "/block" and "backup_failure: shop: the last backup" in got["body"]["body"]


def test_drill_flow_refuses_a_report_folder_it_cannot_write_before_any_restore(prefect_api: None,
                                                                              site: dict[str, Any]) -> None:
    """The flow checks its report folder first (here under a file: as root no mode bit stops a
    write): one line naming it and the parameter, and no drill ran (no record, no scratch)."""
    from dbre.errors import UsageError
    from flows.drill import drill_flow

    blocker = site["dir"] / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(UsageError, match=r"report folder .*not-a-folder/reports cannot be written.*report_dir"):
        drill_flow(policy=site["policy"], report_dir=str(blocker / "reports"))
    assert Repository.open(str(site["repo"])).records("drills", "shop") == []
    assert not (site["dir"] / "scratch").exists() or list((site["dir"] / "scratch").iterdir()) == []


def test_drill_flow_keeps_its_verdict_when_the_report_fails_to_write(prefect_api: None, site: dict[str, Any],
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The disk fills while the drill runs: writing its report fails after the drill (the folder was
    writable when checked). The run still completes by the drill's verdict (passed), with one warning
    naming the folder and the cause, and the drill's record stays in the repository."""
    import errno
    import logging

    import dbre.report.drill as report_mod
    from flows.drill import drill_flow

    def full(*args: object, **kwargs: object) -> dict[str, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_mod, "write_drill_report", full)
    with caplog.at_level(logging.WARNING):
        state = drill_flow(policy=site["policy"], report_dir=str(site["reports"]), data_docs=False,
                           return_state=True)
    assert state.is_completed(), state.message
    (rec,) = state.result()
    assert rec["passed"] and "report" not in rec
    assert any("drill report of shop could not be written" in m and "No space left on device" in m
               for m in caplog.messages), caplog.messages
    assert len(Repository.open(str(site["repo"])).records("drills", "shop")) == 1
