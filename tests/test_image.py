"""The direct page reader (dbre.sources.image): exactly the reader's transaction, or a fallback.

Each test holds a writer connection open in this process or another, so that the WAL keeps
frames that are not yet in the database file, then checks the snapshot byte for byte: after a
full checkpoint the source file *is* the snapshot, so the restored file must equal it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import apsw
import pytest

import dbre.sources.image as image_mod
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.image import ImageSession
from dbre.sources.local import LocalFileSource
from tests.dbfactory import assert_same_db, integrity, query


def _wal_db(path: Path, rows: int = 2000, page_size: int = 4096) -> apsw.Connection:
    """A WAL database whose writer connection stays open (so the WAL is not checkpointed away).

    The writer uses apsw's SQLite, like dbre: two SQLite libraries in one process do not see
    each other's POSIX locks, and one would checkpoint under the other's feet when it closes.
    """
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # nothing reaches the file until we say so
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    conn.execute("CREATE INDEX t_v ON t(v)")
    conn.executemany("INSERT INTO t(v, b) VALUES (?, randomblob(300))", [(f"row {i}",) for i in range(rows)])
    return conn


def _restore(repo: Repository, db: str, snap: str, to: Path) -> Path:
    apply_restore(repo, plan_restore(repo, db, to, snapshot=snap))
    return to


def _checkpointed_copy(conn: apsw.Connection, src: Path, to: Path) -> bytes:
    """The source's bytes once every WAL frame is in the file."""
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    data = src.read_bytes()
    to.write_bytes(data)
    return data


def test_wal_frames_beyond_the_file_are_read_from_the_wal(tmp_path: Path) -> None:
    src = tmp_path / "live.db"
    conn = _wal_db(src)
    # the file on disk holds only the header page: every other page lives in the WAL
    assert src.stat().st_size <= 4096
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src), "live")
    stats = result.manifest.stats
    assert stats["read"] == "direct"
    assert stats["wal_pages"] >= result.manifest.page_count - 1
    restored = _restore(repo, "live", result.manifest.id, tmp_path / "restored.db")
    assert integrity(restored) == "ok"
    expected = _checkpointed_copy(conn, src, tmp_path / "expected.db")
    assert restored.read_bytes() == expected  # every page, header included
    conn.close()


def test_later_commits_are_not_in_the_snapshot(tmp_path: Path) -> None:
    """Frames appended after the read transaction began stay out, though they are in the WAL."""
    src = tmp_path / "live.db"
    conn = _wal_db(src)
    source = LocalFileSource(src)
    with source.connect() as c:
        session = ImageSession()
        try:
            session.begin(c)
            image = session.image()
            assert image is not None, session.reason
            count_before = session.page_count
            # a writer commits after the snapshot began: new pages and new versions of old ones
            conn.executemany("INSERT INTO t(v, b) VALUES (?, randomblob(900))", [(f"late {i}",) for i in range(500)])
            conn.execute("UPDATE t SET v = 'changed' WHERE id <= 50")
            assert image.page_count == count_before
            frames_now = (Path(str(src) + "-wal").stat().st_size - 32) // (24 + 4096)
            assert frames_now > len(image.overlay)
            pages = b"".join(image.view(i) for i in range(image.page_count))
        finally:
            if c.in_transaction:
                c.execute("COMMIT")
    session.close()  # after the connection is closed: see the module doc on POSIX locks
    snap = tmp_path / "snap.db"
    snap.write_bytes(pages)
    assert integrity(snap) == "ok"
    assert query(snap, "SELECT count(*) FROM t WHERE v LIKE 'late %'") == [(0,)]
    assert query(snap, "SELECT count(*) FROM t WHERE v = 'changed'") == [(0,)]
    assert query(snap, "SELECT count(*) FROM t") == [(2000,)]
    conn.close()


def test_a_database_that_shrank_in_the_wal(tmp_path: Path) -> None:
    """After DELETE + VACUUM in WAL mode the file is longer than the snapshot: only page_count pages."""
    src = tmp_path / "live.db"
    conn = _wal_db(src, rows=3000)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    big = src.stat().st_size
    conn.execute("DELETE FROM t WHERE id > 200")
    conn.execute("VACUUM")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src), "live")
    assert result.manifest.stats["read"] == "direct"
    assert result.manifest.page_count * 4096 < big == src.stat().st_size
    restored = _restore(repo, "live", result.manifest.id, tmp_path / "restored.db")
    assert integrity(restored) == "ok"
    assert restored.read_bytes() == _checkpointed_copy(conn, src, tmp_path / "expected.db")
    conn.close()


