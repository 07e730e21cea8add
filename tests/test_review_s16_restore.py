"""Findings of session 16's bug hunt on the recovery side (an on-call engineer at 3 a.m.), each a test that
failed before its fix: restore targets that are not regular files (a FIFO hung the restore past Ctrl-C),
`--to folder/` made a file, a non-SQLite file replaced without a word, a failed `restore --force` left
safety snapshots unsaid, and TEXT that is not valid UTF-8 stopped `sql`, `repair-rows` and `last-good`
with an unexpected error."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dbre.repository.repo import Repository
from tests.dbfactory import (
    assert_one_line_error,
    backed_up_db,
    cli,
    pack_files,
    run_dbre,
    sql_file,
    tree_hashes,
)


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path]:
    return backed_up_db(tmp_path)


def _safety_snapshots(repo: Path) -> list[str]:
    return [m.id for m in Repository.open(str(repo)).snapshots("app") if "safety" in m.tags]


def test_a_fifo_target_is_refused_at_once(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    """Before: `restore --force` onto a named pipe hung in its first open, past Ctrl-C."""
    _, repo = backed_up
    fifo = tmp_path / "target.db"
    os.mkfifo(fifo)
    for extra in (["--force"], ["--force", "--no-safety-snapshot"]):
        result = run_dbre("restore", "--repo", repo, "--db", "app", "--to", fifo, *extra, timeout=60)
        assert_one_line_error(result, 2, "not a regular file", "named pipe")
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "repo", "target.db"]


def test_a_target_ending_in_a_slash_is_no_file(backed_up: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `--to restored/` (no such folder) restored a file named `restored`, exit 0; export did the same."""
    _, repo = backed_up
    monkeypatch.chdir(tmp_path)
    result = cli("restore", "--repo", repo, "--db", "app", "--to", "restored/")
    assert_one_line_error(result, 2, "names a folder")
    result = cli("export", "--repo", repo, "--db", "app", "--table", "t", "--format", "csv", "--out=newd/")
    assert_one_line_error(result, 2, "names a folder")
    assert not (tmp_path / "restored").exists() and not (tmp_path / "newd").exists()
    # a folder that exists is still a fine place for a file named in it
    (tmp_path / "out").mkdir()
    assert cli("restore", "--repo", repo, "--db", "app", "--to", "out/x.db").returncode == 0


