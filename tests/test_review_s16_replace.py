"""Cold review of 0e86ab3 (a database file replaced while `dbre replicate` runs: the old -wal is emptied
by a TRUNCATE checkpoint through the connection to the old file, or one line refuses). Each test starts a
real replicator; the ones that show a bug fail now."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.dbfactory import cli
from tests.replication import make_source, restored_seq, start_replicator, stop_replicator, wait_for_generation

REFUSAL = "held by another process"


def _rows(path: Path, where: str = "1") -> tuple[str, int, int | None]:
    """(integrity_check, count of rows matching ``where``, max seq) as a fresh opener sees them."""
    c = sqlite3.connect(path)
    try:
        ok = c.execute("PRAGMA integrity_check").fetchone()[0]
        n, top = c.execute(f"SELECT count(*), max(seq) FROM t WHERE {where}").fetchone()
        return ok, n, top
    except sqlite3.DatabaseError as err:
        return str(err), -1, None
    finally:
        c.close()


def _commit(conn: sqlite3.Connection, seqs: range) -> None:
    for i in seqs:
        conn.execute("INSERT INTO t VALUES (?, randomblob(300))", (i,))


def _ended(rep: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, str]:
    """Wait up to ``timeout`` for the replicator to exit by itself; (code or None, stderr so far if it did)."""
    try:
        rep.wait(timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return rep.returncode, rep.stderr.read().decode() if rep.stderr else ""


def _finish(rep: subprocess.Popen[bytes]) -> tuple[int, str]:
    if rep.poll() is None:
        try:
            os.kill(rep.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        return stop_replicator(rep)
    return rep.returncode, rep.stderr.read().decode() if rep.stderr else ""


@contextmanager
def _replicating(tmp_path: Path, *, hold_old: bool = False) -> Iterator[tuple[Path, str, subprocess.Popen[bytes],
                                                                           sqlite3.Connection | None]]:
    """app.db (200 rows) replicated; 100 more commits (seq 201-300) made by a connection that is closed
    (the application stopped) unless ``hold_old``; the replicator's read transaction keeps them in the -wal."""
    src, repo = tmp_path / "app.db", str(tmp_path / "repo")
    make_source(src, 200)
    rep = start_replicator(src, repo, interval="200ms")
    old = sqlite3.connect(src, isolation_level=None)
    try:
        wait_for_generation(repo, proc=rep)
        _commit(old, range(201, 301))
        if not hold_old:
            old.close()
        time.sleep(1.0)
        assert os.path.getsize(str(src) + "-wal") > 0
        yield src, repo, rep, old if hold_old else None
    finally:
        old.close()
        _finish(rep)


def _copy_in_wal_mode(src: Path, to: Path) -> None:
    """The same database as it is now (seq 1-300), as an operator's restored copy: VACUUM INTO, then WAL."""
    c = sqlite3.connect(src)
    c.execute(f"VACUUM INTO '{to}'")
    c.close()
    c = sqlite3.connect(to)
    c.execute("PRAGMA journal_mode=WAL")
    c.close()


# -- 1. can the TRUNCATE reach the NEW database? ------------------------------------------------------

def test_new_file_opened_while_replicator_is_paused_keeps_its_commits(tmp_path: Path) -> None:
    """FAILS now (data-loss). The replicator is paused (SIGSTOP: a loaded host, a frozen container) across
    the swap; the application opens the new file and commits 10 rows. It gets the old -wal and -shm at the
    path (the replicator's read transaction kept them), so its commits go into that -wal. On resuming, the
    TRUNCATE checkpoint (the application idle: nothing holds a read mark) copies them into the OLD file,
    moved aside, and empties the -wal: the new database loses commits its application saw succeed."""
    aside, other = tmp_path / "app.db.old", tmp_path / "other.db"
    with _replicating(tmp_path) as (src, _repo, rep, _):
        _copy_in_wal_mode(src, other)
        os.kill(rep.pid, signal.SIGSTOP)
        os.rename(src, aside)
        os.rename(other, src)
        app = sqlite3.connect(src, isolation_level=None)
        _commit(app, range(1000, 1010))
        assert app.execute("SELECT count(*) FROM t WHERE seq >= 1000").fetchone() == (10,)
        os.kill(rep.pid, signal.SIGCONT)
        time.sleep(3)
        app.close()
    assert _rows(aside, "seq >= 1000")[1] == 0, "the new database's commits were written into the old file"
    assert _rows(src, "seq >= 1000")[:2] == ("ok", 10), "the new database lost commits its application made"


# -- 3. another process keeps the old file open -------------------------------------------------------

def test_idle_connection_to_the_old_file_is_refused_not_shared(tmp_path: Path) -> None:
    """FAILS now (data-loss, wrong-result). The usual case of "another process has the old database open"
    is an idle connection (a pool), not one inside a read transaction. The TRUNCATE then succeeds, the
    -wal at the path is empty, and the check (size of the -wal) lets the replicator open the new file:
    it now shares the old process's -wal and -shm. That process's next commits (seq 2000-2009) land in
    that shared -wal, are read by the replicator as the NEW generation's (its stop line counts 110
    transactions: 100 before the swap, these 10), and never reach the old file (SQLite skips
    checkpoint-on-close for a moved database): they stay in the -wal beside the new file."""
    aside, other = tmp_path / "app.db.old", tmp_path / "other.db"
    make_source(other, 50)
    with _replicating(tmp_path, hold_old=True) as (src, _repo, rep, old):
        assert old is not None
        os.rename(src, aside)
        os.rename(other, src)
        code, err = _ended(rep, 15)
        _commit(old, range(2000, 2010))  # the old application goes on (its connection, the old inode)
        time.sleep(1.0)
        old.close()
    # (where those 10 commits end up is SQLite's: a connection to a moved database writes the -wal at the path
    # and does not checkpoint it on close, with or without dbre. What dbre must do is refuse, not share it.)
    assert _rows(aside)[0] == "ok"
    assert code == 1 and REFUSAL in err, f"the replicator opened the new file beside a live old -wal ({code}): {err}"


