"""Review of `dbre restore --force`'s in-use rails (aa8cd47..654b873), as an operator and as an attacker.

Every finding is a test on real SQLite files, real processes holding real locks and a real repository:
a reproduced bug was a strict xfail (its reason said what goes wrong and how bad; each fixed one is now a
plain test whose docstring says what it was), a property that holds is a plain test. Findings:
- a WAL connection that opens the old file between the second look and the rename commits "fine"
  into the new file's -wal: the old database's pages over the new one's (silently mixed or
  malformed) [high, fixed: the held old file is taken out of WAL mode before the rename];
  the same in rollback mode fails loudly (SQLITE_READONLY_DBMOVED) [holds];
- --force over a deleted database whose -wal and -shm a running process still uses: no look at all,
  its -wal/-shm are removed and its later commits vanish [high, fixed: looked at whenever the file,
  -wal or -shm is there];
- `restore --follow` (no --force needed) renames the standby in beside a lost database's -wal: the old
  frames are replayed into it [high, fixed: refused as a plain restore refuses];
- a -wal name planted as a symlink: its target is never truncated [holds], but the refusal is an
  "unexpected error: CantOpenError" [low, fixed: one plain line];
- --if-db-not-exists takes a 0-byte file or a directory for a database [medium/low, fixed: an empty
  file is restored over, a directory refused];
- a dangling symlink is reported as "appeared while restoring" after the whole restore [low, fixed:
  named up front];
- through a symlink, a writer is named as holding "a read transaction" [low, fixed: the -shm beside
  the resolved path is looked at]; a free symlink is replaced, the file it pointed at left complete
  [holds];
- another PID namespace: a WAL user is refused as "a process not visible here", an idle rollback user
  is missed but its next write fails loudly [holds];
- a reader that outlasts the hold's 5 s wait is refused without its process named [low, fixed: named];
- the probe never drops this process's own POSIX locks (it refuses first) [holds];
- a hot journal of the old rollback database is rolled back into the old file, never left beside
  the new one [holds].
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dbfactory import CliResult, assert_one_line_error, cli, dbre_env, query, sqldiff
from tests.replication import make_source
from tests.test_restore_rails import _files, _hold, _live, _release

# Opens the database (the descriptor exists from here on), says "opened", then inserts one row in
# its own transaction, waiting up to 20 s for locks; exit 0 "committed" or exit 3 with the error.
LATE = r'''
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=20)
print("opened", flush=True)
try:
    c.execute("INSERT INTO t(seq, pad) VALUES (-1, x'00')")
    print("committed", flush=True)
except sqlite3.Error as err:
    print("error", err, flush=True)
    sys.exit(3)
'''

# A rollback-mode writer killed with part of a transaction already written to the database file: a
# hot -journal is left beside it (cache of 2 pages: the changes spill before the commit).
SPILL = r'''
import os, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=DELETE")
c.execute("PRAGMA cache_size=2")
c.execute("BEGIN IMMEDIATE")
c.executemany("INSERT INTO t(seq, pad) VALUES (?, randomblob(2000))", [(-i,) for i in range(1, 300)])
os._exit(9)
'''


# A WAL writer killed after a commit that sits in -wal (autocheckpoint off): -wal and -shm left, unlocked.
CRASH = r'''
import os, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("UPDATE t SET pad = zeroblob(10) WHERE seq <= 100")
c.execute("INSERT INTO t(seq, pad) VALUES (-5, x'00')")
os._exit(9)
'''


def _check(path: Path) -> str:
    """integrity_check, or the error a connection gets (a corrupted file may not even open)."""
    try:
        conn = sqlite3.connect(path)
        try:
            return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        return f"error: {err}"


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[str, Path]:
    """A repository with one snapshot of ``app`` (a WAL database of 50 rows), its source."""
    src, repo = tmp_path / "src.db", str(tmp_path / "repo")
    make_source(src, 50)
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    return repo, src


def _advanced_copy(src: Path, live: Path, mode: str) -> None:
    """The live database: the backed-up one with its rows changed since and 200 more (what a restore is
    asked to undo)."""
    shutil.copyfile(src, live)
    c = sqlite3.connect(live, isolation_level=None)
    c.execute(f"PRAGMA journal_mode={mode}")
    c.execute("UPDATE t SET pad = zeroblob(300)")
    top = c.execute("SELECT max(seq) FROM t").fetchone()[0]
    c.executemany("INSERT INTO t(seq, pad) VALUES (?, randomblob(300))", [(i,) for i in range(top + 1, top + 201)])
    c.close()


def _restore_with_late_opener(repo: str, live: Path, monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen[str]:
    """`restore --force` in this process; a process opens the old file once the second look has passed
    (the old database held, its -wal and -shm removed, the rename next) and is inside its INSERT,
    waiting for the lock, when the rename happens."""
    import dbre.restore.full as full
    from dbre.repository.repo import Repository

    late: list[subprocess.Popen[str]] = []

    def at(point: str) -> None:
        if point == "cleared":
            proc = subprocess.Popen([sys.executable, "-c", LATE, str(live)], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "opened"
            time.sleep(0.5)  # (its INSERT is waiting for our exclusive lock on the old file)
            late.append(proc)

    repository = Repository.open(repo)
    plan = full.plan_restore(repository, "app", live, force=True)
    monkeypatch.setattr(full, "_crash_point", at)
    full.apply_restore(repository, plan)
    assert len(late) == 1
    return late[0]


def test_a_late_wal_opener_never_writes_the_old_database_into_the_new_file(
        backed_up: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was HIGH: a WAL connection that opened the old file after the second look waited on the held lock,
    then read the OLD inode's header (WAL mode), created <target>-wal/-shm by name beside the NEW file
    and committed the old database's pages there, reporting success. Fixed: the held old database is
    switched out of WAL mode before the rename (`_leave_wal`), so that writer fails loudly
    (SQLITE_READONLY_DBMOVED), as the rollback-mode twin below does."""
    repo, src = backed_up
    live = tmp_path / "live.db"
    _advanced_copy(src, live, "wal")
    late = _restore_with_late_opener(repo, live, monkeypatch)
    out, _ = late.communicate(timeout=30)
    # the late writer is told its commit failed; the restored file is the snapshot, intact. (Seen: exit 0
    # "committed", integrity ok, and sqldiff shows the snapshot's first rows UPDATEd back to the old
    # database's values plus the late row: the old database's leaf page replayed over the new one's.)
    assert (late.returncode, out.split(" ")[0].strip(), _check(live), sqldiff(src, live)) == (3, "error", "ok", "")


