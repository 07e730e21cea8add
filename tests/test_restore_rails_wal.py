"""`dbre restore --force`'s hold on an old WAL database (the fix of the late WAL opener): a restore that
fails after the old file was taken out of WAL mode leaves it in WAL mode with all its rows; closing the
held connection after the rename deletes no -journal by the target's name; and `restore --follow` with
force replaces a lost database's leftover -wal and -shm (never keeping them beside the standby)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.dbfactory import cli, query, sqldiff
from tests.replication import make_source, start_replicator, stop_replicator, wait_for_generation
from tests.test_restore_rails import _files, _live


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[str, Path]:
    src, repo = tmp_path / "src.db", str(tmp_path / "repo")
    make_source(src, 50)
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    return repo, src


def _journal_mode(path: Path) -> str:
    c = sqlite3.connect(path)
    try:
        return str(c.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        c.close()


def test_a_restore_failing_after_the_switch_leaves_the_old_database_in_wal_mode(
        backed_up: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename never happens (an error once -wal and -shm were removed): the old database is put back
    in WAL mode, every row still there, and the target is not replaced."""
    import dbre.restore.full as full
    from dbre.repository.repo import Repository

    repo, _ = backed_up
    live = tmp_path / "live.db"
    _live(live, "wal")
    inode = live.stat().st_ino

    def at(point: str) -> None:
        if point == "cleared":
            raise OSError(5, "Input/output error")

    repository = Repository.open(repo)
    plan = full.plan_restore(repository, "app", live, force=True)
    monkeypatch.setattr(full, "_crash_point", at)
    with pytest.raises(OSError):
        full.apply_restore(repository, plan)
    assert live.stat().st_ino == inode
    assert _journal_mode(live) == "wal"
    assert query(live, "SELECT v FROM t") == [("live",)]
    assert not [p.name for p in tmp_path.iterdir() if ".dbre-" in p.name]


def test_closing_the_held_database_deletes_no_journal_of_the_new_file(
        backed_up: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A -journal that appears beside the target after the rename (the new database's own) is still there
    once the held old connection is closed: in exclusive locking mode a rollback connection that has
    written (the switch out of WAL writes the header) keeps its journal open and deletes
    ``<name>-journal`` by name at close; the held one is in MEMORY journal mode by then."""
    import dbre.restore.full as full
    from dbre.repository.repo import Repository

    repo, src = backed_up
    for mode in ("delete", "wal"):
        live = tmp_path / f"{mode}.db"
        _live(live, mode)
        journal = Path(f"{live}-journal")

        def at(point: str, journal: Path = journal) -> None:
            if point == "renamed":
                journal.write_bytes(b"\0" * 512)  # (stands for the new file's journal)

        repository = Repository.open(repo)
        plan = full.plan_restore(repository, "app", live, force=True)
        monkeypatch.setattr(full, "_crash_point", at)
        full.apply_restore(repository, plan)
        assert journal.exists(), mode
        journal.unlink()
        assert sqldiff(src, live) == ""


def test_follow_with_force_replaces_a_lost_database_s_wal(tmp_path: Path) -> None:
    """`Follower(force=True)` where only a lost database's (unused) -wal and -shm are left: they are
    removed, never kept beside the standby, which holds the replicated state."""
    from dbre.repository.repo import Repository
    from dbre.restore.follow import Follower

    repo, src = str(tmp_path / "repo"), tmp_path / "src.db"
    make_source(src, 100)
    rep = start_replicator(src, repo, interval="200ms")
    try:
        wait_for_generation(repo, proc=rep)
    finally:
        assert stop_replicator(rep)[0] == 0
    live = tmp_path / "live.db"
    crash = subprocess.run([sys.executable, "-c", "import os, sqlite3, sys\n"
                            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                            "c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA wal_autocheckpoint=0')\n"
                            "c.execute('CREATE TABLE t(seq INTEGER PRIMARY KEY, pad BLOB)')\n"
                            "c.execute(\"INSERT INTO t VALUES (-1, x'00')\")\nos._exit(9)", str(live)],
                           capture_output=True, text=True, timeout=60)
    assert crash.returncode == 9, crash.stderr
    live.unlink()
    assert set(_files(live)) == {"-wal", "-shm"}
    stop = threading.Event()
    stop.set()  # (the first restore only)
    follower = Follower(Repository.open(repo), "app", live, 0.2, force=True)
    follower.run(stop)
    assert set(_files(live)) == {""}
    assert sqldiff(src, live) == ""


def test_restore_follow_force_places_the_standby_beside_nothing_of_a_lost_database(tmp_path: Path) -> None:
    """The CLI passes --force to the follower: `dbre restore --follow --force` where a lost database left
    only its -wal and -shm removes them and keeps the standby current (before, it refused with a hint to
    pass --force, which had been passed)."""
    import time

    from tests.replication import dbre_cmd, restored_seq

    repo, src = str(tmp_path / "repo"), tmp_path / "src.db"
    make_source(src, 100)
    rep = start_replicator(src, repo, interval="200ms")
    try:
        wait_for_generation(repo, proc=rep)
    finally:
        assert stop_replicator(rep)[0] == 0
    live = tmp_path / "live.db"
    sqlite3.connect(live).close()
    for suffix in ("-wal", "-shm"):
        Path(f"{live}{suffix}").write_bytes(b"\0" * 32)  # what a deleted database leaves (unused)
    live.unlink()
    follower = subprocess.Popen(dbre_cmd("restore", "--repo", repo, "--db", "app", "--to", str(live), "--force",
                                         "--follow", "--interval", "200ms"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not live.exists():
            assert follower.poll() is None and time.time() < deadline, follower.stderr
            time.sleep(0.1)
        assert not Path(f"{live}-wal").exists()
        assert restored_seq(live) == (100, 100, 100)
    finally:
        follower.terminate()
        _, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
