"""The PITR benchmark harness (benchmarks/pitr.py): a quick real run, and the parts its figures rest on."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from rich.console import Console

from benchmarks import pitr, pitr_report
from benchmarks.pitr_workload import CommitLog, oracle_state


def test_quick_run_measures_litestream_and_reports_dbre(tmp_path: Path) -> None:
    """`--quick`: Litestream replicates a real writer's 500 commits; every figure is measured and checked."""
    doc = pitr.measure(pitr.Settings.quick(), tmp_path, log=lambda _: None)
    assert (tmp_path / "pitr.json").exists()
    assert doc["tools"]["Litestream"]["available"], doc["tools"]
    lite = next(r for r in doc["runs"] if r["tool"] == "Litestream")
    assert "error" not in lite, lite
    assert lite["writer"]["commits"] == 500
    assert 0 < lite["snapshot_seconds"] < 60
    assert lite["shutdown"]["exit_code"] == 0
    # the newest state restored from the replica holds every logged commit: SIGTERM shipped them all
    assert lite["newest_restore"]["holds_every_commit"], lite["newest_restore"]
    lag = lite["lag"]
    assert lag["commits_measured"] > 0 and lag["pairs_failed"] == 0, lag
    assert 0 < lag["median_s"] <= lag["p99_s"] <= lag["worst_s"] < 10, lag
    at = lite["restores_at"]
    assert at["count"] == 6 and at["failed"] == 0, at
    for row in at["details"]:  # each restore was compared with the commit log, exact or not
        assert row["whole"] and row["exact"] == (row["expected"] <= row["restored"] <= row["expected_max"]), row
    assert lite["objects"] > 0 and lite["stored_bytes"] > 1_000_000

    console = Console(record=True, width=200)
    pitr_report.print_tables(doc, console)
    text = console.export_text()
    assert "Litestream 0.5.17" in text and "restores at random T" in text
    dbre = doc["tools"]["dbre"]
    if dbre["available"]:
        run = next(r for r in doc["runs"] if r["tool"] == "dbre")
        assert "error" not in run, run
        assert run["newest_restore"]["holds_every_commit"]
        assert doc["comparison"][0]["available"]
    else:
        assert "not available" in text
        assert doc["comparison"] == [{"target": "file", "rate": 100, "available": False}]


def test_oracle_check_finds_gaps_and_commit_log_counts_the_boundary(tmp_path: Path) -> None:
    """A restore missing one transaction is not whole; a commit is certain once COMMIT returned, possible once sent."""
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE oracle(n INTEGER PRIMARY KEY, t_ns INTEGER NOT NULL)")
    conn.executemany("INSERT INTO oracle VALUES (?, 0)", [(n,) for n in (1, 2, 3, 5)])
    conn.commit()
    conn.close()
    assert oracle_state(db) == (4, 5)
    log = tmp_path / "commits.txt"
    log.write_text("1 90 100\n2 190 200\n3 210 300\n")  # COMMIT sent, COMMIT returned
    commits = CommitLog.read(log)
    assert [commits.newest_at(t) for t in (99, 100, 250, 300, 10**12)] == [0, 1, 2, 3, 3]
    assert [commits.newest_possible_at(t) for t in (89, 90, 200, 250)] == [0, 1, 2, 3]


def test_frozen_positions_keep_what_the_replica_held_when_seen(tmp_path: Path) -> None:
    """The lag method's basis: a frozen position still holds an object's old bytes after it was replaced."""
    root = tmp_path / "replica"
    root.mkdir()
    (root / "a").write_bytes(b"old")
    (root / ".tmp").mkdir()
    (root / ".tmp" / "9f2c").write_bytes(b"half")  # dbre's temp files, and Litestream's below: not objects
    (root / "c.tmp").write_bytes(b"half")
    with pitr.ReplicaWatch(pitr.Target("file", root=root), tmp_path / "mirror") as watch:
        deadline = time.monotonic() + 10
        while not watch.positions and time.monotonic() < deadline:
            time.sleep(0.01)
        tmp = root / "a.tmp"
        tmp.write_bytes(b"new!")
        os.replace(tmp, root / "a")  # written next to it and renamed over it, as both tools do
        (root / "b").write_bytes(b"b")
        while len(watch.positions) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(3 * pitr.POLL_SECONDS)
    first, last = watch.positions[0], watch.positions[-1]
    assert last.seen_ns > first.seen_ns
    frozen = watch.frozen(first, tmp_path / "f0", lambda name: name)
    assert list(first.objects) == ["a"] and pitr.Target("file", root=root).sizes() == (2, 5)
    assert frozen is not None and sorted(p.name for p in frozen.iterdir()) == ["a"]
    assert (frozen / "a").read_bytes() == b"old"
    frozen = watch.frozen(last, tmp_path / "f1", lambda name: name)
    assert frozen is not None and (frozen / "a").read_bytes() == b"new!" and (frozen / "b").read_bytes() == b"b"
