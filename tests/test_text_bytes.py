"""TEXT that is not valid UTF-8 (SQLite stores what it is given): backed up with table checksums,
restored byte for byte, and the drill's checksum comparison passes (it crashed with a
UnicodeDecodeError before)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dbre.repository.repo import Repository
from tests.dbfactory import cli, sqldiff


def test_invalid_utf8_text_is_backed_up_checksummed_and_drilled(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT)")
    c.execute("INSERT INTO t VALUES (1, CAST(x'66ff6f' AS TEXT)), (2, 'ok'), (3, CAST(x'c3' AS TEXT))")
    c.commit()
    c.close()
    repo = tmp_path / "repo"
    done = cli("backup", db, "--repo", repo, "--checksums")
    assert done.returncode == 0, done
    m = Repository.open(str(repo)).find_snapshot("bad")
    rows, checksum = m.tables["t"].rows, m.tables["t"].checksum
    assert rows == 3 and checksum
    out = tmp_path / "out.db"
    assert cli("restore", "--repo", repo, "--db", "bad", "--to", out).returncode == 0
    assert sqldiff(db, out) == ""
    drill = cli("drill", "--repo", repo, "--db", "bad")
    assert drill.returncode == 0, drill