@pytest.mark.parametrize("page_size", [512, 65536])
def test_incremental_over_wal_frames(tmp_path: Path, page_size: int) -> None:
    src = tmp_path / "live.db"
    conn = _wal_db(src, rows=1500, page_size=page_size)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = backup(repo, LocalFileSource(src), "live")
    conn.execute("UPDATE t SET v = v || '!' WHERE id % 97 = 0")
    second = backup(repo, LocalFileSource(src), "live")
    assert second.manifest.stats["read"] == "direct"
    assert 0 < second.pages_added < first.pages_added
    restored = _restore(repo, "live", second.manifest.id, tmp_path / "restored.db")
    assert restored.read_bytes() == _checkpointed_copy(conn, src, tmp_path / "expected.db")
    assert_same_db(src, restored)
    conn.close()


def test_rollback_journal_source_is_read_directly(tmp_path: Path) -> None:
    src = tmp_path / "live.db"
    conn = apsw.Connection(str(src))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.executemany("INSERT INTO t(v) VALUES (randomblob(700))", [()] * 500)
    conn.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src), "live")
    assert result.manifest.stats["read"] == "direct"
    assert result.manifest.stats["wal_pages"] == 0
    restored = _restore(repo, "live", result.manifest.id, tmp_path / "restored.db")
    assert restored.read_bytes() == src.read_bytes()


HOLD_WRITE_LOCK = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO t(v) VALUES ('uncommitted')")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


def test_a_held_write_lock_falls_back_to_the_backup_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long write transaction elsewhere: after LOCK_WAIT the backup API takes the snapshot."""
    src = tmp_path / "live.db"
    _wal_db(src, rows=300).close()
    monkeypatch.setattr(image_mod, "LOCK_WAIT", 0.2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(src)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        repo = Repository.open_or_init(str(tmp_path / "repo"))
        started = time.monotonic()
        result = backup(repo, LocalFileSource(src), "live")
        assert time.monotonic() - started < 10
        read = result.manifest.stats["read"]
        assert read.startswith("backup API") and "write lock" in read, read
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=10)
    restored = _restore(repo, "live", result.manifest.id, tmp_path / "restored.db")
    assert query(restored, "SELECT count(*) FROM t WHERE v = 'uncommitted'") == [(0,)]
    assert_same_db(src, restored)


def test_the_reader_keeps_its_locks_while_pages_are_read(tmp_path: Path) -> None:
    """Opening and closing descriptors of the source drops the process's POSIX locks; the session
    keeps its own open until the end, so another process cannot checkpoint over the snapshot."""
    src = tmp_path / "live.db"
    conn = _wal_db(src, rows=800)
    session = ImageSession()
    reader = apsw.Connection(str(src))
    session.begin(reader)
    image = session.image()
    assert image is not None, session.reason
    before = b"".join(image.view(i) for i in range(image.page_count))
    # another process writes and tries a full checkpoint: our read mark must stop it short
    script = ("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0.5);"
              "c.execute(\"UPDATE t SET v='other'\");"
              "print(c.execute('PRAGMA wal_checkpoint(RESTART)').fetchone()[0])")
    out = subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"  # busy: the checkpoint could not restart the WAL under us
    after = b"".join(image.view(i) for i in range(image.page_count))
    assert after == before
    reader.execute("COMMIT")
    reader.close()
    session.close()
    conn.close()


@pytest.mark.parametrize("direct", [True, False])
def test_progress_is_reported_on_both_paths(tmp_path: Path, direct: bool) -> None:
    """A long backup moves its progress bar whichever way the pages are read."""
    src = tmp_path / "live.db"
    _wal_db(src, rows=9000, page_size=512).close()  # ~9000 pages of 512 bytes
    calls: list[tuple[int, int]] = []
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src), "live", direct=direct, progress=lambda d, t: calls.append((d, t)))
    total = result.manifest.page_count
    assert total > 8192
    assert result.manifest.stats["read"].startswith("direct" if direct else "backup API")
    assert len(calls) >= 2 and calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] < total
