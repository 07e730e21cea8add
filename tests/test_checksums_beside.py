"""A first (or --full) backup computes its table checksums on a thread of its own while the sink
stores the pages (``backup._checksums_beside``), in the same read transaction: the same counts,
checksums and per-leaf partial sums as computed after the copy; a copy that fails stops and waits
for the checksums and stores nothing; a checksum that fails fails the backup as before. And dbre
turns SQLite's memory statistics off on import (their one process-wide mutex serialised the two)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import apsw
import pytest

import dbre.repository.backup as backup_mod
from dbre.errors import SourceError
from dbre.repository.backup import backup, load_page_sums
from dbre.repository.repo import Repository
from dbre.repository.sink import PageSink
from dbre.sources.local import LocalFileSource


def _source(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB, s TEXT, r REAL)")
    con.execute("CREATE TABLE u(k TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID")
    con.executemany("INSERT INTO t VALUES (?, randomblob(300 + ? % 900), ?, ?)",
                    ((i, i, f"row {i}", i / 7) for i in range(20_000)))
    con.executemany("INSERT INTO u VALUES (?, ?)", ((f"k{i}", i) for i in range(3000)))
    con.commit()
    con.execute("INSERT INTO t(v) VALUES (zeroblob(9000))")  # (a row with overflow pages, in the WAL)
    con.commit()
    con.close()
    return path


def test_checksums_beside_the_copy_are_the_ones_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _source(tmp_path / "src.db")
    beside = Repository.open_or_init(str(tmp_path / "beside"))
    m1 = backup(beside, LocalFileSource(str(src)), "db", checksums=True).manifest
    ran: list[str] = []
    original = backup_mod._checksums_beside

    def after(*a: object) -> None:
        ran.append("asked")
        return None  # (the caller then computes them after the copy, as an incremental does)

    monkeypatch.setattr(backup_mod, "_checksums_beside", after)
    seq = Repository.open_or_init(str(tmp_path / "after"))
    m2 = backup(seq, LocalFileSource(str(src)), "db", checksums=True).manifest
    assert ran == ["asked"]
    assert {k: (v.rows, v.checksum) for k, v in m1.tables.items()} == \
        {k: (v.rows, v.checksum) for k, v in m2.tables.items()}
    assert m1.tables["t"].rows == 20_001 and m1.tables["u"].rows == 3000 and m1.tables["t"].checksum
    assert load_page_sums(beside, m1) == load_page_sums(seq, m2) is not None
    assert original is not after
    # an incremental of the same source, beside nothing (its sums follow the sink's marks)
    calls: list[object] = []
    monkeypatch.setattr(backup_mod, "_checksums_beside", lambda *a: calls.append(a))
    m3 = backup(beside, LocalFileSource(str(src)), "db", checksums=True).manifest
    assert calls == [] and m3.tables["t"].checksum == m1.tables["t"].checksum


def test_a_copy_that_fails_stops_the_checksums_and_stores_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink fails while the checksums run: the backup raises the sink's error (not the
    interruption), after the checksum thread ended; no snapshot, the connection closed."""
    src = _source(tmp_path / "src.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    started = threading.Event()
    original = backup_mod.table_stats

    def slow_stats(conn: apsw.Connection, *a: object, **kw: object) -> object:
        started.set()
        for _ in range(1000):  # SQLite work (~25 s) the interruption cuts short
            conn.execute("SELECT count(*) FROM t, (SELECT 1 FROM u LIMIT 50)").fetchall()
        return original(conn, *a, **kw)  # type: ignore[arg-type]

    def failing_feed(self: PageSink, image: object) -> None:
        assert started.wait(10)
        time.sleep(0.05)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_mod, "table_stats", slow_stats)
    monkeypatch.setattr(PageSink, "feed", failing_feed)
    began = time.monotonic()
    with pytest.raises(OSError, match="No space left"):
        backup(repo, LocalFileSource(str(src)), "db", checksums=True)
    assert time.monotonic() - began < 10  # (interrupted, not waited out)
    assert not [t for t in threading.enumerate() if t.name.startswith("dbre-checksums")]
    assert repo.snapshots("db") == []
    monkeypatch.undo()
    assert backup(repo, LocalFileSource(str(src)), "db", checksums=True).manifest.tables["t"].rows == 20_001


def test_a_checksum_that_fails_fails_the_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite failing inside the checksum thread: the backup's usual one-line error, nothing stored."""
    src = _source(tmp_path / "src.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))

    def broken(*a: object, **kw: object) -> None:
        raise apsw.CorruptError("database disk image is malformed")

    monkeypatch.setattr(backup_mod, "table_stats", broken)
    with pytest.raises(SourceError, match="SQLite could not read the source .database disk image is malformed"):
        backup(repo, LocalFileSource(str(src)), "db", checksums=True)
    assert repo.snapshots("db") == []


def test_dbre_turns_sqlite_memory_statistics_off() -> None:
    """In a process of its own: after `import dbre` SQLite counts no memory (the statistics, and their
    mutex, are off); without it, apsw's SQLite counts every allocation."""
    probe = ("import apsw\n{imp}c = apsw.Connection(':memory:')\nc.execute('CREATE TABLE u(x)')\n"
             "for _ in range(50): c.execute('INSERT INTO u VALUES (randomblob(2000))')\n"
             "print(apsw.status(apsw.SQLITE_STATUS_MEMORY_USED)[0])\n")
    with_dbre = subprocess.run([sys.executable, "-c", probe.format(imp="import dbre\n")],
                               capture_output=True, text=True, check=True, timeout=60)
    without = subprocess.run([sys.executable, "-c", probe.format(imp="")],
                             capture_output=True, text=True, check=True, timeout=60)
    assert int(with_dbre.stdout) == 0 and int(without.stdout) > 50_000, (with_dbre.stdout, without.stdout)


def test_a_backup_called_while_the_caller_handles_an_exception_keeps_its_checksums(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller inside an ``except`` block (a retry, a fallback) has an exception being handled all
    along: the copy must still let its checksums finish (a check of "is an exception in flight" there
    interrupted them, and the backup failed)."""
    src = _source(tmp_path / "src.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    original = backup_mod.table_stats

    def slow_stats(conn: apsw.Connection, *a: object, **kw: object) -> object:
        for _ in range(40):  # (still running SQL when the copy ends)
            conn.execute("SELECT count(*) FROM t, (SELECT 1 FROM u LIMIT 50)").fetchall()
        return original(conn, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(backup_mod, "table_stats", slow_stats)
    try:
        raise LookupError("the caller's own, being handled")
    except LookupError:
        m = backup(repo, LocalFileSource(str(src)), "db", checksums=True).manifest
    assert m.tables["t"].rows == 20_001 and m.tables["t"].checksum and m.tables["u"].checksum
