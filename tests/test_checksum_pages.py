"""Table checksums version 3 and their per-page partial sums (issue 14: an incremental backup's
checksum work follows what changed).

The checksum is a multiset hash of the rows: the same rows in another layout or order give the
same value, other rows another. A backup that has its parent's page sums reads again only the
leaves that changed, and every value it records equals a from-scratch computation on the source.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

import dbre.repository.backup as backup_mod
from dbre.errors import IntegrityError
from dbre.repository.backup import backup, load_page_sums
from dbre.repository.keep import KeepPolicy
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.retention import forget, prune
from dbre.repository.tables import CHECKSUM_VERSION, PAGE_SUM, table_checksum
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.validate.checks import equivalence_check, failed
from tests.checksums import backup_change_backup, fresh_stats, recorded, run_sql


def _backup(repo: Repository, src: Path, **kw: object) -> Manifest:
    return backup(repo, LocalFileSource(src), "db", **kw).manifest  # type: ignore[arg-type]


def _make(path: Path, rows: int = 3000) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size=1024")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    rnd = random.Random(5)
    con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                    [(i, f"row {i}", rnd.randbytes(3000) if i % 50 == 0 else None) for i in range(rows)])
    con.commit()
    con.close()




def test_the_checksum_is_of_the_rows_not_their_layout_or_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    rows = [(i * 7919 % 10007, f"v{i}", float(i) / 3) for i in range(2000)]
    for path, order in ((a, rows), (b, list(reversed(rows)))):
        con = sqlite3.connect(path)
        con.execute("PRAGMA page_size=512" if path == b else "PRAGMA page_size=4096")
        con.execute("CREATE TABLE t(k INTEGER, v TEXT, f REAL)")  # (no key: rowids follow insertion order)
        con.executemany("INSERT INTO t VALUES (?, ?, ?)", order)
        con.commit()
        con.close()
    assert fresh_stats(a) == fresh_stats(b)
    run_sql(b, "VACUUM")
    assert fresh_stats(a) == fresh_stats(b)
    run_sql(b, "UPDATE t SET v = 'x' WHERE v = 'v5'")
    assert fresh_stats(a)["t"] != fresh_stats(b)["t"]
    # a duplicate row counts twice (a multiset, not a set)
    run_sql(b, "UPDATE t SET v = 'v5' WHERE v = 'x'")
    assert fresh_stats(a) == fresh_stats(b)
    run_sql(a, "INSERT INTO t SELECT * FROM t WHERE v = 'v0'")
    run_sql(b, "INSERT INTO t SELECT * FROM t WHERE v = 'v0'")
    assert fresh_stats(a) == fresh_stats(b)
    run_sql(b, "INSERT INTO t SELECT * FROM t WHERE v = 'v0' LIMIT 1")
    assert fresh_stats(a)["t"][1] != fresh_stats(b)["t"][1]


def test_an_incremental_reads_only_the_leaves_that_changed(tmp_path: Path) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = _backup(repo, src)
    assert first.stats["checksum_version"] == CHECKSUM_VERSION == 3
    leaves = first.stats["checksum_leaves"]
    assert leaves["read"] == leaves["of"] > 20
    assert recorded(first) == fresh_stats(src)
    run_sql(src, "UPDATE t SET v = 'changed' WHERE id IN (10, 2500)")
    second = _backup(repo, src)
    assert second.stats["checksum_leaves"] == {"read": 2, "of": leaves["of"]}
    assert recorded(second) == fresh_stats(src) != recorded(first)
    # nothing changed: nothing read, and the page sums' runs are the parent's
    third = _backup(repo, src)
    assert third.stats["checksum_leaves"]["read"] == 0
    assert third.stats["checksum_pages"] == second.stats["checksum_pages"]
    assert recorded(third) == recorded(second)


def test_a_blob_written_in_place_rereads_its_leaf(tmp_path: Path) -> None:
    """Incremental blob I/O changes only overflow pages; the leaf that owns them is read again."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    con = apsw.Connection(str(src))
    with con.blob_open("main", "t", "b", 100, True) as blob:
        blob.seek(2000)
        blob.write(b"\x01" * 500)
    con.close()
    m = _backup(repo, src)
    assert m.stats["checksum_leaves"]["read"] == 1
    assert recorded(m) == fresh_stats(src)


