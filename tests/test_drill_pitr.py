"""Drills of a replicated database restore points in time from segments (layer 2 proven by
restoring it, as layer 1 is): `newest` is the newest replicated state and the RPO is measured from
it; `random` is a random moment of the PITR window, restored exact to the transaction; a database
without segments keeps snapshot drills. Real writer, real replicator, real repository."""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from pathlib import Path

from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from dbre.validate.drill import DrillTargets, run_drill
from tests.replication import (
    check_exact,
    make_source,
    observed_times,
    read_log,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 300


def _replicated(tmp_path: Path) -> tuple[Repository, Path, Path]:
    src, log = tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    url = str(tmp_path / "repo")
    rep = start_replicator(src, url, interval="200ms")
    try:
        wait_for_generation(url, proc=rep)
        assert start_writer(src, log, 3.0, start_seq=BASE_ROWS, pause=0.01, ckpt_every=0).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    return Repository.open(url), src, log


def test_drills_of_a_replicated_database_restore_points_in_time(tmp_path: Path) -> None:
    repo, src, log = _replicated(tmp_path)
    commits, _ = read_log(log)
    observed = observed_times(repo, BASE_ROWS)
    newest_commit = max(observed.values())

    out = run_drill(repo, "app", target="newest", targets=DrillTargets(rpo_seconds=3600), write=False)
    rec = out.record
    assert rec["passed"], rec["failures"]
    pit = rec["point_in_time"]
    assert pit is not None and pit["at"] is None and pit["segments"] >= 3
    # every commit the writer made is in the newest replicated state (the writer stopped first)
    assert pit["last_txid"] is not None and pit["transactions"] >= len(commits) - 5
    # the RPO is measured from the newest replicated transaction, not from the base snapshot
    assert abs(utc(newest_commit) - _time(rec["newest_restorable_at"])) < timedelta(milliseconds=2)
    assert rec["rpo_seconds"] < (_time(rec["started_at"]) - repo.require_db("app")[-1].time).total_seconds()
    assert {c["check"] for c in rec["failed_checks"]} == set()
    assert [c.check for c in out.checks] == ["integrity_check", "foreign_key_check"]  # (no manifest to compare)
    with sqlite3.connect(src) as c:  # the restored file's own counts, not its base snapshot's
        assert rec["rows"] == sum(c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("t", "counter"))
    assert rec["tables"] == 2 and rec["rows"] > BASE_ROWS + 50

    for seed in (1, 2, 3):
        keep = tmp_path / f"scratch-{seed}"
        rec = run_drill(repo, "app", target="random", seed=seed, write=False, keep_scratch=True,
                        scratch_dir=keep).record
        assert rec["passed"], rec["failures"]
        at = _time(rec["point_in_time"]["at"])
        assert repo.require_db("app")[0].time <= at <= utc(newest_commit)
        (restored,) = keep.glob("dbre-drill-app-*/app.db")
        check_exact(restored, commits, observed, at.timestamp(), BASE_ROWS)  # exact to the transaction


def test_a_damaged_segment_fails_the_drill_not_silently(tmp_path: Path) -> None:
    repo, _, _ = _replicated(tmp_path)
    keys = sorted(k for k in repo.store.list("segments/app/") if not k.endswith("/base"))
    path = Path(repo.store.root) / keys[len(keys) // 2]  # type: ignore[attr-defined]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    rec = run_drill(repo, "app", target="newest", write=False).record
    assert not rec["passed"] and rec["error"] and keys[len(keys) // 2].split("/")[-1][:16] in rec["error"]


def test_a_database_without_segments_keeps_snapshot_drills(tmp_path: Path) -> None:
    src = tmp_path / "src.db"
    make_source(src, 50)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    m = backup(repo, LocalFileSource(src), "app").manifest
    with sqlite3.connect(src) as c:
        c.execute("INSERT INTO t VALUES (51, x'00')")
    rec = run_drill(repo, "app", target="random", seed=1, write=False).record
    assert rec["passed"] and rec["point_in_time"] is None and rec["snapshot"] == m.id
    assert rec["newest_restorable_at"] == rec["snapshot_taken_at"]


def _time(text: str):  # type: ignore[no-untyped-def]
    from dbre.repository.manifest import parse_time

    return parse_time(text)