def test_a_target_in_a_file_says_it_is_a_file(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    """Before: "restore target folder .../afile does not exist (create it first)": it exists, as a file."""
    _, repo = backed_up
    (tmp_path / "afile").write_text("x")
    result = cli("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "afile" / "x.db")
    assert_one_line_error(result, 2, "is a file, not a folder")
    result = cli("export", "--repo", repo, "--db", "app", "--table", "t", "--format", "csv", "--out",
                 tmp_path / "afile" / "x.csv")
    assert_one_line_error(result, 2, "is a file, not a directory")


def test_a_file_that_is_not_sqlite_is_not_replaced_silently(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    """Before: `restore --force` over 64 KiB of another program's bytes (an SQLCipher database looks so)
    replaced them with no safety snapshot and no word."""
    _, repo = backed_up
    target = tmp_path / "live.db"
    target.write_bytes(os.urandom(65536))
    before = tree_hashes(repo, target)
    result = cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force")
    assert_one_line_error(result, 1, "not an SQLite database", "--no-safety-snapshot", "nothing was changed")
    assert tree_hashes(repo, target) == before
    assert cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force",
               "--no-safety-snapshot").returncode == 0
    assert target.read_bytes()[:16] == b"SQLite format 3\0"
    # an empty file holds nothing to keep: replaced as before
    empty = tmp_path / "empty.db"
    empty.touch()
    assert cli("restore", "--repo", repo, "--db", "app", "--to", empty, "--force").returncode == 0


def test_a_restore_that_cannot_fit_adds_no_safety_snapshot(backed_up: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: each `restore --force` onto a full disk stored a safety snapshot, then failed. The file
    system's free space is what statvfs says (reported small here: a unit test above the file system)."""
    src, repo = backed_up
    target = tmp_path / "live.db"
    target.write_bytes(src.read_bytes())
    real = os.statvfs

    class Small:
        def __init__(self, path: Any) -> None:
            self.f_frsize, self.f_bavail, self.f_blocks = real(path).f_frsize, 2, real(path).f_blocks

    import dbre.restore.full as full

    monkeypatch.setattr(full.os, "statvfs", Small)
    before = tree_hashes(repo, target)
    result = cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force")
    assert_one_line_error(result, 1, "disk full", "bytes needed", "nothing was changed")
    assert tree_hashes(repo, target) == before and _safety_snapshots(repo) == []


def test_a_failed_restore_says_its_safety_snapshot_stays(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    """A damaged pack is found only while reading: the safety snapshot was taken by then, and the error says so."""
    src, repo = backed_up
    target = tmp_path / "live.db"
    target.write_bytes(src.read_bytes())
    with sqlite3.connect(target) as conn:
        conn.execute("CREATE TABLE mine(x)")  # (other pages than the snapshot's: a safety snapshot of its own)
    conn.close()
    pack = max(pack_files(repo), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[len(data) // 3] ^= 0xFF
    pack.write_bytes(bytes(data))
    before = target.read_bytes()
    result = cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force")
    (safety,) = _safety_snapshots(repo)
    assert_one_line_error(result, 1, f"the safety snapshot {safety}", "kept 7 days")
    assert target.read_bytes() == before


@pytest.fixture
def legacy_text(tmp_path: Path) -> tuple[Path, Path]:
    """A database with a TEXT value that is not valid UTF-8, backed up."""
    src = sql_file(tmp_path / "u.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)",
                   "INSERT INTO t VALUES (1, CAST(x'ff6869' AS TEXT)), (2, 'ok')")
    repo = tmp_path / "repo"
    assert cli("backup", src, "--repo", repo, "--db", "u").returncode == 0
    return src, repo


def test_text_that_is_not_utf8_is_one_line_with_the_way_round(legacy_text: tuple[Path, Path], tmp_path: Path) -> None:
    """Before: "unexpected error: UnicodeDecodeError" from sql, repair-rows and last-good; repair-rows now
    repairs such a row (tests/test_review_s16_cold.py: one damaged in the live database)."""
    src, repo = legacy_text
    result = cli("sql", "--repo", repo, "--db", "u", "SELECT * FROM t")
    assert_one_line_error(result, 1, "not valid UTF-8", "CAST(column AS BLOB)")
    ok = cli("sql", "--repo", repo, "--db", "u", "SELECT id, hex(name) FROM t ORDER BY id")
    assert ok.returncode == 0 and "FF6869" in ok.stdout, ok
    live = tmp_path / "live.db"
    live.write_bytes(src.read_bytes())
    with sqlite3.connect(live) as conn:
        conn.execute("DELETE FROM t WHERE id = 1")
    conn.close()
    # repair-rows reads such a row's text as its bytes: the row comes back as it was stored
    result = cli("repair-rows", "--repo", repo, "--db", "u", "--live", live, "--table", "t", "--where", "id = 1",
                 "--apply")
    assert result.returncode == 0 and "inserted 1" in result.stdout, result
    with sqlite3.connect(live) as conn:
        assert conn.execute("SELECT typeof(name), hex(name) FROM t WHERE id = 1").fetchone() == ("text", "FF6869")
    conn.close()
    result = cli("last-good", "--repo", repo, "--db", "u", "--check", "SELECT name FROM t WHERE id = 1")
    assert_one_line_error(result, 1, "check 1", "not valid UTF-8")


def test_a_blob_literal_in_where_is_a_where_like_any(tmp_path: Path) -> None:
    """Before: `--where "id = x'9f3c01'"` (a blob key) gave "unexpected error: UnicodeDecodeError" from the
    EXPLAIN that checks the WHERE."""
    src = sql_file(tmp_path / "b.db", "CREATE TABLE u(id BLOB PRIMARY KEY, name TEXT) WITHOUT ROWID",
                   "INSERT INTO u VALUES (x'9f3c01', 'alice'), (x'41', 'bob')")
    repo = tmp_path / "repo"
    assert cli("backup", src, "--repo", repo, "--db", "b").returncode == 0
    with sqlite3.connect(src) as conn:
        conn.execute("UPDATE u SET name = 'mallory' WHERE id = x'9f3c01'")
    conn.close()
    result = cli("repair-rows", "--repo", repo, "--db", "b", "--live", src, "--table", "u",
                 "--where", "id = x'9f3c01'", "--apply")
    assert result.returncode == 0, result
    with sqlite3.connect(src) as conn:
        assert conn.execute("SELECT name FROM u ORDER BY id").fetchall() == [("bob",), ("alice",)]
    conn.close()


def test_an_empty_required_option_does_not_speak_of_a_default(backed_up: tuple[Path, Path]) -> None:
    _, repo = backed_up
    result = run_dbre("restore", "--repo", repo, "--db", "app", "--to", "")
    line = assert_one_line_error(result, 2, "--to is empty")
    assert "leave it out" not in line


def test_a_link_put_in_place_after_the_last_check_is_not_followed(backed_up: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The old database is opened to be held with SQLITE_OPEN_NOFOLLOW when it was no link at the check: a
    link swapped in between (to a file SQLite would write into) is refused, and what it points at untouched."""
    import dbre.restore.full as full

    src, repo = backed_up
    target, victim = tmp_path / "live.db", tmp_path / "victim.db"
    target.write_bytes(src.read_bytes())
    victim.write_bytes(src.read_bytes())
    before = victim.read_bytes()
    checked = full._still_a_file

    def swap_after_check(path: Path) -> None:
        checked(path)
        if path == target and not path.is_symlink():
            path.unlink()
            path.symlink_to(victim)

    monkeypatch.setattr(full, "_still_a_file", swap_after_check)
    plan = full.plan_restore(Repository.open(str(repo)), "app", target, force=True, safety=False)
    with pytest.raises(full.RestoreError, match="could not be opened to hold it still"):
        full.apply_restore(Repository.open(str(repo)), plan)
    assert victim.read_bytes() == before and target.is_symlink()