@pytest.mark.parametrize("columns", [
    "rowid TEXT, v TEXT",  # rowid hidden: read through _rowid_
    "rowid TEXT, _rowid_ TEXT, oid TEXT, v TEXT",  # all three hidden: the table is read whole
])
def test_tables_whose_columns_hide_the_rowid(tmp_path: Path, columns: str) -> None:
    src = tmp_path / "live.db"
    con = sqlite3.connect(src)
    con.execute(f"CREATE TABLE h({columns})")
    names = [c.split()[0] for c in columns.split(", ")]
    con.executemany(f"INSERT INTO h VALUES ({', '.join('?' * len(names))})",
                    [tuple(f"{n}{i}" for n in names) for i in range(2000)])
    con.commit()
    con.close()
    _, second = backup_change_backup(tmp_path / "repo", src, "UPDATE h SET v = 'new' WHERE v = 'v1500'")
    hidden = len(names) == 4
    assert ("checksum_leaves" in second.stats) is not hidden


def test_extreme_and_negative_rowids(tmp_path: Path) -> None:
    src = tmp_path / "live.db"
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=512")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    ids = [-(2**63), -(2**63) + 1, -5, 0, 1, 2**62, 2**63 - 2, 2**63 - 1, *range(100, 1500)]
    con.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"value {i} " + "x" * 40) for i in ids])
    con.commit()
    con.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    assert recorded(_backup(repo, src)) == fresh_stats(src)
    for rowid in (-(2**63), 2**63 - 1, 700):
        run_sql(src, "UPDATE t SET v = 'changed' WHERE id = ?", rowid)
        m = _backup(repo, src)
        # the changed leaf, and any whose parent record is being repacked (its keyed hash is not
        # at hand then: read again rather than trusted)
        assert 1 <= m.stats["checksum_leaves"]["read"] <= 1 + m.stats.get("repacked_pages", 0)
        assert recorded(m) == fresh_stats(src)


def test_unreadable_parent_sums_mean_every_table_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    real = backup_mod.read_run

    def damaged(repo: Repository, manifest: Manifest, run: object, size: int = 46) -> bytes:
        if size == PAGE_SUM.size:
            raise IntegrityError("page-sum run does not match its hash")
        return real(repo, manifest, run, size)  # type: ignore[arg-type]

    monkeypatch.setattr(backup_mod, "read_run", damaged)
    run_sql(src, "UPDATE t SET v = 'changed' WHERE id = 10")
    m = _backup(repo, src)
    assert m.stats["checksum_leaves"]["read"] == m.stats["checksum_leaves"]["of"]
    assert recorded(m) == fresh_stats(src)
    monkeypatch.undo()
    assert load_page_sums(repo, m) is not None  # written anew


def test_prune_keeps_the_page_sums_and_verify_reads_them(tmp_path: Path) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    for i in range(3):
        run_sql(src, "UPDATE t SET v = ? WHERE id % 97 = 0", f"round {i}")
        _backup(repo, src)
    forget(repo, KeepPolicy(last=1))
    prune(repo, grace=0)
    (kept,) = repo.snapshots()
    assert load_page_sums(repo, kept) is not None
    report = verify(repo, read_data=True)
    assert report.ok, report.problems
    run_sql(src, "UPDATE t SET v = 'after prune' WHERE id = 5")
    m = _backup(repo, src)
    assert m.stats["checksum_leaves"]["read"] == 1 and recorded(m) == fresh_stats(src)


def test_a_version_2_parent_lends_nothing_and_still_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot from the dbre before version 3 (checksums in key order, no page sums): its
    restore validates with its own definition, and the next backup reads every table whole."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    with monkeypatch.context() as mp:
        mp.setattr(backup_mod, "CHECKSUM_VERSION", 2)
        old = _backup(repo, src)
    assert old.stats["checksum_version"] == 2 and "checksum_pages" not in old.stats
    con = apsw.Connection(str(src))
    assert old.tables["t"].checksum == table_checksum(con, "t", False, version=2)[1] != \
        table_checksum(con, "t", False)[1]
    con.close()
    target = tmp_path / "restored.db"
    apply_restore(repo, plan_restore(repo, "db", target, snapshot=old.id))
    con = apsw.Connection(str(target))
    try:
        results = equivalence_check(con, old)
    finally:
        con.close()
    assert not failed(results) and any(r.check == "checksum" for r in results)
    new = _backup(repo, src)
    assert new.stats["checksum_version"] == 3
    assert new.stats["checksum_leaves"]["read"] == new.stats["checksum_leaves"]["of"]
    assert recorded(new) == fresh_stats(src)


