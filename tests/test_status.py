"""Backup health: the seed's metrics from snapshots, backup records and drill records; the alerts;
Prometheus text; webhooks received by a local HTTP server."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dbre.cli import app
from dbre.metrics import compute_status, prometheus_text, record_backup, rpo_attainment
from dbre.policy import parse_policy
from dbre.repository.backup import backup
from dbre.repository.manifest import iso, new_snapshot_id, now_utc
from dbre.repository.repo import Repository
from dbre.sources import open_source
from tests.test_validate import make_shop


def policy_for(repo: Path, **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "repositories": {"primary": str(repo)},
        "databases": [{"name": "shop", "source": "/srv/shop.db", "rpo": "90m", "rto": "10m"}],
        "retention": {"keep_last": 10, "keep_hourly": 48},
        "schedules": {"backup_nightly": {"cron": "30 1 * * *", "enabled": False}},
    }
    data.update(over)
    return data


@pytest.fixture
def history(tmp_path: Path) -> dict[str, Any]:
    """A repository whose shop database was backed up every hour for 47 hours, up to now."""
    src = make_shop(tmp_path / "shop.db", customers=50, orders=100)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    real = backup(repo, open_source(str(src)), "shop").manifest
    now = now_utc()
    for k in range(1, 48):
        fake = dataclasses.replace(real, id=new_snapshot_id(), taken_at=iso(now - timedelta(hours=k)),
                                   stats={**real.stats, "bytes_added": 10_000})
        repo.write_manifest(fake)
    repo.put_record("drills", "shop", {"started_at": iso(now - timedelta(days=10)), "passed": True, "rto_met": True,
                                       "rto_seconds": 12.5, "rpo_seconds": 30.0, "failures": []})
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(policy_for(tmp_path / "repo")))
    return {"repo": repo, "policy": parse_policy(policy_for(tmp_path / "repo")), "policy_file": path, "now": now,
            "dir": tmp_path}


def _forget(repo: Repository, hours: range, now: datetime) -> Repository:
    """Delete the snapshots taken ``hours`` ago; returns the repository opened afresh."""
    for m in repo.snapshots("shop"):
        age = (now - m.time).total_seconds() / 3600
        if any(abs(age - h) < 0.01 for h in hours):
            repo.store.delete(f"snapshots/shop/{m.id}")
    return Repository.open(repo.url)


def test_a_healthy_database_has_no_alerts(history: dict[str, Any]) -> None:
    st = compute_status(history["repo"], policy=history["policy"], now=history["now"] + timedelta(minutes=1))
    assert st.ok, [a.message for a in st.all_alerts]
    (d,) = st.databases
    assert d.backup_success_basis == "schedule" and d.backup_success_rate == 1.0 and d.backups_expected >= 40
    assert d.rpo_attainment == 1.0 and d.rto_attainment == 1.0
    assert 9.9 < (d.days_since_successful_drill or 0) < 10.1
    assert d.snapshots == 48 and st.storage_exact and st.storage_bytes > 0
    assert d.added_bytes_per_day and d.added_bytes_per_day > 10_000 * 47 / 7 * 0.99


def test_missed_backups_lower_the_rate_and_a_late_one_is_a_delay(history: dict[str, Any]) -> None:
    now = history["now"]
    repo = _forget(history["repo"], range(10, 14), now)
    st = compute_status(repo, policy=history["policy"], now=now + timedelta(hours=3))
    (d,) = st.databases
    assert d.backup_success_rate is not None and d.backup_success_rate < 0.99 and d.backups_failed
    assert d.rpo_attainment is not None and 0.8 < d.rpo_attainment < 0.99
    events = {(a.event, a.severity) for a in st.all_alerts}
    assert events == {("backup_failure", "warning"), ("backup_delay", "critical")}
    delay = next(a for a in st.all_alerts if a.event == "backup_delay")
    assert "over the RPO of 90 min" in delay.message


def test_backup_records_are_the_success_rate_when_present(history: dict[str, Any]) -> None:
    repo, now = history["repo"], history["now"]
    for k in range(5, 0, -1):
        record_backup(repo, "shop", ok=True, started_at=now - timedelta(hours=k), seconds=1.0, snapshot="x")
    record_backup(repo, "shop", ok=False, started_at=now - timedelta(minutes=5), error="disk full on the source")
    (d,) = compute_status(repo, policy=history["policy"], now=now).databases
    assert d.backup_success_basis == "records" and d.backups_expected == 6 and d.backups_failed == 1
    assert d.backup_success_rate == pytest.approx(5 / 6, abs=1e-3)
    (alert,) = d.alerts
    assert alert.event == "backup_failure" and alert.severity == "critical" and "disk full" in alert.message


def test_missed_and_failed_drills(history: dict[str, Any]) -> None:
    repo, now = history["repo"], history["now"]
    (d,) = compute_status(repo, policy=history["policy"], now=now + timedelta(days=85)).databases
    assert any(a.event == "drill_missed" and "no drill has passed for 95 days" in a.message for a in d.alerts)
    repo.put_record("drills", "shop", {"started_at": iso(now), "passed": False, "rto_met": False,
                                       "failures": ["checksum on orders: content differs"]})
    (d,) = compute_status(repo, policy=history["policy"], now=now + timedelta(minutes=1)).databases
    (alert,) = d.alerts
    assert alert.event == "drill_failure" and "checksum on orders" in alert.message
    assert d.rto_attainment == 0.5 and d.last_drill_passed is False


def test_a_database_never_drilled_warns_after_90_days(tmp_path: Path) -> None:
    src = make_shop(tmp_path / "shop.db", customers=20, orders=20)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, open_source(str(src)), "shop")
    (d,) = compute_status(repo, now=now_utc() + timedelta(days=30)).databases
    assert d.ok, "no policy: no RPO to miss, and a young database needs no drill yet"
    (d,) = compute_status(repo, now=now_utc() + timedelta(days=91)).databases
    assert [a.event for a in d.alerts] == ["drill_missed"] and "no drill has ever passed" in d.alerts[0].message


def test_storage_over_the_quota_threshold(history: dict[str, Any]) -> None:
    st = compute_status(history["repo"], policy=history["policy"], now=history["now"],
                        quota_bytes=int(compute_status(history["repo"]).storage_bytes * 1.1), storage_threshold=0.8)
    (alert,) = st.all_alerts
    assert alert.event == "storage_capacity" and alert.severity == "warning" and "of its" in alert.message
    assert st.days_until_quota is not None


def test_rpo_attainment_counts_late_time() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    times = [t0, t0 + timedelta(hours=1), t0 + timedelta(hours=4)]  # a 3 h gap: 2 h over a 1 h RPO
    assert rpo_attainment(times, 3600, t0, t0 + timedelta(hours=5)) == pytest.approx(1 - 2 / 5)
    assert rpo_attainment(times, 3 * 3600, t0, t0 + timedelta(hours=5)) == 1.0


def test_prometheus_text_is_valid(history: dict[str, Any]) -> None:
    text = prometheus_text(compute_status(history["repo"], policy=history["policy"], quota_bytes=10**12))
    sample = re.compile(r'^[a-z_]+\{([a-z_]+="[^"]*",?)*\} -?[0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert re.search(r'^dbre_backup_success_ratio\{repository="[^"]+",db="shop"\} 1$', text, re.M)
    assert "dbre_rpo_target_seconds" in text and "dbre_repository_quota_bytes" in text


# -- the CLI, with a webhook receiver ----------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[dict[str, Any]]:
    """A local HTTP server on a thread that records every POSTed JSON body."""
    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            got.append({"path": self.path, "body": json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}", "got": got}
    finally:
        server.shutdown()
        server.server_close()


def test_status_cli_healthy_writes_prometheus(history: dict[str, Any], receiver: dict[str, Any]) -> None:
    prom = history["dir"] / "dbre.prom"
    result = CliRunner().invoke(app, ["status", "--repo", str(history["repo"].url), "--policy",
                                      str(history["policy_file"]), "--prom", str(prom), "--webhook",
                                      receiver["url"] + "/hook", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] and out["databases"][0]["backup_success_rate"] == 1.0 and out["notified"] == []
    assert "dbre_rpo_attainment_ratio" in prom.read_text()
    assert receiver["got"] == [], "no alert, no notification"


def test_status_cli_alerts_exit_1_and_notify(history: dict[str, Any], receiver: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    repo = history["repo"]
    record_backup(repo, "shop", ok=False, started_at=now_utc(), error="source unreachable")
    monkeypatch.setenv("TEST_DBRE_HOOK", receiver["url"] + "/oncall")
    pol = policy_for(history["dir"] / "repo", alerts=[
        {"name": "oncall", "kind": "webhook", "url": "env:TEST_DBRE_HOOK", "events": ["backup_failure"]},
        {"name": "storage", "kind": "webhook", "url": "env:TEST_DBRE_HOOK", "events": ["storage_capacity"]}])
    history["policy_file"].write_text(json.dumps(pol))
    result = CliRunner().invoke(app, ["status", "--repo", repo.url, "--policy", str(history["policy_file"]),
                                      "--webhook", receiver["url"] + "/all"])
    assert result.exit_code == 1
    assert "ALERT backup_failure (critical): shop: the last backup" in result.stderr
    assert "source unreachable" in result.stderr and "notified: --webhook, oncall" in result.stdout
    paths = [g["path"] for g in receiver["got"]]
    assert paths == ["/all", "/oncall"], "the storage channel has no storage alert to send"
    body = receiver["got"][1]["body"]
    assert body["source"] == "dbre" and body["severity"] == "critical"
    assert [a["event"] for a in body["alerts"]] == ["backup_failure"] and body["alerts"][0]["db"] == "shop"


def test_status_cli_names_an_unreachable_webhook(history: dict[str, Any]) -> None:
    record_backup(history["repo"], "shop", ok=False, started_at=now_utc(), error="boom")
    result = CliRunner().invoke(app, ["status", "--repo", history["repo"].url, "--webhook",
                                      "http://127.0.0.1:9/nothing-listens-here"])
    assert result.exit_code == 1
    assert "alert channel --webhook: webhook: cannot reach it" in result.stderr
    assert "nothing-listens-here" not in result.stderr, "a webhook URL may hold a token: never printed"


def test_storage_counts_no_bytes_behind_a_planted_link(tmp_path: Path) -> None:
    """A local repository's size is the bytes of its own files: a symbolic link planted in it (to a big
    file elsewhere) adds nothing, where following it counted the other file's size."""
    from dbre.metrics import store_bytes

    src = make_shop(tmp_path / "shop.db", seed=3)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, open_source(str(src)), "shop")
    before = store_bytes(repo)
    assert before is not None and before > 0
    big = tmp_path / "elsewhere.bin"
    big.write_bytes(b"\0" * (4 << 20))
    (tmp_path / "repo" / "packs" / "planted").symlink_to(big)
    assert store_bytes(repo) == before