def test_a_late_rollback_opener_fails_loudly_and_the_new_file_is_intact(
        backed_up: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race in rollback mode: SQLite sees the file was renamed over (SQLITE_READONLY_DBMOVED)
    when it starts to write: the commit fails with an error, the restored file is the snapshot."""
    repo, src = backed_up
    live = tmp_path / "live.db"
    _advanced_copy(src, live, "delete")
    late = _restore_with_late_opener(repo, live, monkeypatch)
    out, _ = late.communicate(timeout=30)
    assert late.returncode == 3 and "attempt to write a readonly database" in out, out
    assert _check(live) == "ok" and sqldiff(src, live) == ""
    assert not Path(f"{live}-wal").exists() and not Path(f"{live}-journal").exists()


def test_force_over_a_deleted_database_still_in_use_is_refused(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """Was HIGH: the database file deleted by mistake while the application runs: --force looked at
    nothing (the in-use check ran only when the file existed), removed the -wal and -shm the running
    process had open and locked, and its later commits went nowhere. Fixed: the check runs when the
    file, its -wal or its -shm is there; without --force the -wal is refused before any work."""
    repo, _ = backed_up
    live = tmp_path / "live.db"
    _live(live)
    holder = _hold(live, "wal", "idle")  # its commits sit in -wal (autocheckpoint off)
    try:
        live.unlink()  # (rm by mistake: the process goes on with the deleted inode, -wal and -shm)
        before = _files(live)
        assert set(before) == {"-wal", "-shm"}
        r = cli("restore", "--repo", repo, "--db", "app", "--to", live)
        assert_one_line_error(r, 1, "without its database", "--force")
        r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
        assert_one_line_error(r, 1, "in use", f"process {holder.pid}")
        assert _files(live) == before and not live.exists()
    finally:
        _release(holder)


def test_if_db_not_exists_restores_over_an_empty_file(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """Was MEDIUM: --if-db-not-exists took a 0-byte file (what `sqlite3 app.db` or a health check that
    opens the path leaves) for a database: exit 0, nothing restored, the application then started on an
    empty database. Fixed: an empty file holds nothing, so the restore goes over it (as --force would)."""
    repo, src = backed_up
    empty = tmp_path / "app.db"
    empty.touch()
    r = cli("restore", "--repo", repo, "--db", "app", "--to", empty, "--if-db-not-exists")
    assert "nothing restored" not in r.stdout, r
    assert r.returncode == 0 and sqldiff(src, empty) == "", r


def test_if_db_not_exists_refuses_a_directory(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """Was LOW: a directory at --to was 'already exists: nothing restored', exit 0. Fixed: refused as a
    restore to it is (exit 2, 'is a directory'), so a container start stops there."""
    repo, _ = backed_up
    folder = tmp_path / "app.db"
    folder.mkdir()
    r = cli("restore", "--repo", repo, "--db", "app", "--to", folder, "--if-db-not-exists")
    assert_one_line_error(r, 2, "is a directory")


def test_a_dangling_symlink_target_is_named_as_such(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """Was LOW: a dangling symlink at --to passed every check as 'not there', the whole restore ran, then
    the error said the target 'appeared while restoring'. Fixed: refused up front, naming the symlink."""
    repo, _ = backed_up
    link = tmp_path / "app.db"
    os.symlink(tmp_path / "unmounted" / "app.db", link)
    for extra in ([], ["--if-db-not-exists"]):
        r = cli("restore", "--repo", repo, "--db", "app", "--to", link, *extra)
        line = assert_one_line_error(r, 2)
        assert "appeared while restoring" not in line and "symlink" in line.lower(), line
    assert os.path.islink(link)


def test_through_a_symlink_a_writer_is_named_as_a_writer(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """Was LOW: through a symlink a writer was named as holding 'a read transaction': the -shm looked at was
    <link>-shm, SQLite's is <resolved>-shm. Fixed: the -wal and -shm beside the resolved path are looked at."""
    repo, _ = backed_up
    real, link = tmp_path / "real.db", tmp_path / "app.db"
    _live(real)
    os.symlink(real, link)
    holder = _hold(real, "wal", "write")
    try:
        r = cli("restore", "--repo", repo, "--db", "app", "--to", link, "--force")
        assert_one_line_error(r, 1, "in use", f"process {holder.pid}", "holds a write transaction")
    finally:
        _release(holder)


def test_a_free_symlink_is_replaced_and_the_file_it_named_is_left_complete(backed_up: tuple[str, Path],
                                                                            tmp_path: Path) -> None:
    """The restore never writes through a symlink: the link becomes the restored file; the database it
    pointed at keeps every commit (its WAL checkpointed into it), whatever path an application uses."""
    repo, src = backed_up
    real, link = tmp_path / "real.db", tmp_path / "app.db"
    _live(real)
    _release(_hold(real, "wal", "idle"))  # ("before", "after" committed: 3 rows)
    os.symlink(real, link)
    r = cli("restore", "--repo", repo, "--db", "app", "--to", link, "--force")
    assert r.returncode == 0 and "restored snapshot" in r.stdout, r
    assert not os.path.islink(link) and sqldiff(src, link) == ""
    assert [v for (v,) in query(real, "SELECT v FROM t ORDER BY id")] == ["live", "before", "after"]
    assert _check(real) == "ok"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to run the restore in its own PID namespace")
def test_a_user_in_another_pid_namespace(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """The restore run in a container (its own PID namespace and /proc): a WAL user outside is seen by
    its -shm lock and refused as "a process not visible here"; an idle rollback-mode user (no lock, no
    visible descriptor) is missed and the file replaced, but its next write fails with an error
    (SQLITE_READONLY_DBMOVED), so nothing is lost silently. (As FORMAT.md says.)"""
    repo, src = backed_up

    def contained(live: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "dbre.cli",
                               "restore", "--repo", repo, "--db", "app", "--to", str(live), "--force"],
                              capture_output=True, text=True, env=dbre_env(), timeout=120,
                              cwd=Path(__file__).resolve().parents[1])

    wal = tmp_path / "wal.db"
    _live(wal, "wal")
    holder = _hold(wal, "wal", "idle")
    try:
        before = _files(wal)
        r = contained(wal)
        assert r.returncode == 1 and "a process not visible here has it open in WAL mode" in r.stderr, r
        assert _files(wal) == before
    finally:
        _release(holder)

    rollback = tmp_path / "rollback.db"
    _live(rollback, "delete")
    holder = _hold(rollback, "delete", "idle")
    r = contained(rollback)
    assert r.returncode == 0 and "restored snapshot" in r.stdout, r
    out, _ = holder.communicate("go\n", timeout=30)
    assert holder.returncode != 0  # its INSERT after the rename: "attempt to write a readonly database"
    assert sqldiff(src, rollback) == ""


def test_the_probe_never_drops_this_process_s_own_locks(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """A restore run in a process that holds a connection on the target (a long-lived worker, a test
    harness) refuses before it opens any descriptor of its own: the connection's write lock is still
    held afterwards (another process still cannot write), and its transaction commits."""
    repo, _ = backed_up
    for mode in ("delete", "wal"):
        live = tmp_path / f"{mode}.db"
        _live(live, mode)
        mine = sqlite3.connect(live, isolation_level=None)
        try:
            mine.execute("BEGIN IMMEDIATE")
            mine.execute("INSERT INTO t(v) VALUES ('mine')")
            r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
            assert_one_line_error(r, 1, "this process has it open", "nothing was changed")
            other = subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], "
                                    "timeout=0.2); c.execute('BEGIN IMMEDIATE')", str(live)],
                                   capture_output=True, text=True, timeout=30)
            assert other.returncode != 0 and "database is locked" in other.stderr, (mode, other.stderr)
            mine.execute("COMMIT")
        finally:
            mine.close()
        assert [v for (v,) in query(live, "SELECT v FROM t ORDER BY id")] == ["live", "mine"]


