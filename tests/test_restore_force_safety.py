"""restore --force over a database snapshots it first (tagged safety): a wrong --at or --snapshot over the
live database loses nothing; the line printed says how to bring it back. A database that cannot be
snapshotted (damaged) refuses the restore, naming --no-safety-snapshot, with nothing changed."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest

from dbre.repository.repo import Repository
from tests.dbfactory import assert_one_line_error, cli, query, sqldiff
from tests.replication import make_source, segment_keys, start_replicator, stop_replicator, wait_for_generation
from tests.test_restore_rails import _live


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[str, Path]:
    src, repo = tmp_path / "src.db", str(tmp_path / "repo")
    make_source(src, 50)
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    return repo, src


def _safety_id(stdout: str) -> str:
    m = re.search(r"safety snapshot ([0-9a-f]+) \(tagged safety", stdout)
    assert m, stdout
    return m.group(1)


def test_the_replaced_database_comes_back_from_its_safety_snapshot(backed_up: tuple[str, Path],
                                                                   tmp_path: Path) -> None:
    repo, src = backed_up
    live = tmp_path / "live.db"
    _live(live)  # (rows the repository has never seen)
    kept = tmp_path / "kept.db"
    kept.write_bytes(live.read_bytes())
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
    assert r.returncode == 0, r
    assert sqldiff(src, live) == ""
    safety = _safety_id(r.stdout)
    # a plain restore still takes the newest regular snapshot, not the safety one
    again = tmp_path / "again.db"
    assert cli("restore", "--repo", repo, "--db", "app", "--to", again).returncode == 0
    assert sqldiff(src, again) == ""
    back = tmp_path / "back.db"
    r = cli("restore", "--repo", repo, "--db", "app", "--snapshot", safety, "--to", back)
    assert r.returncode == 0, r
    assert query(back, "SELECT v FROM t") == [("live",)] and sqldiff(kept, back) == ""


def test_no_database_there_no_safety_snapshot(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    repo, src = backed_up
    empty = tmp_path / "empty.db"
    empty.touch()
    before = list(Repository.open(repo).store.list("snapshots/app/"))
    r = cli("restore", "--repo", repo, "--db", "app", "--to", empty, "--force")
    assert r.returncode == 0, r
    assert "safety snapshot" not in r.stdout and sqldiff(src, empty) == ""
    assert list(Repository.open(repo).store.list("snapshots/app/")) == before


def test_a_damaged_database_is_refused_then_replaced_with_no_safety_snapshot(backed_up: tuple[str, Path],
                                                                            tmp_path: Path) -> None:
    repo, src = backed_up
    live = tmp_path / "live.db"
    _live(live, "delete")
    data = bytearray(live.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # (page 2, the table's root: what a bad disk leaves)
    live.write_bytes(bytes(data))
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
    assert_one_line_error(r, r.returncode, "safety snapshot", "--no-safety-snapshot")
    assert r.returncode != 0 and live.read_bytes() == bytes(data)  # nothing changed
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force", "--no-safety-snapshot")
    assert r.returncode == 0, r
    assert sqldiff(src, live) == "" and "safety snapshot" not in r.stdout


def test_a_point_in_time_restore_over_a_database_snapshots_it_too(tmp_path: Path) -> None:
    repo, src = str(tmp_path / "repo"), tmp_path / "src.db"
    make_source(src, 100)
    rep = start_replicator(src, repo, interval="200ms")
    try:
        wait_for_generation(repo, proc=rep)
        c = sqlite3.connect(src, isolation_level=None)  # a transaction after the base: shipped as a segment
        c.execute("UPDATE t SET pad = x'01' WHERE seq = 1")
        c.close()
        deadline = time.monotonic() + 30
        while not any("/base" not in k for k in segment_keys(Repository.open(repo))):
            assert time.monotonic() < deadline, "no segment shipped"
            time.sleep(0.1)
    finally:
        assert stop_replicator(rep)[0] == 0
    live = tmp_path / "live.db"
    _live(live)
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
    assert r.returncode == 0, r
    assert "newest replicated state" in r.stdout and sqldiff(src, live) == ""
    back = tmp_path / "back.db"
    assert cli("restore", "--repo", repo, "--db", "app", "--snapshot", _safety_id(r.stdout), "--to",
               back).returncode == 0
    assert query(back, "SELECT v FROM t") == [("live",)]