def test_a_tampered_version_3_checksum_fails_validation(tmp_path: Path) -> None:
    """Validation recomputes the sum from the restored rows: a recorded value that is not theirs fails."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    m = _backup(repo, src)
    target = tmp_path / "restored.db"
    apply_restore(repo, plan_restore(repo, "db", target, snapshot=m.id))
    m.tables["t"].checksum = "0" * 32
    con = apsw.Connection(str(target))
    try:
        bad = failed(equivalence_check(con, m))
    finally:
        con.close()
    assert [r.table for r in bad] == ["t"]


_RSS = r"""
import sys
import dbre.repository.backup as b
import dbre.sources.image as image
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
image.KEEP_MAPPED = 0  # (the sink's unmapping starts at 256 MiB: here at any size)
b._checksums_beside = lambda *a: None  # after the sink's pass, as an incremental's are (not beside it)
if sys.argv[3] == "mapped":  # the leaves read again through the map, never let go
    image.PageImage.read_page = image.PageImage.view
b.backup(Repository.open_or_init(sys.argv[1]), LocalFileSource(sys.argv[2]), "x", checksums=True)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def test_pages_read_again_for_checksums_do_not_stay_resident(tmp_path: Path) -> None:
    """The table checksums read leaves again after the sink unmapped them: through the map, a 1 GiB
    backup's peak resident memory grew by the leaves it read and their neighbours (1.2 GB measured;
    390 MB when they were let go every 4096 pages, the kernel mapping 64 KiB around each fault), so
    they are read with pread into memory of their own. Peak RSS of a backup of a 64 MiB database,
    each in a process of its own, reading the leaves again either way."""
    src = tmp_path / "big.db"
    con = sqlite3.connect(src)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t VALUES (?, randomblob(400))", ((i,) for i in range(140_000)))
    con.commit()
    con.close()
    assert src.stat().st_size > 60 * 2**20
    peaks = {}
    for mode in ("default", "mapped"):
        out = subprocess.run([sys.executable, "-c", _RSS, str(tmp_path / f"repo-{mode}"), str(src), mode],
                             capture_output=True, text=True, timeout=300, check=True)
        peaks[mode] = int(out.stdout.split()[-1])  # KiB
    assert peaks["mapped"] - peaks["default"] > 30 * 1024, peaks


def test_a_mismatch_on_a_table_with_real_values_names_another_sqlite(tmp_path: Path) -> None:
    """quote() of a REAL is not the same text in every SQLite (3.40.1: 3.33333333333333314829e-01,
    3.54.1: 0.33333333333333332 for 1.0/3). A checksum mismatch on a table holding a REAL value, in
    a snapshot whose checksums another SQLite computed, says so; it stays a failure. Not said: the
    same SQLite, or a table with no REAL value."""
    src = tmp_path / "live.db"
    with sqlite3.connect(src) as con:
        con.execute("CREATE TABLE prices (id INTEGER PRIMARY KEY, amount REAL, label TEXT)")
        con.execute("CREATE TABLE labels (id INTEGER PRIMARY KEY, label TEXT)")
        con.executemany("INSERT INTO prices VALUES (?, ?, ?)", [(i, i / 3, f"p{i}") for i in range(500)])
        con.executemany("INSERT INTO labels VALUES (?, ?)", [(i, f"l{i}") for i in range(500)])
    con.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    m = _backup(repo, src)
    assert m.stats["checksum_basis"]["sqlite"] == backup_mod._engine()
    target = tmp_path / "restored.db"
    apply_restore(repo, plan_restore(repo, "db", target, snapshot=m.id))
    for t in ("prices", "labels"):
        m.tables[t].checksum = "0" * 32

    def details() -> dict[str, str]:
        con = apsw.Connection(str(target))
        try:
            return {r.table: r.detail for r in failed(equivalence_check(con, m)) if r.check == "checksum"}
        finally:
            con.close()

    same = details()
    assert same.keys() == {"prices", "labels"} and not any("SQLite" in d for d in same.values()), same
    m.stats["checksum_basis"]["sqlite"] = "3.40.1 linux"
    other = details()
    assert "computed by SQLite 3.40.1" in other["prices"] and "REAL" in other["prices"], other
    assert other["labels"] == same["labels"]  # no REAL value there: nothing to say