def test_read_transaction_on_the_old_file_one_line_then_a_restart(tmp_path: Path) -> None:
    """The refusal itself is right (exit 1 after the 10 s busy wait, one line, the new file untouched).
    Failed before the fix (unsafe-failure): the refusal held for that run only. A restart (systemd's Restart=on-failure,
    the old process still open, now idle, the old -wal with its frames still at the path) has no check at
    start-up: it opens the new file beside that -wal and starts a new generation. (The new file is unusable
    until the -wal is moved aside anyway: SQLite skips checkpoint-on-close for a moved database.)"""
    aside, other = tmp_path / "app.db.old", tmp_path / "other.db"
    make_source(other, 50)
    before = other.read_bytes()
    with _replicating(tmp_path, hold_old=True) as (src, repo, rep, old):
        assert old is not None
        old.execute("BEGIN")
        old.execute("SELECT count(*) FROM t").fetchone()  # a read transaction on the old database
        os.rename(src, aside)
        os.rename(other, src)
        code, err = _ended(rep, 30)
        assert code == 1, err
        lines = [ln for ln in err.splitlines() if ln.startswith("dbre:")]
        assert len(lines) == 1 and REFUSAL in lines[0] and "start replicate again" in lines[0], err
        assert src.read_bytes() == before  # nothing wrote the new file (any opener now gets the old -wal)
        old.execute("COMMIT")  # still open, idle: the operator did not stop it; systemd restarts replicate
        again = start_replicator(src, repo, interval="200ms")
        try:
            restarted, err2 = _ended(again, 5)
            wal = os.path.getsize(str(src) + "-wal")
        finally:
            code2, rest = _finish(again)
        err2 += rest
        old.close()
    # (its last 100 commits are in the -wal at the path, which the line says to move aside with it: a moved
    # database is not checkpointed on close, and dbre checkpoints nothing another process holds)
    assert _rows(aside)[0] == "ok"
    assert wal > 0 and restarted == 1 and REFUSAL in err2, f"restart beside a {wal}-byte old -wal: {code2} {err2}"


def test_unlinked_database_is_shipped_and_its_wal_emptied(tmp_path: Path) -> None:
    """Fine. `rm app.db` while replicating: the last commits are read and shipped before the replicator
    exits 1 ("no such file"); the -wal at the path is emptied (checkpointed into the unlinked inode), so a
    database created later at the path is not given the old frames (before the change it was)."""
    with _replicating(tmp_path) as (src, repo, rep, _):
        os.unlink(src)
        code, err = _ended(rep, 15)
        assert code == 1 and "no such file" in err, err
        assert os.path.getsize(str(src) + "-wal") == 0
        make_source(src, 50)
        assert _rows(src)[:2] == ("ok", 50)
    out2 = tmp_path / "r2.db"
    r = cli("restore", "--repo", repo, "--db", "app", "--to", out2)
    assert r.returncode == 0, r.stderr
    assert restored_seq(out2)[:2] == (300, 300)


def test_vacuum_into_rename_and_away_and_back(tmp_path: Path) -> None:
    """Fine. A VACUUM INTO copy (rollback journal mode) moved over the path: the old -wal is emptied into
    the old file and the replicator exits 1 with the journal-mode line instead of replaying the old
    frames into the copy. A rename away and back: exit 1 ("no such file") with the file intact, and a
    restart starts again (a new generation: the WAL was truncated) and ships on."""
    aside, other = tmp_path / "app.db.old", tmp_path / "other.db"
    with _replicating(tmp_path) as (src, repo, rep, _):
        c = sqlite3.connect(src)
        c.execute(f"VACUUM INTO '{other}'")
        c.close()
        os.rename(src, aside)
        os.rename(other, src)
        code, err = _ended(rep, 15)
        assert code == 1 and "not WAL" in err, err
        assert _rows(src)[:2] == ("ok", 300) and _rows(aside)[:2] == ("ok", 300)
    src, repo = tmp_path / "b" / "app.db", str(tmp_path / "b" / "repo")
    src.parent.mkdir()
    make_source(src, 100)
    rep = start_replicator(src, repo, interval="200ms")
    try:
        wait_for_generation(repo, proc=rep)
        os.rename(src, tmp_path / "b" / "away.db")
        time.sleep(0.5)
        os.rename(tmp_path / "b" / "away.db", src)
        code, err = _ended(rep, 15)
        assert code == 1 and "no such file" in err, err
        assert _rows(src)[:2] == ("ok", 100)
        rep = start_replicator(src, repo, interval="200ms")
        time.sleep(2)
        c = sqlite3.connect(src, isolation_level=None)
        _commit(c, range(101, 111))
        c.close()
        time.sleep(1.5)
    finally:
        code, err = _finish(rep)
    assert code == 0, err
    out = tmp_path / "b" / "r.db"
    assert cli("restore", "--repo", repo, "--db", "app", "--to", out).returncode == 0
    assert restored_seq(out)[:2] == (110, 110)