def test_a_hot_journal_of_the_old_database_is_never_left_beside_the_new_one(backed_up: tuple[str, Path],
                                                                             tmp_path: Path) -> None:
    """A rollback-mode writer killed mid-transaction leaves a hot -journal (pages already spilled into
    the file): `--force` rolls it back into the old file while holding it, removes it, and only then
    renames; the new file is the snapshot and no journal is left to be replayed into it."""
    repo, src = backed_up
    live = tmp_path / "live.db"
    _advanced_copy(src, live, "delete")
    crashed = subprocess.run([sys.executable, "-c", SPILL, str(live)], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 9, crashed.stderr
    journal = Path(f"{live}-journal")
    assert journal.exists() and journal.stat().st_size > 512
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
    assert r.returncode == 0 and "restored snapshot" in r.stdout, r
    assert not journal.exists() and not Path(f"{live}-wal").exists()
    assert _check(live) == "ok" and sqldiff(src, live) == ""


def test_a_reader_that_outlasts_the_hold_is_named(backed_up: tuple[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Was LOW: a reader that started after the first look and kept its transaction past HOLD_WAIT_MS made
    the hold fail with 'in use' naming no process. Fixed: once the hold gives up, the in-use check is run
    again and names it."""
    import dbre.restore.full as full
    from dbre.errors import RestoreError
    from dbre.repository.repo import Repository

    repo, _ = backed_up
    live = tmp_path / "live.db"
    _live(live, "delete")
    readers: list[subprocess.Popen[str]] = []
    hold_still = full._hold_still

    def late_reader(target: Path, nofollow: bool = False) -> object:
        readers.append(_hold(target, "delete", "read"))  # (opened after the first look: /proc missed it)
        return hold_still(target, nofollow)

    repository = Repository.open(repo)
    plan = full.plan_restore(repository, "app", live, force=True)
    monkeypatch.setattr(full, "_hold_still", late_reader)
    monkeypatch.setattr(full, "HOLD_WAIT_MS", 300)
    inode = live.stat().st_ino
    try:
        with pytest.raises(RestoreError) as err:
            full.apply_restore(repository, plan)
        assert live.stat().st_ino == inode  # (not replaced: the refusal itself is safe)
        assert f"process {readers[0].pid}" in str(err.value), str(err.value)
    finally:
        for proc in readers:
            _release(proc)


def test_follow_never_puts_the_standby_beside_a_lost_database_s_wal(tmp_path: Path) -> None:
    """Was HIGH: `restore --follow` to a path where only a lost database's -wal and -shm were left needed no
    --force and renamed the standby in beside that -wal (the old frames replayed into it). Fixed: the
    first placement follows a plain restore's rules and refuses ('-wal is there without its database')."""
    from tests.replication import dbre_cmd, start_replicator, stop_replicator, wait_for_generation

    repo, src = str(tmp_path / "repo"), tmp_path / "src.db"
    make_source(src, 100)
    rep = start_replicator(src, repo, interval="200ms")
    try:
        wait_for_generation(repo, proc=rep)
    finally:
        assert stop_replicator(rep)[0] == 0
    live = tmp_path / "live.db"
    _advanced_copy(src, live, "wal")
    crashed = subprocess.run([sys.executable, "-c", CRASH, str(live)], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 9, crashed.stderr
    live.unlink()
    assert set(_files(live)) == {"-wal", "-shm"}
    follower = subprocess.Popen(dbre_cmd("restore", "--repo", repo, "--db", "app", "--to", str(live), "--follow",
                                         "--interval", "200ms"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not live.exists() and follower.poll() is None:
            assert time.time() < deadline, "the follower neither restored nor refused"
            time.sleep(0.05)
        if follower.poll() is not None:  # refused, as a plain restore refuses: fine
            assert follower.returncode == 1 and "-wal" in (follower.stderr.read() if follower.stderr else "")
        else:
            assert sqldiff(src, live) == ""  # the replicated state, not the lost database's frames
    finally:
        if follower.poll() is None:
            follower.terminate()
        follower.communicate(timeout=30)


def _wal_symlinked(tmp_path: Path, repo: str) -> tuple[Path, Path, dict[str, tuple[int, str]], CliResult]:
    """A WAL database whose -wal name is a symlink to another file (placed by someone who can write the
    folder); restore --force over it. Returns the target, the victim file, and the result."""
    live, victim = tmp_path / "live.db", tmp_path / "victim"
    _live(live)
    victim.write_bytes(b"precious\n" * 1000)
    os.symlink(victim, f"{live}-wal")
    before = _files(live)
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
    return live, victim, before, r


def test_a_symlinked_wal_never_has_its_target_truncated(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """Holding the old database checkpoints (TRUNCATE) its -wal: a -wal name planted as a symlink is
    never followed (SQLite opens it O_NOFOLLOW), so the file it names keeps its bytes; the restore fails
    (exit 1) and leaves the target as it was."""
    repo, _ = backed_up
    live, victim, before, r = _wal_symlinked(tmp_path, repo)
    assert r.returncode == 1, r
    assert victim.read_bytes() == b"precious\n" * 1000
    assert _files(live) == before and os.path.islink(f"{live}-wal")


def test_a_symlinked_wal_is_refused_in_one_plain_line(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    """Was LOW: that refusal was 'unexpected error: CantOpenError' (apsw errors other than busy, not-a-db
    and corrupt escaped the hold). Fixed: one RestoreError line naming the file and what to check."""
    repo, _ = backed_up
    _, _, _, r = _wal_symlinked(tmp_path, repo)
    line = assert_one_line_error(r, 1, "live.db")
    assert "unexpected error" not in line, line
