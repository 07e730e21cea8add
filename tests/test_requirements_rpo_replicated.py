"""The requirements report judges a replicated database's RPO by its replication lag (as `dbre
status` measures it), not by its snapshot interval: met while `dbre replicate` keeps up, at risk
below what replication can promise, not met once commits wait unshipped. Real writer, real replicator."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dbre.policy import load_policy
from dbre.report.requirements import analyze
from dbre.repository.repo import Repository
from tests.replication import make_source, start_replicator, start_writer, stop_replicator, wait_for_generation
from tests.test_requirements_cost import _policy


def _rpo_check(repo: Path, policy: Path, now: datetime | None = None):  # type: ignore[no-untyped-def]
    report = analyze(Repository.open(str(repo)), policy=load_policy(policy), restore_throughput=5e7,
                     expectations_dir=None, now=now)
    (check,) = [c for c in report.databases[0].checks if c.target == "RPO"]
    return check


def test_rpo_of_a_replicated_database_follows_its_lag(tmp_path: Path) -> None:
    src, repo = tmp_path / "app.db", tmp_path / "repo"
    make_source(src)
    proc = start_replicator(src, str(repo), interval="200ms")
    try:
        wait_for_generation(str(repo), proc=proc)
        assert start_writer(src, tmp_path / "log", 1.5, start_seq=200, pause=0.01, ckpt_every=0).wait(60) == 0
        time.sleep(1.0)
        # the snapshots alone (one base, no interval) could not meet a 1-minute target
        met = _rpo_check(repo, _policy(tmp_path, repo, src, "1m", replicate=True))
        assert met.status == "met" and "replicated" in met.measured, met
        risky = _rpo_check(repo, _policy(tmp_path, repo, src, "1s", replicate=True))  # under the 1.7 s p99 bound
        assert risky.status == "at risk" and "p99" in risky.reason, risky
    finally:
        code, err = stop_replicator(proc)
    assert code == 0, err
    # the replicator is gone and the application commits on: two minutes later that commit is unshipped
    with sqlite3.connect(src) as c:
        c.execute("INSERT INTO t VALUES (100000, x'00')")
    later = datetime.now(UTC) + timedelta(minutes=2)
    missed = _rpo_check(repo, _policy(tmp_path, repo, src, "1m", replicate=True), now=later)
    assert missed.status == "not met" and "dbre replicate" in missed.reason, missed
