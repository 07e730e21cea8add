"""Cold review of 3be9d3e (session 12): a backup whose table checksums carry partial sums over
tells unchanged pages by the keyed hash in the sink (``PageSink.keyed_same``), and the table
checksums trust ``same[]`` without hashing any page again (``Prior.verified`` is None).

Every test uses a real SQLite file and a real local repository. What each snapshot records must be
what a from-scratch ``table_stats`` gives on the source (``fresh_stats``), and it must restore byte
for byte. The crafted pages are real xxh3-128 collisions (the construction of
tests/test_review_s10_checksum.py: two lanes of one 1 KiB block changed so that every accumulator
stays as it was), written at page offsets 128 and 192 of a value's bytes.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import apsw
import pytest
import xxhash

from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository, pack_key
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.validate.checks import equivalence_check, failed
from tests.checksums import CountingHash, fresh_stats, recorded, run_sql
from tests.dbfactory import change_rows, make_db

DB = "db"
PS = 1024  # page size of the crafted databases: one page is one xxh3 block (stripes 2 and 3 below)
# XXH3's default secret, bytes 16..31 (public), as in tests/test_review_s10_checksum.py
_SECRET_16_32 = bytes.fromhex("ded46de9839097db7240a4a4b7b3671f")


def _lane(key: bytes, high: int) -> bytes:
    return (high << 32 | int.from_bytes(key[:4], "little")).to_bytes(8, "little")


class Crafted:
    """A rollback-journal database with a table of small rows and one row holding a random blob
    ``value``; ``page`` is the page of that table whose bytes 128..199 lie inside the blob (its leaf
    when the blob is stored inline, else one of its overflow pages). ``patch(h1, h2)`` writes page
    bytes 128..135 and 192..199 (stripes 2 and 3, lane 0): with h1 + h2 constant the page's
    xxh3-128 stays the same while the blob's bytes change."""

    def __init__(self, path: Path, *, without_rowid: bool = False) -> None:
        self.path = path
        blob = random.Random(5).randbytes(950)
        con = sqlite3.connect(path)
        con.execute(f"PRAGMA page_size={PS}")
        suffix = " WITHOUT ROWID" if without_rowid else ""
        con.execute(f"CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB){suffix}")
        con.execute("CREATE TABLE other(id INTEGER PRIMARY KEY, w TEXT)")
        con.executemany("INSERT INTO t VALUES (?, ?, NULL)", [(i, f"row {i} " + "x" * 40) for i in range(2000)])
        con.executemany("INSERT INTO other VALUES (?, ?)", [(i, f"o{i}" * 5) for i in range(500)])
        con.execute("INSERT INTO t VALUES (1000000, 'big', ?)", (blob,))  # (alone on the last leaf)
        con.commit()
        pages = [p for (p,) in con.execute("SELECT pageno FROM dbstat WHERE name = 't'")]
        con.close()
        found = [p for p in pages if blob.find(self._read(p)[128:200]) >= 0]
        assert len(found) == 1, found
        self.page = found[0]
        self.patch(1000, 2000)

    def _read(self, page: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek((page - 1) * PS)
            return f.read(PS)

    def kind(self) -> str:
        con = sqlite3.connect(self.path)
        try:
            (kind,) = con.execute("SELECT pagetype FROM dbstat WHERE pageno = ?", (self.page,)).fetchone()
        finally:
            con.close()
        return str(kind)

    def xxh3(self) -> bytes:
        return xxhash.xxh3_128_digest(self._read(self.page))

    def patch(self, h1: int, h2: int) -> None:
        """The blob's bytes at page offsets 128 and 192, written in place (as an application
        patching an upload through incremental blob I/O writes them: only those bytes change)."""
        with open(self.path, "r+b") as f:
            f.seek((self.page - 1) * PS + 128)
            f.write(_lane(_SECRET_16_32[0:8], h1))
            f.seek((self.page - 1) * PS + 192)
            f.write(_lane(_SECRET_16_32[8:16], h2))

    def collide(self) -> None:
        """Change the blob, keep the page's xxh3."""
        before, old = self.xxh3(), self._read(self.page)
        self.patch(1001, 1999)
        assert self._read(self.page) != old and self.xxh3() == before


def _backup(repo: Repository, src: Path, **kw: object) -> Manifest:
    return backup(repo, LocalFileSource(src), DB, **kw).manifest  # type: ignore[arg-type]


def _restore(repo: Repository, m: Manifest, to: Path) -> bytes:
    apply_restore(repo, plan_restore(repo, m.db, to, snapshot=m.id))
    return to.read_bytes()


def _validates(path: Path, m: Manifest) -> list[str]:
    conn = apsw.Connection(str(path))
    try:
        return [f"{r.table}: {r.detail}" for r in failed(equivalence_check(conn, m))]
    finally:
        conn.close()


def _right(repo: Repository, m: Manifest, src: Path, to: Path) -> None:
    """The snapshot records the source's rows and restores byte for byte, and its restore validates."""
    assert recorded(m) == fresh_stats(src)
    assert _restore(repo, m, to) == src.read_bytes()
    assert _validates(to, m) == []


# -- the crafted page, in a backup that carries checksums ------------------------------------------


@pytest.mark.parametrize("without_rowid", [False, True], ids=["rowid-leaf", "without-rowid-overflow"])
def test_a_crafted_page_alone_is_stored_and_its_table_read(tmp_path: Path, without_rowid: bool) -> None:
    """The crafted page is the only change in the whole database (no other leaf, no other table):
    a rowid table's leaf (its partial sum is not kept: ``_summed_by_page`` reads ``same``) and a
    WITHOUT ROWID table's overflow page (the whole-table reuse of ``reusable``, which now asks only
    ``same``). The sink stores the page, the table is read again, the other table is kept."""
    db = Crafted(tmp_path / "live.db", without_rowid=without_rowid)
    assert db.kind() == ("overflow" if without_rowid else "leaf")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = _backup(repo, db.path)
    assert recorded(first) == fresh_stats(db.path)
    db.collide()
    second = backup(repo, LocalFileSource(db.path), DB)
    assert second.pages_added >= 1  # (the crafted page; page 1 did not change: written behind SQLite's back)
    m = second.manifest
    assert recorded(m) != recorded(first)
    _right(repo, m, db.path, tmp_path / "out.db")
    if not without_rowid:
        assert m.stats["checksum_leaves"]["read"] == 1, m.stats["checksum_leaves"]  # that leaf alone
    assert "other" in m.tables and m.stats["tables_reused"] >= 1  # (the untouched table was kept)
    # the chain goes on: the crafted state is the parent's now, and a change back is seen too
    db.patch(1000, 2000)
    third = _backup(repo, db.path)
    _right(repo, third, db.path, tmp_path / "out3.db")
    assert recorded(third) == recorded(first)
    assert verify(repo, read_data=True).ok


# -- the fast runs' residual where checksums are on but the parent lends nothing -----------------


def _parent_that_lends_nothing(how: str, db: Crafted, repo: Repository, tmp_path: Path) -> Path:
    """A first snapshot whose checksums the next backup does not carry over, then the crafted
    change; returns the source the next backups read. "backup-api": the first snapshot was read
    through SQLite's backup API (no ``checksum_basis``: the first direct backup after it keeps
    nothing). "new-source": the database moved (a copy elsewhere, ``accept_new_source``): the next
    backup carries nothing over, but its sink still dedups against the old source's snapshot."""
    if how == "backup-api":
        first = _backup(repo, db.path, direct=False)
        assert first.checksum_basis is None and recorded(first) == fresh_stats(db.path)
        db.collide()
        return db.path
    first = _backup(repo, db.path)
    assert recorded(first) == fresh_stats(db.path)
    moved = tmp_path / "moved" / "live.db"
    moved.parent.mkdir()
    shutil.copyfile(db.path, moved)
    db.path = moved
    db.collide()
    return moved


@pytest.mark.parametrize("how", ["backup-api", "new-source"])
def test_with_checksums_on_the_crafted_page_is_stored_whatever_the_parent(tmp_path: Path, how: str) -> None:
    """FORMAT.md (*Threat model*): "A backup that carries table checksums over (on by default up to
    256 MiB) is not fooled ... Above that size, or with --no-checksums, the residual stays." But
    ``keyed_same`` also needs a parent that lends its checksums: the first direct backup after a
    backup-API one (or after an SQLite upgrade, or after --accept-new-source) has checksums on,
    compares xxh3 alone, and keeps the parent's bytes of the crafted page. Its checksum is read from
    the source, so its restore fails validation (detected, not hidden). Fixed (review finding):
    every direct checksums-on backup with a parent keys its sink."""
    db = Crafted(tmp_path / "live.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = _parent_that_lends_nothing(how, db, repo, tmp_path)
    second = _backup(repo, src, accept_new_source=True) if how == "new-source" else _backup(repo, src)
    assert recorded(second) == fresh_stats(src)  # (read from the source: true of the source)
    assert _restore(repo, second, tmp_path / "out.db") == src.read_bytes()


@pytest.mark.parametrize("how", ["backup-api", "new-source"])
def test_a_kept_partial_sum_is_the_rows_of_the_page_kept(tmp_path: Path, how: str) -> None:
    """The snapshot after the one above (same source, so its sink is keyed): the blob is patched
    back, so the page's keyed hash is the parent's record again (the parent kept the old bytes) and
    the leaf keeps the parent's partial sum, which the parent read from the crafted rows. The new
    snapshot stores the right page but records a checksum of rows it does not hold: every restore
    of it fails validation (a false alarm for up to 24 backups, or until that leaf changes). Fixed
    by keying the sink of every direct checksums-on backup that has a parent (what the next one
    carries must rest on the keyed hash), not only of those that carry sums themselves: done."""
    db = Crafted(tmp_path / "live.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = _parent_that_lends_nothing(how, db, repo, tmp_path)
    _backup(repo, src, accept_new_source=True) if how == "new-source" else _backup(repo, src)
    db.patch(1000, 2000)  # back to the bytes the first snapshot stored
    run_sql(src, "UPDATE other SET w = 'busy' WHERE id = 7")
    third = _backup(repo, src)
    assert third.stats["checksum_leaves"]["read"] < third.stats["checksum_leaves"]["of"]  # (it carried sums)
    _right(repo, third, src, tmp_path / "out.db")


# -- parent records that are markers, pages past the parent's end, another page size ---------------


def test_lost_parent_records_are_read_again(tmp_path: Path) -> None:
    """The parent's records into a lost pack are LOST markers (hash all zeros): their pages are
    stored again and their leaves read again (``same`` 0); the pages that kept a live record keep
    their partial sums. The next backup carries the repaired snapshot's sums."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = make_db(tmp_path / "src.db", mb=1.0)
    first = backup(repo, LocalFileSource(src), DB)
    change_rows(src, 20)
    second = backup(repo, LocalFileSource(src), DB)
    (lost,) = first.manifest.packs
    assert lost in second.manifest.packs and all(r.pack != lost for r in second.manifest.runs)
    repo.store.delete(pack_key(lost))
    change_rows(src, 3, seed=5)
    third = _backup(repo, src)
    assert third.stats["missing_packs"] == [lost] and third.stats["repaired_pages"] > 200
    leaves = third.stats["checksum_leaves"]
    assert 0 < leaves["read"] < leaves["of"], leaves  # (the leaves of the second's own pages were kept)
    _right(repo, third, src, tmp_path / "out3.db")
    change_rows(src, 3, seed=6)
    fourth = _backup(repo, src)
    assert "missing_packs" not in fourth.stats
    assert fourth.stats["checksum_leaves"]["read"] <= 3 + fourth.stats.get("repacked_pages", 0)
    _right(repo, fourth, src, tmp_path / "out4.db")


def test_repacked_parent_records_are_read_again(tmp_path: Path) -> None:
    """Records into a sparse pack are REPACK markers in the backup's copy of the parent's page map:
    the page is stored again (densely) and its leaf re-read, never trusted; the snapshot is right."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = make_db(tmp_path / "src.db", mb=1.0)
    _backup(repo, src)
    change_rows(src, 1500, seed=3)  # most pages of the first pack die
    second = _backup(repo, src)
    assert recorded(second) == fresh_stats(src)
    change_rows(src, 2, seed=4)
    third = _backup(repo, src)
    assert third.stats.get("repacked_pages", 0) > 0, third.stats
    leaves = third.stats["checksum_leaves"]
    assert leaves["read"] <= 4 + third.stats["repacked_pages"], leaves
    _right(repo, third, src, tmp_path / "out3.db")
    change_rows(src, 2, seed=8)
    fourth = _backup(repo, src)
    _right(repo, fourth, src, tmp_path / "out4.db")
    assert verify(repo, read_data=True).ok


@pytest.mark.parametrize("shape", ["grow", "shrink", "page-size"])
def test_the_file_changes_shape(tmp_path: Path, shape: str) -> None:
    """Pages past the parent's end (never ``same``), a file VACUUMed smaller, and another page size
    (no parent records at all: ``keyed_same`` off): each snapshot is the source's, and the one after
    carries sums again."""
    src = tmp_path / "live.db"
    con = sqlite3.connect(src)
    con.execute(f"PRAGMA page_size={PS}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                    [(i, f"row {i} " + "x" * 40, b"z" * 1500 if i % 50 == 0 else None) for i in range(3000)])
    con.commit()
    con.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = _backup(repo, src)
    assert recorded(first) == fresh_stats(src)
    con = sqlite3.connect(src, isolation_level=None)
    if shape == "grow":
        con.execute("BEGIN")  # (one commit: autocommit would sync 1000 times)
        con.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, f"new {i}", b"n" * 1200) for i in range(3000, 4000)])
        con.execute("UPDATE t SET v = 'changed' WHERE id = 10")
        con.execute("COMMIT")
    elif shape == "shrink":
        con.execute("DELETE FROM t WHERE id >= 1500")
        con.execute("VACUUM")
    else:
        con.execute("PRAGMA page_size=4096")
        con.execute("VACUUM")
    con.close()
    second = _backup(repo, src)
    _right(repo, second, src, tmp_path / "out2.db")
    run_sql(src, "UPDATE t SET v = 'again' WHERE id = 20")
    third = _backup(repo, src)
    _right(repo, third, src, tmp_path / "out3.db")
    leaves = third.stats["checksum_leaves"]
    assert 1 <= leaves["read"] <= 1 + third.stats.get("repacked_pages", 0) and leaves["of"] > 10, leaves


def test_after_a_full_backup_and_a_backup_api_one(tmp_path: Path) -> None:
    """--full (no parent records: nothing is ``same``) and the backup-API path (``page()``/``add()``,
    ``same`` stays 0, no image: nothing carried), each followed by a direct backup with a crafted
    page: the one after --full carries sums (its parent lends them) and stores the crafted page."""
    db = Crafted(tmp_path / "live.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, db.path)
    run_sql(db.path, "UPDATE other SET w = 'a' WHERE id = 1")
    full = backup(repo, LocalFileSource(db.path), DB, full=True)
    assert full.manifest.stats["full"] == "asked" and "tables_reused" in full.manifest.stats
    _right(repo, full.manifest, db.path, tmp_path / "full.db")
    assert full.manifest.stats["tables_reused"] == 0
    db.collide()
    after = _backup(repo, db.path)
    _right(repo, after, db.path, tmp_path / "after.db")
    assert after.stats["checksum_leaves"]["read"] == 1
    run_sql(db.path, "UPDATE t SET v = 'api' WHERE id = 3")
    api = _backup(repo, db.path, direct=False)
    assert api.stats["read"].startswith("backup API")
    _right(repo, api, db.path, tmp_path / "api.db")


# -- cost: every page keyed once ----------------------------------------------------------------


def test_overflow_pages_and_whole_tables_are_not_hashed_again(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A database of overflow chains (a rowid table with 3 KB blobs: each kept leaf's overflow pages
    were keyed again by ``_summed_by_page`` before) and a WITHOUT ROWID table kept whole (``reusable``):
    the second backup hashes each page once with the keyed hash, plus a few runs."""
    src = tmp_path / "live.db"
    rng = random.Random(9)
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=4096")
    con.execute("CREATE TABLE files(id INTEGER PRIMARY KEY, name TEXT, data BLOB)")
    con.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID")
    con.executemany("INSERT INTO files VALUES (?, ?, ?)", [(i, f"f{i}", rng.randbytes(9000)) for i in range(300)])
    con.executemany("INSERT INTO kv VALUES (?, ?)", [(f"key{i:05d}", rng.randbytes(2000)) for i in range(400)])
    con.commit()
    con.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    run_sql(src, "UPDATE files SET name = 'renamed' WHERE id = 150")
    counter = CountingHash(repo)
    monkeypatch.setattr(Repository, "page_hash", property(lambda self: counter))
    second = _backup(repo, src)
    monkeypatch.undo()
    with sqlite3.connect(src) as c:
        pages = int(c.execute("PRAGMA page_count").fetchone()[0])
    assert pages > 1000
    assert pages <= counter.calls < pages + pages // 16, (counter.calls, pages)
    assert second.stats["checksum_leaves"]["read"] == 1
    assert second.stats["tables_reused"] == 2  # (files: its kept leaves; kv: whole)
    _right(repo, second, src, tmp_path / "out.db")
