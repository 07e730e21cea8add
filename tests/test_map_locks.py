"""A backup's maps of the source never drop another dbre connection's POSIX locks in the same process.

CPython's ``mmap.mmap(fd)`` keeps a ``dup()`` of the descriptor, and closing *any* descriptor of a
file drops every POSIX lock the process holds on it. A WAL-mode connection keeps a shared lock on
the database file while it is open; without it, the application's last connection believes it is
alone when it closes, checkpoints, and deletes -wal and -shm under the connection that lost it (a
replicator, the other thread of the fleet flow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import apsw

from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from dbre.sources.pins import Pin

APP = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("INSERT INTO t VALUES (randomblob(100))")
con.commit()
con.close()  # the last connection of the system checkpoints and deletes -wal and -shm
"""


def test_a_direct_backup_keeps_the_locks_of_another_connection_in_the_process(tmp_path: Path) -> None:
    src = tmp_path / "app.db"
    setup = apsw.Connection(str(src))
    setup.execute("PRAGMA journal_mode=WAL").fetchall()
    setup.execute("CREATE TABLE t (v BLOB)")
    setup.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000) "
                  "INSERT INTO t SELECT randomblob(1000) FROM c")
    setup.close()
    # this process's own connection (a replicator, another thread), pinned as every dbre connection
    # is: dbre's descriptors of the file stay open while it is (dbre.sources.pins)
    pin = Pin(src)
    mine = apsw.Connection(str(src))
    mine.setwalhook(None)  # (no automatic checkpoints of ours)
    assert mine.execute("SELECT count(*) FROM t").fetchone()[0] == 2000
    assert Path(str(src) + "-wal").exists()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src), "app")
    assert result.manifest.stats["read"] == "direct"  # the path that maps the file
    subprocess.run([sys.executable, "-c", APP, str(src)], check=True, timeout=60)
    # our connection still holds its shared lock: the other process's close was not the last one
    assert Path(str(src) + "-wal").exists(), "-wal deleted: the backup dropped this process's locks"
    assert mine.execute("SELECT count(*) FROM t").fetchone()[0] == 2001
    mine.close()
    pin.release()
